"""nn:EXPR specs: built from torch.nn classes, parsed and never evaluated."""
from __future__ import annotations

import pytest
import torch

from paramtool.errors import ParamtoolError
from paramtool.nnspec import MAX_ELEMENTS, build_module

MLP = "Sequential(Linear(4, 8), ReLU(), Linear(8, 1))"
TIED = "let s = Linear(8, 8) in Sequential(Linear(4, 8), ReLU(), s, ReLU(), s, ReLU(), Linear(8, 1))"


def shapes(net: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(p.shape)) for n, p in net.named_parameters()]


def test_contract_mlp():
    net = build_module(MLP)
    assert isinstance(net, torch.nn.Sequential)
    assert shapes(net) == [("0.weight", (8, 4)), ("0.bias", (8,)), ("2.weight", (1, 8)), ("2.bias", (1,))]


def test_contract_tied_example():
    net = build_module(TIED)
    assert net[2] is net[4]
    assert net[0] is not net[6]
    named = dict(net.named_parameters(remove_duplicate=False))
    assert named["2.weight"] is named["4.weight"]
    assert named["2.bias"] is named["4.bias"]
    assert {"2.weight", "4.weight", "2.bias", "4.bias"} <= set(named)
    # counted once by the default (deduplicating) view
    assert [n for n, _ in net.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias", "6.weight", "6.bias"]


def test_let_forms():
    comma = build_module("let a = Linear(2, 2), b = Sequential(a, a) in Sequential(b, b)")
    assert comma[0] is comma[1] and comma[0][0] is comma[0][1]
    chained = build_module("let a = Linear(2, 2) in let b = ReLU() in Sequential(a, b, a)")
    assert chained[0] is chained[2] and isinstance(chained[1], torch.nn.ReLU)
    mixed = build_module("let a = Linear(2, 2), b = Tanh() in let c = Sequential(a, b) in Sequential(c, a)")
    assert mixed[0][0] is mixed[1]
    literal = build_module("let n = 8 in Linear(n, n)")
    assert literal.weight.shape == (8, 8)
    # 'in' inside a string or a keyword name does not end a binding
    assert build_module("let a = ReLU(inplace=True) in Sequential(a)")[0].inplace is True
    assert build_module("let u = Upsample(scale_factor=2, mode='nearest') in Sequential(u)")[0].mode == "nearest"


def test_nested_sequential():
    net = build_module("Sequential(Sequential(Linear(3, 4), ReLU()), Sequential(Linear(4, 2), Sequential(Tanh())))")
    assert shapes(net) == [("0.0.weight", (4, 3)), ("0.0.bias", (4,)), ("1.0.weight", (2, 4)), ("1.0.bias", (2,))]
    assert isinstance(net[1][1][0], torch.nn.Tanh)


def test_keyword_args():
    lin = build_module("Linear(4, 8, bias=False)")
    assert lin.bias is None and lin.weight.shape == (8, 4)
    assert build_module("Linear(in_features=3, out_features=5)").weight.shape == (5, 3)
    assert build_module("Sequential(Linear(2, 2), Dropout(p=0.1))")[1].p == 0.1
    assert build_module("LayerNorm(6, eps=1e-6)").eps == 1e-6
    assert build_module("Linear(4, 8, dtype='bfloat16')").weight.dtype == torch.bfloat16


def test_tuples_and_lists():
    assert build_module("Conv2d(3, 8, (3, 3))").weight.shape == (8, 3, 3, 3)
    assert build_module("Conv2d(3, 8, kernel_size=[3, 5], stride=(2, 1))").weight.shape == (8, 3, 3, 5)
    ml = build_module("ModuleList([Linear(2, 2), Linear(2, 3)])")
    assert isinstance(ml, torch.nn.ModuleList) and len(ml) == 2 and ml[1].weight.shape == (3, 2)
    assert build_module("LayerNorm((4, 5))").weight.shape == (4, 5)
    md = build_module("ModuleDict({'enc': Linear(2, 3), 'dec': Linear(3, 2)})")
    assert set(md.keys()) == {"enc", "dec"}
    tied_list = build_module("let l = Linear(2, 2) in ModuleList([l, l, Embedding(10, 2)])")
    assert tied_list[0] is tied_list[1]


def test_negative_numbers_and_constants():
    assert build_module("LeakyReLU(-0.5)").negative_slope == -0.5
    assert build_module("Hardtanh(-2, +2)").min_val == -2
    assert build_module("Flatten(start_dim=1, end_dim=-1)").end_dim == -1
    assert build_module("Embedding(10, 3, padding_idx=None)").padding_idx is None


def test_seed_is_deterministic():
    a = build_module(MLP, seed=7)
    b = build_module(MLP, seed=7)
    c = build_module(MLP, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a[0].weight, c[0].weight)
    # the same values as building directly after torch.manual_seed (the size check draws no random numbers)
    torch.manual_seed(7)
    direct = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), direct.parameters()))


def test_seed_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_module("Linear(50, 50)", seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_whitespace_and_newlines():
    net = build_module("\n  let s = Linear(2, 2)\n  in Sequential(\n    s,\n    s,\n  )\n")
    assert net[0] is net[1]


@pytest.mark.parametrize("spec", [
    "__import__('os').system('touch {m}')",
    "Linear.__class__",
    "(lambda: 1)()",
    "exec('open(\"{m}\", \"w\")')",
    "exec('x')",
    "eval('1')",
    "Sequential(open('{m}', 'w'))",
    "[x for x in ()]",
    "(open('{m}', 'w') for x in [1])",
    "torch.nn.Linear(1, 1)",
    "Linear(1, 1).__class__",
    "Linear(1, 1)[0]",
    "Linear(*[1, 1])",
    "Linear(**{{'in_features': 1, 'out_features': 1}})",
    "Linear(1, 1, __class__=1)",
    "Sequential(f'{{1}}')",
    "Linear(1 + 1, 2)",
    "Linear(1, 1) if 1 else 2",
    "Linear(b'x', 1)",
    "Sequential(Linear(1, 1), open)",
    "let o = open in Sequential(o('{m}', 'w'))",
    "let _x = Linear(1, 1) in _x",
    "let Linear = ReLU() in Linear",
    "let a = Linear(1, 1), a = Linear(2, 2) in a",
    "let a = Linear(1, 1)",
    "let = Linear(1, 1) in x",
    "let a = b, b = Linear(1, 1) in a",
    "(x := Linear(1, 1))",
    "Foo(1)",
    "Linear(",
    "Linear(1, 1))",
    "Linear(1, 1, device='meta')",
    "Linear(1, 1, dtype='os')",
    "LazyLinear(3)",
    "Linear",
    "1",
    "(Linear(1, 1), Linear(1, 1))",
    "",
    "Sequential(" * 300 + ")" * 300,
    "Linear(" + "9" * 5000 + ", 1)",
])
def test_refused(tmp_path, spec):
    marker = tmp_path / "M"
    with pytest.raises(ParamtoolError) as e:
        build_module(spec.format(m=marker))
    assert "\n" not in str(e.value) and "nn: spec" in str(e.value)
    assert not marker.exists()


def test_error_messages():
    with pytest.raises(ParamtoolError, match=r"^unknown torch.nn class 'Foo' in nn: spec \(at col 1\)$"):
        build_module("Foo(1)")
    # columns count from the start of EXPR, across let bindings
    with pytest.raises(ParamtoolError, match=r"unknown torch.nn class 'Bar' in nn: spec \(at col 38\)"):
        build_module("let a = Linear(1,1) in Sequential(a, Bar())")
    with pytest.raises(ParamtoolError, match=r"invalid syntax in nn: spec \(at col 7\)"):
        build_module("Linear(")
    with pytest.raises(ParamtoolError, match=r"Linear\(-1, 2\) failed in nn: spec .*RuntimeError"):
        build_module("Linear(-1, 2)")
    with pytest.raises(ParamtoolError, match=r"attribute access"):
        build_module("torch.nn.Linear(1, 1)")
    with pytest.raises(ParamtoolError) as e:
        build_module("Sequential('\x1b[31m')")
    assert "\x1b" not in str(e.value)


def test_constructor_errors_name_the_call():
    with pytest.raises(ParamtoolError, match=r"Conv2d\(3, 8\) failed .*TypeError"):
        build_module("Sequential(Conv2d(3, 8))")
    with pytest.raises(ParamtoolError, match=r"Sequential\('x'\) failed"):
        build_module("Sequential('x')")


def test_size_guard_refuses_before_allocating():
    with pytest.raises(ParamtoolError, match=r"Linear\(100000, 100000\) refused"):
        build_module("Linear(100000, 100000)")
    # products of arguments small, real size large: the meta-device check sees it
    with pytest.raises(ParamtoolError, match=r"LSTM\(40000, 40000\) refused"):
        build_module("LSTM(40000, 40000)")
    # a copying constructor is checked on meta twins too
    with pytest.raises(ParamtoolError, match=r"refused"):
        build_module("TransformerEncoder(TransformerEncoderLayer(1024, 8, 4096), 200)")
    assert MAX_ELEMENTS == 2**31


def test_size_guard_counts_the_whole_model(monkeypatch):
    from paramtool import nnspec

    monkeypatch.setattr(nnspec, "MAX_ELEMENTS", 1_000_000)
    build_module("Sequential(Linear(800, 800))")  # 640,800 elements: fits
    # each call fits, the model does not
    with pytest.raises(ParamtoolError, match=r"model would exceed"):
        build_module("Sequential(Linear(800, 800), Linear(800, 800))")
    # a let-bound module is allocated, and counted, once
    net = build_module("let s = Linear(800, 800) in Sequential(s, s, s)")
    assert net[0] is net[2]


def test_size_guard_no_false_alarm_on_non_size_ints():
    # padding_idx is an int but not a size: the product of int arguments would exceed 2**31
    emb = build_module("Embedding(100000, 8, padding_idx=99999)")
    assert emb.weight.shape == (100000, 8)

"""nn: specs (parsed, never evaluated) and FILE.py:FUNC / module:FUNC factories."""
from __future__ import annotations

import sys

import pytest
import torch

from paramtool.errors import ParamtoolError
from paramtool.factory import call_factory, is_factory_spec
from paramtool.nnspec import build_module


def test_mlp_spec():
    net = build_module("Sequential(Linear(4, 8), ReLU(), Linear(8, 1))")
    assert [(n, tuple(p.shape)) for n, p in net.named_parameters()] == [
        ("0.weight", (8, 4)), ("0.bias", (8,)), ("2.weight", (1, 8)), ("2.bias", (1,))]


def test_let_ties_the_same_module():
    net = build_module("let s = Linear(8, 8) in Sequential(Linear(4, 8), ReLU(), s, ReLU(), s, ReLU(), Linear(8, 1))")
    assert net[2] is net[4]
    named = dict(net.named_parameters(remove_duplicate=False))
    assert named["2.weight"] is named["4.weight"]


def test_several_and_nested_lets():
    a = build_module("let a = Linear(2, 2), b = Sequential(a, a) in Sequential(b, b)")
    assert a[0] is a[1] and a[0][0] is a[0][1]
    b = build_module("let a = Linear(2, 2) in let b = ReLU() in Sequential(a, b, a)")
    assert b[0] is b[2]


def test_keywords_tuples_lists_negatives():
    assert build_module("Linear(4, 8, bias=False)").bias is None
    assert build_module("Conv2d(3, 8, (3, 3))").weight.shape == (8, 3, 3, 3)
    assert len(build_module("ModuleList([Linear(2, 2), Linear(2, 3)])")) == 2
    assert build_module("LeakyReLU(-0.5)").negative_slope == -0.5
    assert build_module("Sequential(Linear(2, 2), Dropout(p=0.1))")[1].p == 0.1


def test_seed_is_deterministic():
    a, b = build_module("Linear(3, 3)", seed=1), build_module("Linear(3, 3)", seed=1)
    assert torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("spec", [
    "__import__('os').system('touch {m}')",
    "Linear.__class__",
    "(lambda: 1)()",
    "exec('open(\"{m}\", \"w\")')",
    "Sequential(open('{m}', 'w'))",
    "[x for x in ()]",
    "torch.nn.Linear(1, 1)",
    "Linear(1, 1)[0]",
    "Linear(*[1, 1])",
    "Linear(**{{'in_features': 1}})",
    "Foo(1)",
    "Linear(",
    "let = Linear(1, 1) in x",
    "Linear(100000, 100000)",
    "Linear(-1, 2)",
    "1 + 1",
])
def test_refused(tmp_path, spec):
    marker = tmp_path / "M"
    with pytest.raises(ParamtoolError) as e:
        build_module(spec.format(m=marker))
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_factory_spec_detection(tmp_path):
    f = tmp_path / "weird:name"
    f.write_text("")
    assert is_factory_spec("models.py:build") and is_factory_spec("pkg.mod:make")
    assert not is_factory_spec(str(f)) and not is_factory_spec("-") and not is_factory_spec("nn:Linear(1,1)")
    assert not is_factory_spec("model.pt")


def test_file_factory(tmp_path):
    (tmp_path / "helper.py").write_text("import torch\nSIZE = 3\n")
    (tmp_path / "m.py").write_text(
        "import torch\nfrom helper import SIZE\n"
        "def build():\n    return torch.nn.Linear(SIZE, 2)\n"
        "def sd():\n    return {'w': torch.ones(2)}\n"
        "def bad():\n    raise ValueError('nope')\n"
        "def num():\n    return 3\n")
    assert isinstance(call_factory(f"{tmp_path}/m.py:build"), torch.nn.Linear)
    assert torch.equal(call_factory(f"{tmp_path}/m.py:sd")["w"], torch.ones(2))
    with pytest.raises(ParamtoolError, match="raised ValueError: nope"):
        call_factory(f"{tmp_path}/m.py:bad")
    with pytest.raises(ParamtoolError, match="returned int"):
        call_factory(f"{tmp_path}/m.py:num")
    with pytest.raises(ParamtoolError, match="no function 'missing'"):
        call_factory(f"{tmp_path}/m.py:missing")
    with pytest.raises(ParamtoolError, match="no such file"):
        call_factory(f"{tmp_path}/absent.py:build")


def test_module_factory(tmp_path, monkeypatch, run):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text("import torch\ndef tiny():\n    return torch.nn.Sequential(torch.nn.Linear(2, 2))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert isinstance(call_factory("mypkg.models:tiny"), torch.nn.Sequential)
    r = run("inspect", "mypkg.models:tiny", "--json")
    assert r.exit_code == 0 and r.json()["format"] == "module" and r.json()["num_params"] == 6
    with pytest.raises(ParamtoolError, match="cannot import"):
        call_factory("nosuchpkg.models:tiny")

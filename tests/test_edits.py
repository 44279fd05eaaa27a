"""`paramtool set` edits: parsing (no eval) and in-place application (paramtool.edits)."""
from __future__ import annotations

import math

import pytest
import torch

from paramtool.edits import Edit, apply_edit, parse_edit
from paramtool.errors import ParamtoolError, UsageError

RG = ["0.block 1.0.weight", "0.block 1.0.bias", "1.weight", "1.bias"]


def run(text: str, names: list[str], tensor: torch.Tensor) -> torch.Tensor:
    apply_edit(parse_edit(text, names), tensor)
    return tensor


def test_d2l_chapter_edits_match_torch():
    torch.manual_seed(0)
    w = torch.randn(8, 4)
    expected = w.clone()
    expected[:] += 1
    expected[0, 0] = 42
    run("0.weight[:] += 1", ["0.weight"], w)
    run("0.weight[0, 0] = 42", ["0.weight"], w)
    assert torch.equal(w, expected)


def test_parse_fields():
    e = parse_edit("0.weight[0, 0] = 42", ["0.weight"])
    assert e == Edit("0.weight", (0, 0), "=", 42, "0.weight[0, 0] = 42")
    assert isinstance(e.value, int)
    assert parse_edit("2.bias = 0", ["2.bias"]).index is None
    assert parse_edit("w[-1]-=-1e-3", ["w"]) == Edit("w", (-1,), "-=", -1e-3, "w[-1]-=-1e-3")


def test_name_with_spaces_and_longest_prefix():
    e = parse_edit("0.block 1.0.weight[0, 0] = 42", RG)
    assert (e.name, e.index, e.value) == ("0.block 1.0.weight", (0, 0), 42)
    names = ["a", "a.b", "x[0]", "x", "p=q"]
    assert parse_edit("a.b = 1", names).name == "a.b"
    assert parse_edit("x[0] = 1", names) == Edit("x[0]", None, "=", 1, "x[0] = 1")  # a name with '['
    assert parse_edit("x[1] = 1", names).name == "x"
    assert parse_edit("p=q += 2", names).name == "p=q"  # a name with '='
    assert parse_edit("  a.b *= 2  ", names).name == "a.b"


@pytest.mark.parametrize("index_text,index", [
    ("0", (0,)), ("-1", (-1,)), (":", (slice(None),)), ("1:3", (slice(1, 3),)), ("::2", (slice(None, None, 2),)),
    ("-3::-1", (slice(-3, None, -1),)), ("...", (Ellipsis,)), ("..., 0", (Ellipsis, 0)),
    ("0, 1:3", (0, slice(1, 3))), (" 0 , : ", (0, slice(None))), ("0,", (0,)),
])
def test_index_forms(index_text, index):
    assert parse_edit(f"w[{index_text}] = 1", ["w"]).index == index


@pytest.mark.parametrize("value_text,value", [
    ("42", 42), ("-7", -7), ("+3", 3), ("0.5", 0.5), (".5", 0.5), ("-1e-3", -1e-3), ("2E3", 2000.0),
    ("inf", math.inf), ("-inf", -math.inf), ("True", True), ("False", False),
])
def test_values(value_text, value):
    v = parse_edit(f"w = {value_text}", ["w"]).value
    assert v == value and type(v) is type(value)
    assert math.isnan(parse_edit("w = nan", ["w"]).value)


@pytest.mark.parametrize("op,torch_op", [
    ("=", lambda v, x: v.fill_(x)), ("+=", lambda v, x: v.add_(x)), ("-=", lambda v, x: v.sub_(x)),
    ("*=", lambda v, x: v.mul_(x)), ("/=", lambda v, x: v.div_(x)),
])
@pytest.mark.parametrize("value", ["3", "-0.1", "2.5"])
def test_each_op_matches_torch(op, torch_op, value):
    torch.manual_seed(1)
    w = torch.randn(4, 6)
    expected = w.clone()
    torch_op(expected[1:, ::2], float(value) if "." in value else int(value))
    run(f"w[1:, ::2] {op} {value}", ["w"], w)
    assert torch.equal(w, expected)


def test_slices_with_steps_and_ellipsis():
    t = torch.zeros(3, 4, 5)
    run("t[..., ::2] = 1", ["t"], t)
    assert t[:, :, 0::2].eq(1).all() and t[:, :, 1::2].eq(0).all()
    t = torch.arange(10.0)
    run("t[8:2:-3] *= -1", ["t"], t)
    assert t.tolist() == [0, 1, 2, 3, 4, -5, 6, 7, -8, 9]
    t = torch.zeros(2, 3)
    run("t[-1, ...] += 2", ["t"], t)
    assert t.tolist() == [[0, 0, 0], [2, 2, 2]]


def test_whole_tensor_assignment():
    t = torch.randn(3, 2)
    run("2.bias = 0", ["2.bias"], t)
    assert torch.count_nonzero(t) == 0


def test_dtype_kept_bf16_and_int():
    t = torch.ones(4, 4, dtype=torch.bfloat16)
    run("0.weight[:] += 1", ["0.weight"], t)
    assert t.dtype == torch.bfloat16 and t.eq(2).all()
    run("0.weight[0, 0] = 42", ["0.weight"], t)
    assert t.dtype == torch.bfloat16 and t[0, 0] == 42
    h = torch.ones(3, dtype=torch.float16)
    run("h /= 3", ["h"], h)
    assert h.dtype == torch.float16 and torch.equal(h, torch.ones(3, dtype=torch.float16) / 3)
    i = torch.tensor([7, -7, 2**60 + 1])
    run("i += 1", ["i"], i)
    assert i.tolist() == [8, -6, 2**60 + 2]  # exact, not through float
    run("i[:2] /= 2", ["i"], i)
    assert i.dtype == torch.int64 and i[:2].tolist() == [4, -3]  # exact: every value divides
    run("i[:1] *= 0.5", ["i"], i)
    assert i[:2].tolist() == [2, -3]


def test_in_place_so_tied_names_change_together():
    shared = torch.zeros(3, 2)
    sd = {"2.weight": shared, "4.weight": shared}
    run("2.weight[1, 0] = 7", list(sd), sd["2.weight"])
    assert sd["4.weight"][1, 0] == 7 and sd["4.weight"].data_ptr() == sd["2.weight"].data_ptr()
    view = shared.view(6)
    run("4.weight += 1", list(sd), sd["4.weight"])
    assert view.tolist() == [1, 1, 8, 1, 1, 1]


def test_requires_grad_leaf_is_fine():
    p = torch.nn.Parameter(torch.zeros(2))
    run("p[0] = 1", ["p"], p)
    assert p.tolist() == [1, 0] and p.requires_grad


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ParamtoolError, match=r"no tensor named '0.wieght'.*'0.weight'") as e:
        parse_edit("0.wieght[0] = 1", ["0.weight", "0.bias", "2.weight"])
    assert not isinstance(e.value, UsageError)
    with pytest.raises(ParamtoolError, match="no tensor named 'zzz'$"):
        parse_edit("zzz = 1", ["0.weight"])


@pytest.mark.parametrize("text", [
    "0.weight[0] 1", "0.weight", "0.weight[x] = 1", "0.weight = abc", "0.weight[0] =", "0.weight[::0] = 1",
    "0.weight[0 = 1", "0.weight[0][1] = 1", "0.weight //= 2", "0.weight == 1", "0.weight = 1; import os",
    "0.weight = __import__('os')", "0.weight[1:2:3:4] = 1", "0.weight[..., ...] = 1", "0.weight[] = 1",
    "0.weight = 1 2", "0.weight[0.5] = 1", "= 1",
])
def test_bad_syntax_is_a_one_line_usage_error(text):
    with pytest.raises(UsageError) as e:
        parse_edit(text, ["0.weight"])
    assert "\n" not in str(e.value) and "edit '" in str(e.value)


def test_index_out_of_range_message():
    with pytest.raises(ParamtoolError, match=r"edit 'w\[5, 0\] = 1': .*out of bounds.*shape \[2, 2\]") as e:
        run("w[5, 0] = 1", ["w"], torch.zeros(2, 2))
    assert "\n" not in str(e.value)
    with pytest.raises(ParamtoolError, match=r"too many indices.*shape \[2\]"):
        run("w[0, 0] += 1", ["w"], torch.zeros(2))


def test_errors_never_traceback_and_leave_tensor_untouched():
    i = torch.tensor([1, 2])
    with pytest.raises(ParamtoolError, match="division by zero"):
        run("i /= 0", ["i"], i)
    with pytest.raises(ParamtoolError, match="cannot hold inf"):
        run("i *= inf", ["i"], i)
    with pytest.raises(ParamtoolError):
        run("i = nan", ["i"], i)
    with pytest.raises(ParamtoolError, match="bool"):
        run("b += 1", ["b"], torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ParamtoolError):
        run("i = 99999999999999999999999", ["i"], i)
    assert i.tolist() == [1, 2]


def test_float_division_by_zero_follows_torch():
    t = torch.tensor([1.0, -1.0, 0.0])
    run("t /= 0", ["t"], t)
    assert t[0] == math.inf and t[1] == -math.inf and math.isnan(t[2])


def test_bool_assignment():
    b = torch.zeros(3, dtype=torch.bool)
    run("b[1] = True", ["b"], b)
    assert b.tolist() == [False, True, False]


def test_parse_never_evaluates(monkeypatch):
    import builtins

    monkeypatch.setattr(builtins, "eval", lambda *a, **k: pytest.fail("eval called"))
    with pytest.raises(UsageError):
        parse_edit("w = (1).__class__", ["w"])


@pytest.mark.parametrize("index", ["::-1", "8:2:-3", "-1:-9:-2", "2:8:-1", "::-3", "0::-1"])
def test_negative_steps_select_the_same_elements_as_python(index):
    edit = parse_edit(f"t[{index}] += 1", ["t"])
    t = torch.zeros(10)
    apply_edit(edit, t)
    expected = [0.0] * 10
    for k in range(10)[edit.index[0]]:  # the same slice on a Python range
        expected[k] += 1
    assert t.tolist() == expected  # (2:8:-1 is empty, as in Python)


def test_negative_step_with_ellipsis_and_leading_int():
    t = torch.zeros(2, 3, 4)
    run("t[1, ..., ::-2] = 5", ["t"], t)
    expected = torch.zeros(2, 3, 4)
    expected[1, :, [3, 1]] = 5
    assert torch.equal(t, expected)


# --- the dtype is respected: integer and bool tensors never round silently ------------------------------------

@pytest.mark.parametrize("dtype,text,shown", [
    (torch.int64, "t = 2.5", "2.5"),
    (torch.uint8, "t = 300", "300"),
    (torch.uint8, "t = -1", "-1"),
    (torch.int32, "t = nan", "nan"),
    (torch.int64, "t = inf", "inf"),
    (torch.int64, "t = 9223372036854775808", "9223372036854775808"),  # 2**63
    (torch.bool, "t = 2", "2"),
    (torch.bool, "t = 0.5", "0.5"),
    (torch.int64, "t *= 0.5", "-1.5"),
    (torch.int64, "t += 0.5", "-2.5"),
    (torch.int64, "t /= 2", "-1.5"),
    (torch.uint8, "t += 250", "257"),
    (torch.uint8, "t -= 8", "-5"),
    (torch.int8, "t *= 64", "192"),
    (torch.int64, "t *= nan", "nan"),
    (torch.uint16, "t -= 4", "-1"),  # torch's CPU kernels lack add_ for uint16: computed in int64
    (torch.uint32, "t /= 2", "1.5"),
])
def test_integer_and_bool_edits_refuse_what_the_dtype_cannot_hold(dtype, text, shown):
    t = torch.tensor([3, 7], dtype=torch.uint8).to(dtype) if dtype != torch.int64 else torch.tensor([-3, 7])
    if dtype == torch.bool:
        t = torch.tensor([True, False])
    before = t.clone()
    with pytest.raises(ParamtoolError) as e:
        run(text, ["t"], t)
    msg = str(e.value)
    assert f"'t' is {str(dtype)[6:]}" in msg and f"cannot hold {shown}" in msg, msg
    assert torch.equal(t, before)


def test_int64_extremes_are_checked_exactly():
    t = torch.tensor([2**63 - 2, -(2**63)])
    run("t[0] += 1", ["t"], t)
    assert t[0] == 2**63 - 1
    with pytest.raises(ParamtoolError, match=r"cannot hold 9223372036854775808 \(9223372036854775807 \+ 1\)"):
        run("t += 1", ["t"], t)
    with pytest.raises(ParamtoolError, match="cannot hold 9223372036854775808"):
        run("t[1] /= -1", ["t"], t)
    assert t.tolist() == [2**63 - 1, -(2**63)]


def test_exact_integer_results_are_written():
    t = torch.tensor([4, 8, 250], dtype=torch.uint8)
    run("t[:2] *= 0.5", ["t"], t)
    run("t[2] += 5", ["t"], t)
    run("t[:2] /= 2.0", ["t"], t)
    assert t.tolist() == [1, 2, 255] and t.dtype == torch.uint8
    u = torch.tensor([4, 6], dtype=torch.uint32)
    run("u += 1", ["u"], u)
    run("u[0] /= 5", ["u"], u)
    assert u.tolist() == [1, 7] and u.dtype == torch.uint32
    b = torch.zeros(2, dtype=torch.bool)
    run("b = 1", ["b"], b)
    assert b.tolist() == [True, True]
    f = torch.zeros(2, dtype=torch.float16)
    run("f = 2.0001", ["f"], f)  # float dtypes round as torch does
    assert torch.equal(f, torch.full((2,), 2.0001, dtype=torch.float16))


@pytest.fixture
def run_cli(request):
    """The CLI runner of conftest (named ``run`` there, which this module's helper shadows)."""
    return request.getfixturevalue("run")


@pytest.mark.parametrize("edit,fragment", [
    ("bn.num_batches_tracked = 2.5", "'bn.num_batches_tracked' is int64 and cannot hold 2.5"),
    ("mask = 300", "'mask' is uint8 and cannot hold 300"),
    ("mask = -1", "'mask' is uint8 and cannot hold -1"),
    ("bn.num_batches_tracked *= 0.5", "'bn.num_batches_tracked' is int64 and cannot hold 1.5"),
    ("flag = nan", "'flag' is bool and cannot hold nan"),
])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_cli_dtype_errors_leave_the_file_unchanged(tmp_path, run_cli, edit, fragment, suffix):
    from safetensors.torch import save_file

    sd = {"bn.num_batches_tracked": torch.tensor(3), "mask": torch.tensor([1, 2], dtype=torch.uint8),
          "flag": torch.tensor([True])}
    path = tmp_path / f"m{suffix}"
    torch.save(sd, path) if suffix == ".pt" else save_file(sd, path)
    before = path.read_bytes()
    for args in (["--in-place"], ["-o", tmp_path / f"out{suffix}"]):
        r = run_cli("set", path, edit, *args)
        assert r.exit_code == 1 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
        assert fragment in r.stderr
    assert path.read_bytes() == before and not (tmp_path / f"out{suffix}").exists()

"""--layer/--param selectors and `set` edit parsing."""
from __future__ import annotations

import pytest
import torch

from paramtool.edits import apply_edit, parse_edit
from paramtool.errors import ParamtoolError, UsageError
from paramtool.select import module_path, module_paths, select

RGNET = [f"0.block {i}.{j}.{p}" for i in range(4) for j in (0, 2) for p in ("weight", "bias")] + ["1.weight", "1.bias"]
MLP = ["0.weight", "0.bias", "2.weight", "2.bias", "10.weight"]
GPT = ["h.0.attn.c_attn.weight", "h.0.mlp.c_fc.weight", "h.1.attn.c_attn.weight", "h.1.mlp.c_fc.weight", "wte.weight"]


def test_module_paths():
    assert module_path("0.block 1.0.bias") == "0.block 1.0" and module_path("bias") == ""
    assert module_paths(RGNET)[:3] == ["0", "0.block 0", "0.block 0.0"]


def test_module_path_never_prefix_of_number():
    assert select(MLP, ["0"]) == ["0.weight", "0.bias"]
    assert select(MLP, ["2.weight"]) == ["2.weight"]
    assert select(MLP, ["10"]) == ["10.weight"]


def test_positional_path():
    assert select(RGNET, ["[0][1][0]"]) == ["0.block 1.0.weight", "0.block 1.0.bias"]
    assert select(RGNET, ["[1]"]) == ["1.weight", "1.bias"]
    with pytest.raises(ParamtoolError, match="no index 9"):
        select(RGNET, ["[0][9]"])


def test_globs():
    assert select(GPT, ["h.*.mlp"]) == ["h.0.mlp.c_fc.weight", "h.1.mlp.c_fc.weight"]
    assert select(GPT, ["*.attn.*"]) == ["h.0.attn.c_attn.weight", "h.1.attn.c_attn.weight"]
    assert select(RGNET, ["0.block [12]"]) == [n for n in RGNET if n.startswith(("0.block 1.", "0.block 2."))]


def test_union_order_and_param():
    assert select(MLP, ["2", "0"], "weight") == ["0.weight", "2.weight"]
    assert select(MLP, [], "bias") == ["0.bias", "2.bias"]
    with pytest.raises(UsageError):
        select(MLP, [], "gamma")


def test_no_match_lists_module_paths():
    with pytest.raises(ParamtoolError, match="module paths here: 0, 2, 10"):
        select(MLP, ["7"])
    with pytest.raises(ParamtoolError, match="no 'bias'"):
        select(["w"], [], "bias")


def test_chapter_edits_match_torch():
    names = ["0.weight"]
    w = torch.randn(8, 4)
    expected = w.clone()
    expected[:] += 1
    expected[0, 0] = 42
    for text in ("0.weight[:] += 1", "0.weight[0, 0] = 42"):
        apply_edit(parse_edit(text, names), w)
    assert torch.equal(w, expected)


def test_edit_forms():
    names = ["0.block 1.0.weight", "0.block 1.0.bias", "a"]
    e = parse_edit("0.block 1.0.weight[0, 1:3] *= -2.5", names)
    assert (e.name, e.index, e.op, e.value) == ("0.block 1.0.weight", (0, slice(1, 3, None)), "*=", -2.5)
    assert parse_edit("a[..., ::2] /= 2", names).index == (Ellipsis, slice(None, None, 2))
    t = torch.ones(4, 4, dtype=torch.bfloat16)
    apply_edit(parse_edit("a[..., ::2] -= 3", names), t)
    assert t.dtype == torch.bfloat16 and t[0, 0] == -2 and t[0, 1] == 1
    apply_edit(parse_edit("a = 0", names), t)
    assert torch.count_nonzero(t) == 0


def test_edit_changes_tied_storage():
    base = torch.zeros(3)
    tied = base.view(3)
    apply_edit(parse_edit("a[1] = 7", ["a", "b"]), base)
    assert tied[1] == 7


@pytest.mark.parametrize("text,err", [
    ("0.wieght[0] = 1", ParamtoolError), ("0.weight[0] 1", UsageError), ("0.weight[x] = 1", UsageError),
    ("0.weight = abc", UsageError), ("0.weight[0] =", UsageError), ("0.weight[::0] = 1", UsageError),
])
def test_edit_errors(text, err):
    with pytest.raises(err):
        parse_edit(text, ["0.weight"])


def test_edit_index_out_of_range_is_one_line():
    with pytest.raises(ParamtoolError, match=r"shape \[2, 2\]"):
        apply_edit(parse_edit("w[5, 0] = 1", ["w"]), torch.zeros(2, 2))
    with pytest.raises(ParamtoolError, match="division by zero"):
        apply_edit(parse_edit("w /= 0", ["w"]), torch.zeros(2, dtype=torch.int64))

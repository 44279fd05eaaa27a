"""--layer / --param selectors over tensor names (paramtool.select): names only, no torch."""
from __future__ import annotations

import pytest

from paramtool.errors import ParamtoolError, UsageError
from paramtool.select import module_path, module_paths, select

# D2L's rgnet: Sequential(block2(), Linear(4, 1)), block2 = 4 x "block i" = Sequential(Linear, ReLU, Linear, ReLU)
RGNET = [f"0.block {i}.{j}.{p}" for i in range(4) for j in (0, 2) for p in ("weight", "bias")] + ["1.weight", "1.bias"]
MLP = ["0.weight", "0.bias", "2.weight", "2.bias"]
WIDE = [f"{i}.weight" for i in range(12)] + ["10.bias"]  # 0..11: "1" must not select 10 or 11
GPT = [
    "wte.weight",
    "h.0.attn.c_attn.weight", "h.0.attn.c_attn.bias", "h.0.mlp.c_fc.weight", "h.0.mlp.c_fc.bias",
    "h.1.attn.c_attn.weight", "h.1.attn.c_attn.bias", "h.1.mlp.c_fc.weight", "h.1.mlp.c_fc.bias",
    "ln_f.weight", "ln_f.bias",
]


def test_module_path():
    assert module_path("0.block 1.0.bias") == "0.block 1.0"
    assert module_path("0.weight") == "0"
    assert module_path("bias") == ""


def test_module_paths_first_appearance_with_ancestors():
    paths = module_paths(RGNET)
    assert paths[:5] == ["0", "0.block 0", "0.block 0.0", "0.block 0.2", "0.block 1"]
    assert paths[-1] == "1" and len(paths) == len(set(paths)) == 1 + 4 * 3 + 1
    assert module_paths(["bias", "a.b.c.w"]) == ["a", "a.b", "a.b.c"]


def test_no_layers_means_every_tensor_in_order():
    assert select(RGNET, []) == RGNET
    assert select(GPT, [], "all") == GPT


def test_module_path_selects_subtree_never_numeric_prefix():
    assert select(MLP, ["0"]) == ["0.weight", "0.bias"]
    assert select(WIDE, ["1"]) == ["1.weight"]
    assert select(WIDE, ["10"]) == ["10.weight", "10.bias"]
    assert select(RGNET, ["0"]) == RGNET[:-2]
    assert select(RGNET, ["0.block 1"]) == [n for n in RGNET if n.startswith("0.block 1.")]


def test_full_name_selects_exactly_that():
    assert select(MLP, ["2.weight"]) == ["2.weight"]
    assert select(RGNET, ["0.block 3.2.bias"]) == ["0.block 3.2.bias"]


def test_names_with_spaces_are_never_split_on_spaces():
    assert select(RGNET, ["0.block 2.0"]) == ["0.block 2.0.weight", "0.block 2.0.bias"]
    with pytest.raises(ParamtoolError):
        select(RGNET, ["block"])


def test_positional_path():
    assert select(RGNET, ["[0][1][0]"]) == ["0.block 1.0.weight", "0.block 1.0.bias"]
    assert select(RGNET, ["[0][3][1]"]) == ["0.block 3.2.weight", "0.block 3.2.bias"]
    assert select(RGNET, ["[1]"]) == ["1.weight", "1.bias"]
    assert select(RGNET, ["[0][0]"]) == RGNET[:4]


def test_positional_counts_children_with_tensors_only():
    # mlp's ReLU at index 1 has no tensors: the second child that appears is module "2"
    assert select(MLP, ["[1]"]) == ["2.weight", "2.bias"]


def test_positional_out_of_range_is_an_error():
    with pytest.raises(ParamtoolError, match="no index 9"):
        select(RGNET, ["[0][9]"])
    with pytest.raises(ParamtoolError, match="top level has 2 child"):
        select(RGNET, ["[2]"])
    with pytest.raises(ParamtoolError, match="no index 0"):
        select(RGNET, ["[1][0]"])  # 1 is a Linear: its tensors are not modules


def test_globs_match_whole_module_paths():
    mlp_tensors = ["h.0.mlp.c_fc.weight", "h.0.mlp.c_fc.bias", "h.1.mlp.c_fc.weight", "h.1.mlp.c_fc.bias"]
    assert select(GPT, ["h.*.mlp"]) == mlp_tensors
    assert select(GPT, ["*.attn.*"]) == [n for n in GPT if ".attn." in n]
    assert select(GPT, ["h.?.attn"]) == [n for n in GPT if ".attn." in n]
    # whole-path rule: "h.*.ml" is not a prefix match of h.0.mlp
    with pytest.raises(ParamtoolError, match="matches nothing"):
        select(GPT, ["h.*.ml"])


def test_glob_over_full_names_and_star_crossing_dots():
    assert select(GPT, ["*.bias"]) == [n for n in GPT if n.endswith(".bias")]
    assert select(GPT, ["h.*"]) == [n for n in GPT if n.startswith("h.")]  # * crosses dots
    assert select(RGNET, ["*.0.weight"]) == [f"0.block {i}.0.weight" for i in range(4)]


def test_glob_character_class():
    assert select(RGNET, ["0.block [12]"]) == [n for n in RGNET if n.startswith(("0.block 1.", "0.block 2."))]
    assert select(RGNET, ["0.block [!0-2].*"]) == [n for n in RGNET if n.startswith("0.block 3.")]


def test_union_keeps_checkpoint_order_without_duplicates():
    assert select(MLP, ["2", "0"]) == MLP
    assert select(RGNET, ["1", "[0][0]", "0.block 0.0.weight"]) == RGNET[:4] + RGNET[-2:]
    assert select(GPT, ["*.attn.*", "h.0"]) == [n for n in GPT if n.startswith("h.0.") or ".attn." in n]


def test_param_filter():
    assert select(MLP, ["2", "0"], "weight") == ["0.weight", "2.weight"]
    assert select(MLP, [], "bias") == ["0.bias", "2.bias"]
    assert select(RGNET, ["[0][1]"], "bias") == ["0.block 1.0.bias", "0.block 1.2.bias"]
    # narrows by the LAST component only
    assert select(["weight.bias", "bias.weight"], [], "weight") == ["bias.weight"]
    assert select(["bn.running_mean", "bn.weight"], [], "weight") == ["bn.weight"]


@pytest.mark.parametrize("param", ["gamma", "", "weights", "Weight"])
def test_bad_param_is_a_usage_error(param):
    with pytest.raises(UsageError):
        select(MLP, [], param)


def test_no_match_lists_module_paths():
    with pytest.raises(ParamtoolError, match=r"--layer '10' matches nothing; module paths here: 0, 2") as e:
        select(MLP, ["10"])
    assert "\n" not in str(e.value)
    with pytest.raises(ParamtoolError, match=r"module paths here: 0, 0\.block 0, .*\.\.\.") as e:
        select(RGNET, ["nope"])
    assert str(e.value).count(",") <= 9  # a short list, not every path


def test_one_unmatched_selector_fails_the_union():
    with pytest.raises(ParamtoolError, match="'7'"):
        select(MLP, ["0", "7"])


def test_param_leaving_nothing_is_an_error():
    with pytest.raises(ParamtoolError, match="no 'bias'"):
        select(["w", "0.weight"], ["0"], "bias")

"""Positions count exactly the children the inspect tree shows, in its order, in every command that takes them
(issue 26, item 13): a model directory's config-tied ``lm_head`` (listed, not stored) and a model's
parameterless modules (``ReLU``: ``net[1]``) are children like the others."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

TREE_ENV = {"COLUMNS": "200", "NO_COLOR": "1"}
RELU_NET = "nn:Sequential(Linear(4, 8), ReLU(), Sequential(Linear(8, 8), Tanh(), Linear(8, 2)))"


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 as transformers saves it: ``lm_head.weight`` tied to ``transformer.wte.weight``, not stored."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=3, n_embd=8, n_head=2, vocab_size=16,
                                                                 n_positions=8))
    d = tmp_path_factory.mktemp("gpt2") / "m"
    model.save_pretrained(d)
    assert "lm_head.weight" not in load_file(d / "model.safetensors")
    return d


def tree_modules(text: str) -> dict[str, list[str]]:
    """Module path -> its child modules, in the order the (expanded) tree prints them; tensor leaves left out."""
    children: dict[str, list[str]] = {"": []}
    stack: list[str] = []  # the path at each depth
    for line in text.splitlines()[1:]:
        m = re.match(r"^((?:│   |    )*)[├└]── (.*)$", line)
        if not m:
            continue
        depth = len(m.group(1)) // 4
        label, _, rest = m.group(2).partition("  ")
        if rest.startswith("["):  # a tensor: "bias  [8]  float32  8"
            continue
        del stack[depth:]
        parent = stack[-1] if stack else ""
        path = f"{parent}.{label}" if parent else label
        children.setdefault(parent, []).append(label)
        children.setdefault(path, [])
        stack.append(path)
    return children


def every_position(children: dict[str, list[str]], path: str = "", at: str = ""):
    """(``[i][j]…``, module path) for every module of the tree."""
    for i, child in enumerate(children[path]):
        full = f"{path}.{child}" if path else child
        yield f"{at}[{i}]", full
        yield from every_position(children, full, f"{at}[{i}]")


def _names(run, source, selector):
    r = run("inspect", source, "--layer", selector, "--json")
    assert r.exit_code == 0, (selector, r.stderr)
    return [t["name"] for t in r.json()["tensors"]]


def test_every_position_of_the_tree_selects_that_module(gpt2_dir, run):
    """Walk the tree inspect prints: each module's position (as the tree orders children) selects exactly the
    tensors under that module, lm_head (config-tied, not stored) at the top level included."""
    text = run("inspect", gpt2_dir, "--expand", env=TREE_ENV).stdout
    children = tree_modules(text)
    assert children[""] == ["lm_head", "transformer"]
    assert children["transformer"] == ["h", "ln_f", "wpe", "wte"]
    everything = [t["name"] for t in run("inspect", gpt2_dir, "--json").json()["tensors"]]
    positions = list(every_position(children))
    assert len(positions) > 20
    for position, path in positions:
        want = [n for n in everything if n.startswith(path + ".")]
        assert sorted(_names(run, gpt2_dir, position)) == sorted(want), position


def test_positions_in_every_command_of_a_model_directory(gpt2_dir, tmp_path, run):
    stored = load_file(gpt2_dir / "model.safetensors")
    wte = stored["transformer.wte.weight"]
    # show: [0].weight is lm_head.weight, stored as the embedding (said once)
    r = run("show", gpt2_dir, "[0].weight", "--json")
    assert r.exit_code == 0, r.stderr
    assert torch.equal(torch.tensor(r.json()["values"]), wte)
    assert r.stderr.count("lm_head.weight is stored as transformer.wte.weight") == 1
    r = run("show", gpt2_dir, "[1][0][2].ln_1.bias", "--json")
    assert r.exit_code == 0 and torch.equal(torch.tensor(r.json()["values"]), stored["transformer.h.2.ln_1.bias"])
    # stats, init, convert --keep-dtype: [0] is the head, resolved to what stores it
    r = run("stats", gpt2_dir, "--layer", "[0]", "--json")
    assert r.exit_code == 0, r.stderr
    assert [t["name"] for t in r.json()["tensors"]] == ["transformer.wte.weight"]
    r = run("init", gpt2_dir, "--layer", "[0]", "--scheme", "zeros", "--dry-run", "--json")
    assert r.exit_code == 0 and r.json()["changed"] == ["transformer.wte.weight"], r.stderr
    r = run("init", gpt2_dir, "--layer", "[1][0][1]", "--scheme", "zeros", "--param", "all", "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["changed"] and all(n.startswith("transformer.h.1.") for n in r.json()["changed"])
    out = tmp_path / "keep"
    r = run("convert", gpt2_dir, "-o", out, "--dtype", "bf16", "--keep-dtype", "[0]")
    assert r.exit_code == 0, r.stderr
    cast = load_file(out / "model.safetensors")
    assert cast["transformer.wte.weight"].dtype == torch.float32 and cast["transformer.wpe.weight"].dtype == torch.bfloat16
    # set: the edit reaches the stored embedding
    out = tmp_path / "set"
    r = run("set", gpt2_dir, "[0].weight[0, 0] = 7", "-o", out)
    assert r.exit_code == 0, r.stderr
    assert load_file(out / "model.safetensors")["transformer.wte.weight"][0, 0] == 7
    assert "lm_head.weight is stored as transformer.wte.weight" in r.stderr
    # resize: the head and the embedding it is tied to
    r = run("resize", gpt2_dir, "[0].weight", "--rows", "20", "--dry-run", "--json")
    assert r.exit_code == 0 and r.json()["changed"] == ["transformer.wte.weight"], r.stderr
    # drop: [1][2] is transformer.wpe, counted after lm_head
    r = run("drop", gpt2_dir, "--layer", "[1][2]", "--dry-run", "--json")
    assert r.exit_code == 0 and r.json()["changed"] == ["transformer.wpe.weight"], r.stderr
    # an index past the tree's children names them as the tree lists them
    r = run("inspect", gpt2_dir, "--layer", "[2]")
    assert r.exit_code == 1 and "the top level has 2 child module(s) ('lm_head', 'transformer'), no index 2" in r.stderr


def test_fast_json_forms_count_as_the_tree_does(gpt2_dir):
    """``inspect --json`` and ``stats --json`` are answered by launch.py without typer: same positions, and a
    config-tied name selects its stored tensor there too."""
    def fast(*args):
        p = subprocess.run([sys.executable, "-m", "paramtool", *map(str, args)], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        return [t["name"] for t in json.loads(p.stdout)["tensors"]], p.stderr

    assert fast("inspect", gpt2_dir, "--layer", "[0]", "--json")[0] == ["lm_head.weight"]
    for selector in ("[0]", "lm_head"):
        names, err = fast("stats", gpt2_dir, "--layer", selector, "--json")
        assert names == ["transformer.wte.weight"] and "is stored as transformer.wte.weight" in err


def _relu_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)))


@pytest.mark.parametrize("kind", ["nn", "pickled"])
def test_parameterless_modules_count_where_the_model_is_read(tmp_path, run, kind):
    """Where the model itself is read (an nn: spec, torch.save(model)), the tree shows ReLU at index 1, and
    positions index as PyTorch does: ``[2][2]`` is ``net[2][2]``; ``[1]`` is the ReLU, which holds nothing."""
    if kind == "nn":
        source = RELU_NET
    else:
        source = tmp_path / "whole.pt"
        torch.save(_relu_net(), source)
    children = tree_modules(run("inspect", source, "--expand", env=TREE_ENV).stdout)
    assert children[""] == ["0", "1", "2"] and children["2"] == ["0", "1", "2"]
    assert _names(run, source, "[2][2]") == ["2.2.weight", "2.2.bias"]
    assert sorted(_names(run, source, "[2]")) == sorted(f"2.{i}.{p}" for i in (0, 2) for p in ("weight", "bias"))
    r = run("inspect", source, "--layer", "[1]")
    assert r.exit_code == 1 and "'[1]' is module '1', which holds no tensors" in r.stderr
    r = run("init", source, "--layer", "[2][2]", "--scheme", "zeros", "--param", "all", "--dry-run", "--json")
    assert r.exit_code == 0 and r.json()["changed"] == ["2.2.weight", "2.2.bias"], r.stderr
    r = run("show", source, "[2][2].bias", "--json")
    assert r.exit_code == 0 and len(r.json()["values"]) == 2
    if kind == "pickled":  # the fast --json form agrees
        p = subprocess.run([sys.executable, "-m", "paramtool", "inspect", str(source), "--layer", "[2][2]", "--json"],
                           capture_output=True, text=True)
        assert [t["name"] for t in json.loads(p.stdout)["tensors"]] == ["2.2.weight", "2.2.bias"], p.stderr


def test_grad_positions_index_as_pytorch_does(run):
    r = run("grad", RELU_NET, "--input", "2,4", "--layer", "[2][2]", "--json")
    assert r.exit_code == 0, r.stderr
    assert [p["name"] for p in r.json()["params"]] == ["2.2.weight", "2.2.bias"]
    r = run("grad", RELU_NET, "--input", "2,4", "--layer", "[1]")
    assert r.exit_code == 1 and "holds no tensors" in r.stderr


def test_a_state_dict_counts_only_modules_with_tensors(tmp_path, run):
    """The same network saved as a state dict has no ReLU to show: the tree lists 0 and 2, and [1] is 2."""
    torch.save(_relu_net().state_dict(), tmp_path / "sd.pt")
    children = tree_modules(run("inspect", tmp_path / "sd.pt", env=TREE_ENV).stdout)
    assert children[""] == ["0", "2"]
    assert _names(run, tmp_path / "sd.pt", "[1][1]") == ["2.2.weight", "2.2.bias"]

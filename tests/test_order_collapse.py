"""Large models read well: numbers in names compare as numbers, repeated blocks collapse in the tree, and
safetensors keeps the source's tensor order.

Checkpoints are built by transformers from tiny configs (random weights; names and shapes as the library
writes them) and saved with ``save_pretrained`` (safetensors) or ``torch.save(state_dict)``.
"""
from __future__ import annotations

import json
import pathlib
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from paramtool.names import natural_key, people_order, sibling_order

TREE_ENV = {"COLUMNS": "100", "NO_COLOR": "1"}


def _quiet():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    return transformers


def gpt2(n_layer: int):
    tf = _quiet()
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=n_layer, n_embd=8, n_head=2, vocab_size=16, n_positions=8))


def llama(n_layer: int, tie: bool = False):
    tf = _quiet()
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=n_layer, hidden_size=8, intermediate_size=16,
                                              num_attention_heads=2, num_key_value_heads=1, vocab_size=16,
                                              tie_word_embeddings=tie))


def vit(n_layer: int):
    tf = _quiet()
    torch.manual_seed(0)
    return tf.ViTModel(tf.ViTConfig(num_hidden_layers=n_layer, hidden_size=8, intermediate_size=16,
                                    num_attention_heads=2, image_size=8, patch_size=4))


def header_names(path) -> list[str]:
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    return [n for n in header if n != "__metadata__"]


def tree(run, *args) -> str:
    r = run("inspect", *args, env=TREE_ENV)
    assert r.exit_code == 0, r.stderr
    return r.stdout


# --- the order ---------------------------------------------------------------------------------------


def test_numbers_compare_as_numbers():
    assert sibling_order(["h", "wte", "ln_f", "wpe"]) == ["h", "ln_f", "wpe", "wte"]
    assert sibling_order(["0", "1", "10", "11", "2"]) == ["0", "1", "2", "10", "11"]
    assert sibling_order(["layer10", "layer2", "layer1"]) == ["layer1", "layer2", "layer10"]
    assert sorted(["b1", "b01", "b1"], key=natural_key) == ["b01", "b1", "b1"]  # never compares int with str
    names = ["t.h.10.w", "t.h.2.w", "t.h.2.a.b", "t.wte.weight", "t.h.2.bias", "lm_head.weight", "t.h.1.w"]
    # module by module, a module's own tensors before its sub-modules, numbers as numbers
    assert people_order(names) == ["lm_head.weight", "t.h.1.w", "t.h.2.bias", "t.h.2.w", "t.h.2.a.b",
                                   "t.h.10.w", "t.wte.weight"]


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_positions_and_tree_in_numeric_order_whatever_the_file_order(tmp_path, run, fmt, monkeypatch):
    """``[0][0][2]`` on GPT-2 is ``transformer.h.2``: from safetensors' sorted header (h.10 before h.2) and from
    a .pt whose state dict lists the same tensors backwards alike."""
    monkeypatch.chdir(tmp_path)
    model = gpt2(12)
    model.save_pretrained("m")
    st = pathlib.Path("m/model.safetensors")
    stored = header_names(st)
    assert stored.index("transformer.h.10.ln_1.weight") < stored.index("transformer.h.2.ln_1.weight")
    if fmt == "pt":
        sd = load_file(str(st))
        path = pathlib.Path("rev.pt")
        torch.save(dict(reversed(list(sd.items()))), path)
    else:
        path = st
    doc = run("inspect", path, "--json", "--layer", "[0][0][2]").json()
    assert doc["tensors"] and all(t["name"].startswith("transformer.h.2.") for t in doc["tensors"])
    ten = run("inspect", path, "--json", "--layer", "[0][0][10]").json()
    assert all(t["name"].startswith("transformer.h.10.") for t in ten["tensors"])
    text = tree(run, path, "--expand")
    assert re.findall(r"[├└]── (\d+)  \(", text) == [str(i) for i in range(12)]
    # the same tree from either file

    def body(text):
        return [line for line in text.splitlines()[1:] if not line.startswith("metadata")]

    assert body(text) == body(tree(run, st, "--expand"))


def test_position_counts_children_of_the_full_lm_checkpoint(tmp_path, run):
    """A GPT2LMHeadModel state dict has ``lm_head`` beside ``transformer``: sorted, lm_head is [0]."""
    torch.save(gpt2(12).state_dict(), tmp_path / "pytorch_model.bin")
    doc = run("inspect", tmp_path / "pytorch_model.bin", "--json", "--layer", "[1][0][2]").json()
    assert {t["name"].split(".")[2] for t in doc["tensors"]} == {"2"}
    assert run("inspect", tmp_path / "pytorch_model.bin", "--json", "--layer", "[0]").json()["tensors"][0]["name"] \
        == "lm_head.weight"


def test_ties_stats_diff_in_numeric_order(tmp_path, run):
    w = torch.ones(2)
    sd = {f"h.{i}.w": torch.full((2,), float(i)) for i in (10, 2, 1)}
    sd["h.10.v"], sd["h.2.v"] = w, w
    torch.save(sd, tmp_path / "a.pt")
    groups = run("ties", tmp_path / "a.pt", "--json").json()["groups"]
    assert groups == [{"names": ["h.2.v", "h.10.v"], "kind": "alias", "source": "storage"}]
    rows = [line.split()[0] for line in run("stats", tmp_path / "a.pt", env=TREE_ENV).stdout.splitlines()[1:6]]
    assert rows == ["h.1.w", "h.2.v", "h.2.w", "h.10.v", "h.10.w"]
    # JSON keeps the checkpoint's order
    assert [t["name"] for t in run("stats", tmp_path / "a.pt", "--json").json()["tensors"]] == list(sd)
    other = {n: t + 1 for n, t in sd.items()}
    other["h.2.v"] = other["h.10.v"]
    torch.save(other, tmp_path / "b.pt")
    lines = run("diff", tmp_path / "a.pt", tmp_path / "b.pt", env=TREE_ENV).stdout.splitlines()
    assert [line.split()[1] for line in lines[:-1]] == ["h.1.w", "h.2.v", "h.2.w", "h.10.v", "h.10.w"]


# --- order kept on disk ------------------------------------------------------------------------------


def test_pt_safetensors_pt_keeps_order_and_every_byte(tmp_path, run):
    model = gpt2(3)  # lm_head.weight is tied to transformer.wte.weight
    sd = dict(model.state_dict())
    sd["extra.block 0.0.weight"] = torch.randn(3, 5).to(torch.bfloat16)
    sd["extra.block 0.0.bias"] = torch.randn(3).to(torch.float16)
    sd["extra.steps"] = torch.arange(7)
    sd["extra.mask"] = torch.tensor([True, False, True])
    sd["extra.row"] = sd["extra.steps"][2:5]  # a view tie
    torch.save(sd, tmp_path / "a.pt")
    assert run("convert", tmp_path / "a.pt", tmp_path / "a.safetensors").exit_code == 0
    assert run("convert", tmp_path / "a.safetensors", tmp_path / "b.pt").exit_code == 0
    orig = torch.load(tmp_path / "a.pt", weights_only=True)
    back = torch.load(tmp_path / "b.pt", weights_only=True)
    assert list(back) == list(orig)
    for name, t in orig.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name].contiguous().view(-1).view(torch.uint8), t.contiguous().view(-1).view(torch.uint8))
    assert back["lm_head.weight"].data_ptr() == back["transformer.wte.weight"].data_ptr()
    assert back["extra.row"].untyped_storage().data_ptr() == back["extra.steps"].untyped_storage().data_ptr()
    # the safetensors file itself: header and data in the source's order, readable by safetensors
    st = tmp_path / "a.safetensors"
    stored = header_names(st)
    assert stored == [n for n in orig if n not in ("lm_head.weight", "extra.row")]
    raw = st.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    offsets = [header[n]["data_offsets"] for n in stored]
    assert offsets[0][0] == 0 and all(a[1] == b[0] for a, b in zip(offsets, offsets[1:]))
    loaded = load_file(str(st))
    assert all(torch.equal(loaded[n], orig[n]) for n in stored)
    # listing follows the header, tied names back in their places
    assert [t["name"] for t in run("inspect", st, "--json").json()["tensors"]] == list(orig)


def test_foreign_safetensors_listed_in_header_order(tmp_path, run):
    """``save_file`` sorts by dtype, then name: the listing keeps that, the tree sorts for people."""
    tensors = {"b.10.w": torch.zeros(2), "b.2.w": torch.zeros(2), "a": torch.zeros(2, dtype=torch.float64)}
    save_file(tensors, str(tmp_path / "f.safetensors"))
    listed = [t["name"] for t in run("inspect", tmp_path / "f.safetensors", "--json").json()["tensors"]]
    assert listed == header_names(tmp_path / "f.safetensors") == ["a", "b.10.w", "b.2.w"]
    text = tree(run, tmp_path / "f.safetensors")
    assert text.index("b.2.w") < text.index("b.10.w") if "b.2.w" in text else text.index("2 ") < text.index("10 ")


# --- collapsed blocks: golden trees ------------------------------------------------------------------

GOLDEN_GPT2_PT = """\
pytorch_model.bin  pt  40 tensors  528 params  2.1 KiB  (tied storage counted once)
├── lm_head  (128 params, float32, 512 B)
│   └── weight  [16, 8]  float32  128  = transformer.wte.weight
└── transformer  (528 params, float32, 2.1 KiB)
    ├── h.0 … h.2  3 × (1,936 params each, 5,808 total, float32, 22.7 KiB)
"""


def test_golden_gpt2_pt(tmp_path, run):
    model = gpt2(3)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    text = tree(run, tmp_path / "pytorch_model.bin")
    assert text == GOLDEN_GPT2_PT

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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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


def llama(n_layer: int):
    tf = _quiet()
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=n_layer, hidden_size=8, intermediate_size=16,
                                              num_attention_heads=2, num_key_value_heads=1, vocab_size=16,
                                              tie_word_embeddings=False))


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


def modules(text: str) -> list[str]:
    """The module and run labels of a tree, in order (not the tensor lines)."""
    return re.findall(r"[├└]── (.+?)  (?:\d+ × )?\(", text)


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
    assert modules(text) == ["b", "2", "10"]


# --- collapsed blocks: golden trees ------------------------------------------------------------------


class Block(nn.Module):
    """Two layers whose weights are tied inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight


class TiedAcross(nn.Module):
    """Six blocks; block 4's ``b.bias`` is block 1's."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(6))
        self.blocks[4].b.bias = self.blocks[1].b.bias
        self.head = nn.Linear(4, 2)


def make(name: str) -> str:
    """Write the checkpoint a golden tree is of, in the current directory; returns its path."""
    if name == "GPT2_PT":
        torch.save(gpt2(3).state_dict(), "pytorch_model.bin")
        return "pytorch_model.bin"
    if name == "LLAMA":
        llama(4).save_pretrained("llama")
        return "llama/model.safetensors"
    if name == "VIT":
        vit(2).save_pretrained("vit")
        return "vit/model.safetensors"
    if name == "ODD_LAYER":  # one layer with an extra bias breaks the run
        sd = dict(llama(5).state_dict())
        sd["model.layers.2.self_attn.q_proj.bias"] = torch.zeros(8)
        torch.save(sd, "odd.pt")
        return "odd.pt"
    if name == "TIED_BLOCKS":
        torch.manual_seed(0)
        torch.save(TiedAcross().state_dict(), "tied.pt")
        return "tied.pt"
    raise AssertionError(name)


GOLDEN_GPT2_PT = """\
pytorch_model.bin  pt  41 tensors  2,824 params  11.0 KiB  (tied storage counted once)
├── lm_head  (128 params, float32, 512 B)
│   └── weight  [16, 8]  float32  128  = transformer.wte.weight
└── transformer  (2,824 params, float32, 11.0 KiB)
    ├── h.0 … h.2  3 × (872 params each, 2,616 total, float32, 10.2 KiB)
    │   ├── attn  (288 params, float32, 1.1 KiB)
    │   │   ├── c_attn  (216 params, float32, 864 B)
    │   │   │   ├── bias  [24]  float32  24
    │   │   │   └── weight  [8, 24]  float32  192
    │   │   └── c_proj  (72 params, float32, 288 B)
    │   │       ├── bias  [8]  float32  8
    │   │       └── weight  [8, 8]  float32  64
    │   ├── ln_1  (16 params, float32, 64 B)
    │   │   ├── bias  [8]  float32  8
    │   │   └── weight  [8]  float32  8
    │   ├── ln_2  (16 params, float32, 64 B)
    │   │   ├── bias  [8]  float32  8
    │   │   └── weight  [8]  float32  8
    │   └── mlp  (552 params, float32, 2.2 KiB)
    │       ├── c_fc  (288 params, float32, 1.1 KiB)
    │       │   ├── bias  [32]  float32  32
    │       │   └── weight  [8, 32]  float32  256
    │       └── c_proj  (264 params, float32, 1.0 KiB)
    │           ├── bias  [8]  float32  8
    │           └── weight  [32, 8]  float32  256
    ├── ln_f  (16 params, float32, 64 B)
    │   ├── bias  [8]  float32  8
    │   └── weight  [8]  float32  8
    ├── wpe  (64 params, float32, 256 B)
    │   └── weight  [8, 8]  float32  64
    └── wte  (128 params, float32, 512 B)
        └── weight  [16, 8]  float32  128  (tied)
"""

GOLDEN_LLAMA = """\
llama/model.safetensors  safetensors  39 tensors  2,632 params  10.3 KiB
├── lm_head  (128 params, float32, 512 B)
│   └── weight  [16, 8]  float32  128
└── model  (2,504 params, float32, 9.8 KiB)
    ├── embed_tokens  (128 params, float32, 512 B)
    │   └── weight  [16, 8]  float32  128
    ├── layers.0 … layers.3  4 × (592 params each, 2,368 total, float32, 9.2 KiB)
    │   ├── input_layernorm  (8 params, float32, 32 B)
    │   │   └── weight  [8]  float32  8
    │   ├── mlp  (384 params, float32, 1.5 KiB)
    │   │   ├── down_proj  (128 params, float32, 512 B)
    │   │   │   └── weight  [8, 16]  float32  128
    │   │   ├── gate_proj  (128 params, float32, 512 B)
    │   │   │   └── weight  [16, 8]  float32  128
    │   │   └── up_proj  (128 params, float32, 512 B)
    │   │       └── weight  [16, 8]  float32  128
    │   ├── post_attention_layernorm  (8 params, float32, 32 B)
    │   │   └── weight  [8]  float32  8
    │   └── self_attn  (192 params, float32, 768 B)
    │       ├── k_proj  (32 params, float32, 128 B)
    │       │   └── weight  [4, 8]  float32  32
    │       ├── o_proj  (64 params, float32, 256 B)
    │       │   └── weight  [8, 8]  float32  64
    │       ├── q_proj  (64 params, float32, 256 B)
    │       │   └── weight  [8, 8]  float32  64
    │       └── v_proj  (32 params, float32, 128 B)
    │           └── weight  [4, 8]  float32  32
    └── norm  (8 params, float32, 32 B)
        └── weight  [8]  float32  8
metadata format: pt
"""

GOLDEN_VIT = """\
vit/model.safetensors  safetensors  40 tensors  1,728 params  6.8 KiB
├── embeddings  (440 params, float32, 1.7 KiB)
│   ├── cls_token  [1, 1, 8]  float32  8
│   ├── position_embeddings  [1, 5, 8]  float32  40
│   └── patch_embeddings  (392 params, float32, 1.5 KiB)
│       └── projection  (392 params, float32, 1.5 KiB)
│           ├── bias  [8]  float32  8
│           └── weight  [8, 3, 4, 4]  float32  384
├── encoder  (1,200 params, float32, 4.7 KiB)
│   └── layer.0 … layer.1  2 × (600 params each, 1,200 total, float32, 4.7 KiB)
│       ├── attention  (288 params, float32, 1.1 KiB)
│       │   ├── attention  (216 params, float32, 864 B)
│       │   │   ├── key  (72 params, float32, 288 B)
│       │   │   │   ├── bias  [8]  float32  8
│       │   │   │   └── weight  [8, 8]  float32  64
│       │   │   ├── query  (72 params, float32, 288 B)
│       │   │   │   ├── bias  [8]  float32  8
│       │   │   │   └── weight  [8, 8]  float32  64
│       │   │   └── value  (72 params, float32, 288 B)
│       │   │       ├── bias  [8]  float32  8
│       │   │       └── weight  [8, 8]  float32  64
│       │   └── output  (72 params, float32, 288 B)
│       │       └── dense  (72 params, float32, 288 B)
│       │           ├── bias  [8]  float32  8
│       │           └── weight  [8, 8]  float32  64
│       ├── intermediate  (144 params, float32, 576 B)
│       │   └── dense  (144 params, float32, 576 B)
│       │       ├── bias  [16]  float32  16
│       │       └── weight  [16, 8]  float32  128
│       ├── layernorm_after  (16 params, float32, 64 B)
│       │   ├── bias  [8]  float32  8
│       │   └── weight  [8]  float32  8
│       ├── layernorm_before  (16 params, float32, 64 B)
│       │   ├── bias  [8]  float32  8
│       │   └── weight  [8]  float32  8
│       └── output  (136 params, float32, 544 B)
│           └── dense  (136 params, float32, 544 B)
│               ├── bias  [8]  float32  8
│               └── weight  [8, 16]  float32  128
├── layernorm  (16 params, float32, 64 B)
│   ├── bias  [8]  float32  8
│   └── weight  [8]  float32  8
└── pooler  (72 params, float32, 288 B)
    └── dense  (72 params, float32, 288 B)
        ├── bias  [8]  float32  8
        └── weight  [8, 8]  float32  64
metadata format: pt
"""

GOLDEN_ODD_LAYER = """\
odd.pt  pt  49 tensors  3,232 params  12.6 KiB
├── lm_head  (128 params, float32, 512 B)
│   └── weight  [16, 8]  float32  128
└── model  (3,104 params, float32, 12.1 KiB)
    ├── embed_tokens  (128 params, float32, 512 B)
    │   └── weight  [16, 8]  float32  128
    ├── layers  (2,968 params, float32, 11.6 KiB)
    │   ├── 0 … 1  2 × (592 params each, 1,184 total, float32, 4.6 KiB)
    │   │   ├── input_layernorm  (8 params, float32, 32 B)
    │   │   │   └── weight  [8]  float32  8
    │   │   ├── mlp  (384 params, float32, 1.5 KiB)
    │   │   │   ├── down_proj  (128 params, float32, 512 B)
    │   │   │   │   └── weight  [8, 16]  float32  128
    │   │   │   ├── gate_proj  (128 params, float32, 512 B)
    │   │   │   │   └── weight  [16, 8]  float32  128
    │   │   │   └── up_proj  (128 params, float32, 512 B)
    │   │   │       └── weight  [16, 8]  float32  128
    │   │   ├── post_attention_layernorm  (8 params, float32, 32 B)
    │   │   │   └── weight  [8]  float32  8
    │   │   └── self_attn  (192 params, float32, 768 B)
    │   │       ├── k_proj  (32 params, float32, 128 B)
    │   │       │   └── weight  [4, 8]  float32  32
    │   │       ├── o_proj  (64 params, float32, 256 B)
    │   │       │   └── weight  [8, 8]  float32  64
    │   │       ├── q_proj  (64 params, float32, 256 B)
    │   │       │   └── weight  [8, 8]  float32  64
    │   │       └── v_proj  (32 params, float32, 128 B)
    │   │           └── weight  [4, 8]  float32  32
    │   ├── 2  (600 params, float32, 2.3 KiB)
    │   │   ├── input_layernorm  (8 params, float32, 32 B)
    │   │   │   └── weight  [8]  float32  8
    │   │   ├── mlp  (384 params, float32, 1.5 KiB)
    │   │   │   ├── down_proj  (128 params, float32, 512 B)
    │   │   │   │   └── weight  [8, 16]  float32  128
    │   │   │   ├── gate_proj  (128 params, float32, 512 B)
    │   │   │   │   └── weight  [16, 8]  float32  128
    │   │   │   └── up_proj  (128 params, float32, 512 B)
    │   │   │       └── weight  [16, 8]  float32  128
    │   │   ├── post_attention_layernorm  (8 params, float32, 32 B)
    │   │   │   └── weight  [8]  float32  8
    │   │   └── self_attn  (200 params, float32, 800 B)
    │   │       ├── k_proj  (32 params, float32, 128 B)
    │   │       │   └── weight  [4, 8]  float32  32
    │   │       ├── o_proj  (64 params, float32, 256 B)
    │   │       │   └── weight  [8, 8]  float32  64
    │   │       ├── q_proj  (72 params, float32, 288 B)
    │   │       │   ├── bias  [8]  float32  8
    │   │       │   └── weight  [8, 8]  float32  64
    │   │       └── v_proj  (32 params, float32, 128 B)
    │   │           └── weight  [4, 8]  float32  32
    │   └── 3 … 4  2 × (592 params each, 1,184 total, float32, 4.6 KiB)
    │       ├── input_layernorm  (8 params, float32, 32 B)
    │       │   └── weight  [8]  float32  8
    │       ├── mlp  (384 params, float32, 1.5 KiB)
    │       │   ├── down_proj  (128 params, float32, 512 B)
    │       │   │   └── weight  [8, 16]  float32  128
    │       │   ├── gate_proj  (128 params, float32, 512 B)
    │       │   │   └── weight  [16, 8]  float32  128
    │       │   └── up_proj  (128 params, float32, 512 B)
    │       │       └── weight  [16, 8]  float32  128
    │       ├── post_attention_layernorm  (8 params, float32, 32 B)
    │       │   └── weight  [8]  float32  8
    │       └── self_attn  (192 params, float32, 768 B)
    │           ├── k_proj  (32 params, float32, 128 B)
    │           │   └── weight  [4, 8]  float32  32
    │           ├── o_proj  (64 params, float32, 256 B)
    │           │   └── weight  [8, 8]  float32  64
    │           ├── q_proj  (64 params, float32, 256 B)
    │           │   └── weight  [8, 8]  float32  64
    │           └── v_proj  (32 params, float32, 128 B)
    │               └── weight  [4, 8]  float32  32
    └── norm  (8 params, float32, 32 B)
        └── weight  [8]  float32  8
"""

GOLDEN_TIED_BLOCKS = """\
tied.pt  pt  26 tensors  150 params  600 B  (tied storage counted once)
├── blocks  (140 params, float32, 560 B)
│   ├── 0  (24 params, float32, 96 B)
│   │   ├── a  (20 params, float32, 80 B)
│   │   │   ├── bias  [4]  float32  4
│   │   │   └── weight  [4, 4]  float32  16  (tied)
│   │   └── b  (20 params, float32, 80 B)
│   │       ├── bias  [4]  float32  4
│   │       └── weight  [4, 4]  float32  16  = blocks.0.a.weight
│   ├── 1  (24 params, float32, 96 B)
│   │   ├── a  (20 params, float32, 80 B)
│   │   │   ├── bias  [4]  float32  4
│   │   │   └── weight  [4, 4]  float32  16  (tied)
│   │   └── b  (20 params, float32, 80 B)
│   │       ├── bias  [4]  float32  4  (tied)
│   │       └── weight  [4, 4]  float32  16  = blocks.1.a.weight
│   ├── 2 … 3  2 × (24 params each, 48 total, float32, 192 B)
│   │   ├── a  (20 params, float32, 80 B)
│   │   │   ├── bias  [4]  float32  4
│   │   │   └── weight  [4, 4]  float32  16  (tied)
│   │   └── b  (20 params, float32, 80 B)
│   │       ├── bias  [4]  float32  4
│   │       └── weight  [4, 4]  float32  16  = a.weight (in each block)
│   ├── 4  (24 params, float32, 96 B)
│   │   ├── a  (20 params, float32, 80 B)
│   │   │   ├── bias  [4]  float32  4
│   │   │   └── weight  [4, 4]  float32  16  (tied)
│   │   └── b  (20 params, float32, 80 B)
│   │       ├── bias  [4]  float32  4  = blocks.1.b.bias
│   │       └── weight  [4, 4]  float32  16  = blocks.4.a.weight
│   └── 5  (24 params, float32, 96 B)
│       ├── a  (20 params, float32, 80 B)
│       │   ├── bias  [4]  float32  4
│       │   └── weight  [4, 4]  float32  16  (tied)
│       └── b  (20 params, float32, 80 B)
│           ├── bias  [4]  float32  4
│           └── weight  [4, 4]  float32  16  = blocks.5.a.weight
└── head  (10 params, float32, 40 B)
    ├── bias  [2]  float32  2
    └── weight  [2, 4]  float32  8
"""


GOLDENS = {"GPT2_PT": GOLDEN_GPT2_PT, "LLAMA": GOLDEN_LLAMA, "VIT": GOLDEN_VIT, "ODD_LAYER": GOLDEN_ODD_LAYER,
           "TIED_BLOCKS": GOLDEN_TIED_BLOCKS}


@pytest.mark.parametrize("name", sorted(GOLDENS))
def test_golden_tree(tmp_path, run, monkeypatch, name):
    """GPT-2 (tied head), Llama and ViT collapse their layers; an odd layer breaks the run and is shown; a tie
    inside every block is shown once for the run, a tie across blocks keeps both blocks out of the run."""
    monkeypatch.chdir(tmp_path)
    assert tree(run, make(name)) == GOLDENS[name]


def test_header_counts_tied_storage_once(tmp_path, run, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = gpt2(3)
    unique = sum(p.numel() for p in model.parameters())  # torch counts the tied head once
    assert unique < sum(t.numel() for t in model.state_dict().values())
    torch.save(model.state_dict(), "m.bin")
    assert f"{unique:,} params" in tree(run, "m.bin").splitlines()[0]


def test_32_layer_sharded_llama_fits_one_screen(tmp_path, run, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = llama(32)
    model.save_pretrained("ck", max_shard_size="20KB")
    assert len(list((tmp_path / "ck").glob("*.safetensors"))) > 1
    text = tree(run, "ck/model.safetensors.index.json")
    lines = text.splitlines()
    assert len(lines) <= 40, text
    head = lines[0]
    unique = sum(p.numel() for p in model.parameters())
    assert "291 tensors" in head and f"{unique:,} params" in head
    assert any("layers.0 … layers.31  32 × (592 params each, 18,944 total, float32, 74.0 KiB)" in line for line in lines)
    modules = [line for line in lines[1:] if "(" in line]
    assert modules and all(re.search(r"\(\S+ params(?: each, \S+ total)?, float32, [\d.]+ (B|KiB|MiB)\)", m)
                           for m in modules), text


def test_expand_json_and_depth(tmp_path, run, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(gpt2(12).state_dict(), "m.bin")
    collapsed = tree(run, "m.bin")
    assert "h.0 … h.11  12 × (" in collapsed and "├── 5  (" not in collapsed
    expanded = tree(run, "m.bin", "--expand")
    assert "…" not in expanded
    assert re.findall(r"[├└]── (\d+)  \(", expanded) == [str(i) for i in range(12)]
    assert len(expanded.splitlines()) > len(collapsed.splitlines()) + 11 * 20
    doc = run("inspect", "m.bin", "--json").json()
    assert doc["num_tensors"] == len(doc["tensors"]) == 2 + 12 * 12 + 2 + 1
    depth2 = tree(run, "m.bin", "--depth", "2")
    assert "    ├── h  (" in depth2 and "…" not in depth2 and "attn" not in depth2
    depth3 = tree(run, "m.bin", "--depth", "3")
    assert "h.0 … h.11  12 ×" in depth3 and "attn" not in depth3
    assert "│   ├── attn  (" in tree(run, "m.bin", "--depth", "4")


def test_a_differing_shape_or_dtype_or_gap_breaks_the_run(tmp_path, run, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = {f"h.{i}.w": torch.zeros(2, 2) for i in range(6)}
    blocks["h.3.w"] = torch.zeros(2, 3)  # another shape
    torch.save(blocks, "shape.pt")
    assert modules(tree(run, "shape.pt")) == ["h", "0 … 2", "3", "4 … 5"]
    blocks["h.3.w"] = torch.zeros(2, 2, dtype=torch.float16)  # another dtype
    torch.save(blocks, "dtype.pt")
    assert modules(tree(run, "dtype.pt")) == ["h", "0 … 2", "3", "4 … 5"]
    del blocks["h.3.w"]  # a gap in the numbering
    torch.save(blocks, "gap.pt")
    assert modules(tree(run, "gap.pt")) == ["h", "0 … 2", "4 … 5"]


# --- property: the safetensors writer keeps order, bytes and ties ------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.bool, torch.float64]
PART = st.one_of(st.integers(0, 12).map(str), st.sampled_from(["h", "w", "bias", "weight", "ln_1", "block 1"]))


@st.composite
def state_dicts(draw):
    names = draw(st.lists(st.lists(PART, min_size=1, max_size=4).map(".".join), min_size=1, max_size=12, unique=True))
    sd: dict[str, torch.Tensor] = {}
    for name in names:
        if sd and draw(st.booleans()) and draw(st.booleans()):  # a tie to an earlier tensor, sometimes a view
            base = sd[draw(st.sampled_from(sorted(sd)))]
            sd[name] = base[1:] if base.dim() == 1 and base.numel() > 1 and draw(st.booleans()) else base
            continue
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        dtype = draw(st.sampled_from(DTYPES))
        sd[name] = (torch.rand(shape) * 100 - 50).to(dtype)
    return sd


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sd=state_dicts())
def test_safetensors_write_read_keeps_order_bytes_and_ties(tmp_path, sd):
    from paramtool.formats import safetensors_fmt

    path = str(tmp_path / "p.safetensors")
    safetensors_fmt.save(sd, None, path)
    back, _, _ = safetensors_fmt.load(path)
    listed, _, _ = safetensors_fmt.read_tree(path)
    assert list(back) == list(listed) == list(sd)
    for name, t in sd.items():
        got = back[name]
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got.contiguous().view(-1).view(torch.uint8), t.contiguous().view(-1).view(torch.uint8))
    for a in sd:
        for b in sd:
            same = sd[a].untyped_storage().data_ptr() == sd[b].untyped_storage().data_ptr() and sd[a].numel() and sd[b].numel()
            if same and sd[a].data_ptr() == sd[b].data_ptr() and sd[a].shape == sd[b].shape:
                assert back[a].data_ptr() == back[b].data_ptr()  # an alias comes back as an alias
    assert sorted(load_file(path)) == sorted(header_names(pathlib.Path(path)))  # safetensors itself reads it

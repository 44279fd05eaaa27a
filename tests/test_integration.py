"""Surgery on model directories, as transformers writes and reads them: resize follows config.json (its ties,
its vocab_size), and rename, drop and convert --dtype keep every sidecar byte for byte, with -o NEWDIR and
--in-place, so that from_pretrained loads the result."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")


def ok(r):
    assert r.exit_code == 0, r.stderr
    return r


def gpt2_dir(path):
    """A tied GPT-2: save_pretrained leaves lm_head.weight out of the file (config.json ties it)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text('{"model": {"type": "BPE"}}\n')  # a sidecar of another kind
    return model


def llama_dir(path, **kw):
    """An untied Llama (tie_word_embeddings false): model.embed_tokens.weight and lm_head.weight both stored."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(path, **kw)
    (path / "tokenizer.json").write_text('{"model": {"type": "BPE"}}\n')
    return model


def load_clean(cls, directory):
    model, info = cls.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


def sidecars(directory) -> dict[str, bytes]:
    return {n: (directory / n).read_bytes() for n in sorted(os.listdir(directory))
            if not n.endswith((".safetensors", ".bin", ".index.json"))}


def cast_config(before: dict[str, bytes], dtype: str) -> dict[str, bytes]:
    """The sidecars after a cast to ``dtype``: config.json's dtype entries say it (issue 26), nothing else moves."""
    config = json.loads(before["config.json"])
    for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
        config[key] = dtype
    return {**before, "config.json": (json.dumps(config, indent=2) + "\n").encode()}


def stored(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def same_config_but_vocab(new: bytes, old: bytes, vocab: int) -> None:
    assert json.loads(new) == {**json.loads(old), "vocab_size": vocab}


# ---------------------------------------------------------------- resize follows config.json


@pytest.mark.parametrize("in_place", [False, True])
def test_resize_tied_gpt2_directory(tmp_path, run, in_place):
    model = gpt2_dir(tmp_path / "hf")
    before = sidecars(tmp_path / "hf")
    if in_place:
        r = ok(run("resize", tmp_path / "hf", "transformer.wte.weight", "--rows", "120", "--in-place"))
        new = tmp_path / "hf"
    else:
        r = ok(run("resize", tmp_path / "hf", "transformer.wte.weight", "--rows", "120", "-o", tmp_path / "new"))
        new = tmp_path / "new"
        assert sidecars(tmp_path / "hf") == before  # the source as it was
    assert "tied: lm_head.weight changed with transformer.wte.weight" in r.stderr
    after = sidecars(new)
    same_config_but_vocab(after.pop("config.json"), before.pop("config.json"), 120)
    assert after == before  # every other sidecar byte for byte
    assert "lm_head.weight" not in stored(new / "model.safetensors")  # still left to config.json
    grown = load_clean(transformers.GPT2LMHeadModel, new)
    assert grown.config.vocab_size == 120 and grown.lm_head.weight.shape == (120, 32)
    assert grown.lm_head.weight.data_ptr() == grown.transformer.wte.weight.data_ptr()  # tied
    old = model.transformer.wte.weight.detach()
    assert torch.equal(grown.transformer.wte.weight[:100], old)
    assert torch.allclose(grown.transformer.wte.weight[100:], old.mean(0).expand(20, 32))
    assert grown(torch.tensor([[1, 119]])).logits.shape == (1, 2, 120)


def test_resize_by_the_head_name_of_a_tied_directory(tmp_path, run):
    """lm_head.weight is not stored: config.json says it is transformer.wte.weight, which is resized."""
    gpt2_dir(tmp_path / "hf")
    ok(run("resize", tmp_path / "hf", "lm_head.weight", "--rows", "90", "-o", tmp_path / "new"))
    small = load_clean(transformers.GPT2LMHeadModel, tmp_path / "new")
    assert small.config.vocab_size == 90 and small.transformer.wte.weight.shape == (90, 32)


@pytest.mark.parametrize("in_place", [False, True])
def test_resize_untied_llama_resizes_both_embeddings(tmp_path, run, in_place):
    """As resize_token_embeddings does: the input embedding and the separate output head, each from its own
    rows' mean; config.json's vocab_size follows."""
    model = llama_dir(tmp_path / "hf")
    before = sidecars(tmp_path / "hf")
    new = tmp_path / "hf" if in_place else tmp_path / "new"
    out = ["--in-place"] if in_place else ["-o", new]
    ok(run("resize", tmp_path / "hf", "model.embed_tokens.weight", "--rows", "128", *out))
    after = sidecars(new)
    same_config_but_vocab(after.pop("config.json"), before.pop("config.json"), 128)
    assert after == before
    grown = load_clean(transformers.LlamaForCausalLM, new)
    assert grown.config.vocab_size == 128 and not grown.config.tie_word_embeddings
    assert grown.lm_head.weight.shape == grown.model.embed_tokens.weight.shape == (128, 32)
    assert grown.lm_head.weight.data_ptr() != grown.model.embed_tokens.weight.data_ptr()  # still untied
    for got, old in ((grown.lm_head.weight, model.lm_head.weight), (grown.model.embed_tokens.weight,
                                                                    model.model.embed_tokens.weight)):
        assert torch.equal(got[:100], old.detach()) and torch.allclose(got[100:], old.detach().mean(0).expand(28, 32))


def test_resize_sharded_directory_in_place_updates_config(tmp_path, run):
    """A sharded directory whose config.json changes is rewritten whole, in one step (shards, index, sidecars)."""
    llama_dir(tmp_path / "hf", max_shard_size="40KB")
    names = sorted(os.listdir(tmp_path / "hf"))
    assert "model.safetensors.index.json" in names
    before = sidecars(tmp_path / "hf")
    ok(run("resize", tmp_path / "hf", "model.embed_tokens.weight", "--rows", "110", "--in-place"))
    assert sorted(os.listdir(tmp_path / "hf")) == names  # the same shard files and index
    after = sidecars(tmp_path / "hf")
    same_config_but_vocab(after.pop("config.json"), before.pop("config.json"), 110)
    assert after == before
    grown = load_clean(transformers.LlamaForCausalLM, tmp_path / "hf")
    assert grown.lm_head.weight.shape == (110, 32)


def test_resize_of_another_tensor_leaves_config_alone(tmp_path, run):
    gpt2_dir(tmp_path / "hf")
    before = sidecars(tmp_path / "hf")
    ok(run("resize", tmp_path / "hf", "transformer.wpe.weight", "--rows", "80", "-o", tmp_path / "new"))
    assert sidecars(tmp_path / "new") == before


# ---------------------------------------------------------------- rename, drop, convert --dtype keep the sidecars


def copy_of(src, dst):
    shutil.copytree(src, dst)
    return dst


def write_to(run, command, src, in_place, dst, *args):
    """``command SRC ARGS`` written to ``dst`` (-o NEWDIR), or in place into a copy of SRC made at ``dst``."""
    if in_place:
        ok(run(command, copy_of(src, dst), *args, "--in-place"))
    else:
        r = ok(run(command, src, *args, "-o", dst))
        assert "(directory)" in r.stderr  # written as a model directory, not as a bare weights file
    return dst


@pytest.mark.parametrize("in_place", [False, True])
def test_rename_directory_and_back_loads(tmp_path, run, in_place):
    model = gpt2_dir(tmp_path / "hf")
    before = sidecars(tmp_path / "hf")
    bare = write_to(run, "rename", tmp_path / "hf", in_place, tmp_path / "bare", "--strip-prefix", "transformer.")
    assert sidecars(bare) == before
    assert "wte.weight" in stored(bare / "model.safetensors") and "transformer.wte.weight" not in stored(bare / "model.safetensors")
    back = write_to(run, "rename", bare, in_place, tmp_path / "back", "s/^/transformer./")
    assert sidecars(back) == before
    assert sorted(os.listdir(back)) == sorted(os.listdir(tmp_path / "hf"))
    loaded = load_clean(transformers.GPT2LMHeadModel, back)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize("in_place", [False, True])
def test_drop_directory_loads_without_the_dropped_name(tmp_path, run, in_place):
    model = llama_dir(tmp_path / "hf")
    before = sidecars(tmp_path / "hf")
    gone = "model.layers.1.mlp.gate_proj.weight"
    out = write_to(run, "drop", tmp_path / "hf", in_place, tmp_path / "out", "--layer", gone)
    assert sidecars(out) == before
    assert gone not in stored(out / "model.safetensors")
    loaded, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == {gone} and not info["unexpected_keys"] and not info["mismatched_keys"]
    for name, value in model.state_dict().items():
        if name != gone:
            assert torch.equal(loaded.state_dict()[name], value), name


@pytest.mark.parametrize("in_place", [False, True])
def test_convert_dtype_directory_loads(tmp_path, run, in_place):
    model = llama_dir(tmp_path / "hf")
    before = sidecars(tmp_path / "hf")
    out = write_to(run, "convert", tmp_path / "hf", in_place, tmp_path / "out", "--dtype", "bf16", "--keep-dtype", "*norm*")
    assert sidecars(out) == cast_config(before, "bfloat16")  # config.json: only its dtype follows the cast
    weights = stored(out / "model.safetensors")
    assert weights["model.norm.weight"].dtype == torch.float32 and weights["lm_head.weight"].dtype == torch.bfloat16
    loaded = load_clean(transformers.LlamaForCausalLM, out)
    for name, value in model.state_dict().items():
        want = value if "norm" in name else value.to(torch.bfloat16).float()
        assert torch.equal(loaded.state_dict()[name].float(), want), name


@pytest.mark.parametrize("in_place", [False, True])
def test_pytorch_model_bin_directory(tmp_path, run, in_place):
    """A directory with pytorch_model.bin (torch.save of the state dict): renamed and cast, it stays a .bin
    that from_pretrained loads, beside the same sidecars."""
    model = llama_dir(tmp_path / "st")
    d = tmp_path / "hf"
    d.mkdir()
    for name, data in sidecars(tmp_path / "st").items():
        (d / name).write_bytes(data)
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    before = sidecars(d)
    bare = write_to(run, "rename", d, in_place, tmp_path / "bare", "--strip-prefix", "model.")
    back = write_to(run, "rename", bare, in_place, tmp_path / "back", "s/^(?!lm_head)/model./")
    cast = write_to(run, "convert", back, in_place, tmp_path / "cast", "--dtype", "fp16")
    for out in (bare, back, cast):
        assert sorted(os.listdir(out)) == sorted(os.listdir(d))
        assert sidecars(out) == (cast_config(before, "float16") if out is cast else before)
    saved = torch.load(cast / "pytorch_model.bin", weights_only=True)
    assert list(saved) == list(model.state_dict()) and saved["lm_head.weight"].dtype == torch.float16
    loaded = load_clean(transformers.LlamaForCausalLM, cast)
    assert torch.equal(loaded.model.embed_tokens.weight.half(), model.model.embed_tokens.weight.half())


def test_sharded_surgery_in_place_keeps_an_unchanged_index_byte_for_byte(tmp_path, run):
    from safetensors.torch import save_file

    d = tmp_path / "ck"
    d.mkdir()
    weight_map = {}
    for i, name in enumerate(["a.weight", "b.weight"]):
        save_file({name: torch.full((4, 4), float(i))}, str(d / f"part{i}.safetensors"))
        weight_map[name] = f"part{i}.safetensors"
    text = json.dumps({"weight_map": weight_map, "metadata": {"total_size": 128}})  # not as paramtool writes it
    (d / "model.safetensors.index.json").write_text(text)
    r = ok(run("rename", d, "s/^nothing//", "--in-place"))
    assert "matched no tensor name" in r.stderr
    assert (d / "model.safetensors.index.json").read_text() == text
    ok(run("drop", d, "--layer", "a.weight", "--in-place"))
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert index == {"weight_map": {"b.weight": "part1.safetensors"}, "metadata": {"total_size": 64}}
    assert sorted(os.listdir(d)) == ["model.safetensors.index.json", "part1.safetensors"]

"""Checkpoints as transformers writes them: model directories (one file, sharded safetensors, pytorch_model.bin,
sharded bin as transformers 4 wrote it), ties declared by config.json, and outputs that from_pretrained loads
with no missing or unexpected keys."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

SIDECARS = {"tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}\n',
            "README.md": "# a model card, ünïcode\r\n".encode(),
            "special_tokens_map.json": b'{"eos_token": "</s>"}'}


def _gpt2():
    c = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
                                bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(c)


def _llama(tied: bool):
    c = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=100, tie_word_embeddings=tied,
                                 bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(c)


def _bert():
    c = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64)
    return transformers.BertForMaskedLM(c)


def _t5():
    c = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                              decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(c)


def _add_sidecars(d: pathlib.Path) -> None:
    for name, data in SIDECARS.items():
        (d / name).write_bytes(data)


def _save_bin(model, d: pathlib.Path) -> None:
    """pytorch_model.bin as transformers 4 wrote it: torch.save of the state dict (tied names share storage)."""
    model.config.save_pretrained(d)
    torch.save(model.state_dict(), d / "pytorch_model.bin")


def _save_sharded_bin(model, d: pathlib.Path, shards: int = 3) -> None:
    """Shards and pytorch_model.bin.index.json in transformers 4's naming; a tied name left out as it did."""
    model.config.save_pretrained(d)
    sd = {k: v for k, v in model.state_dict().items() if k not in model._tied_weights_keys or not model.config.tie_word_embeddings}
    keys = list(sd)
    step = -(-len(keys) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k].clone() for k in keys[i * step:(i + 1) * step]}
        torch.save(part, d / name)
        weight_map.update((k, name) for k in part)
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Each checkpoint kind once per module (read-only for the tests): name -> (directory, model class, state dict)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hub")
    gpt2, llama_tied, llama_untied, bert, t5 = _gpt2(), _llama(True), _llama(False), _bert(), _t5()
    out = {}

    def add(name, model, save):
        d = root / name
        d.mkdir()
        save(model, d)
        _add_sidecars(d)
        out[name] = (d, type(model), {k: v.detach().clone() for k, v in model.state_dict().items()})

    add("gpt2", gpt2, lambda m, d: m.save_pretrained(d))
    add("gpt2-sharded", gpt2, lambda m, d: m.save_pretrained(d, max_shard_size="50KB"))
    add("gpt2-bin", gpt2, _save_bin)
    add("gpt2-sharded-bin", gpt2, _save_sharded_bin)
    add("llama-tied", llama_tied, lambda m, d: m.save_pretrained(d))
    add("llama-untied", llama_untied, lambda m, d: m.save_pretrained(d))
    add("llama-untied-sharded-bin", llama_untied, _save_sharded_bin)
    add("bert", bert, lambda m, d: m.save_pretrained(d))
    add("t5", t5, lambda m, d: m.save_pretrained(d))
    return out


def _load(cls, d):
    """from_pretrained, asserting nothing was missing, unexpected or mismatched."""
    model, info = cls.from_pretrained(d, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info
    return {k: v.detach() for k, v in model.state_dict().items()}


def _sidecars_identical(src: pathlib.Path, dst: pathlib.Path) -> None:
    for name in list(SIDECARS) + ["config.json"]:
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name


def _bit_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


# --- reading -----------------------------------------------------------------------------------------

CONFIG_GROUPS = {
    "gpt2": [["lm_head.weight", "transformer.wte.weight"]],
    "gpt2-sharded": [["lm_head.weight", "transformer.wte.weight"]],
    "llama-tied": [["lm_head.weight", "model.embed_tokens.weight"]],
    "llama-untied": [],
    "bert": [["bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"],
             ["cls.predictions.bias", "cls.predictions.decoder.bias"]],
    "t5": [["decoder.embed_tokens.weight", "encoder.embed_tokens.weight", "lm_head.weight", "shared.weight"]],
}


@pytest.mark.parametrize("name", list(CONFIG_GROUPS))
def test_config_ties_listed(models, run, name):
    d, _, _ = models[name]
    r = run("ties", d, "--json")
    assert r.exit_code == 0 and "warning" not in r.stderr, r.stderr
    assert [g["names"] for g in r.json()["groups"]] == CONFIG_GROUPS[name]
    assert all(g["source"] == "config" and g["kind"] == "alias" for g in r.json()["groups"])
    doc = run("inspect", d, "--json").json()
    assert doc["format"] == ("sharded" if "sharded" in name else "directory")
    by_name = {t["name"]: t for t in doc["tensors"]}
    stored = set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]) if "sharded" in name \
        else set(safe_open(str(d / "model.safetensors"), "pt").keys())
    for group in CONFIG_GROUPS[name]:
        absent = [n for n in group if n not in stored]
        kept = [n for n in group if n in stored]
        assert len(kept) == 1 and absent
        for n in absent:
            assert by_name[n]["tied_to"] == kept[0] and by_name[n]["stored"] is False
        assert "stored" not in by_name[kept[0]]
    assert doc["num_tensors"] == len(stored) + sum(len(g) - 1 for g in CONFIG_GROUPS[name])
    assert ("not stored" in run("inspect", d).stdout) == bool(CONFIG_GROUPS[name])
    for group in CONFIG_GROUPS[name]:  # show reads a tied name that is not stored as what it is tied to
        shown = {n: run("show", d, n, "--json").json()["values"] for n in group}
        assert all(v == shown[group[0]] for v in shown.values())


@pytest.mark.parametrize("name", ["gpt2", "gpt2-sharded"])
def test_positions_count_the_config_tied_head(models, run, name):
    """The tree lists the head that config.json ties (listed, not stored) beside ``transformer``, and positions
    count what the tree shows: ``[0]`` is ``lm_head`` and ``[1][0][1]`` is ``transformer.h.1``, as in the
    ``.bin`` that stores the head."""
    d, _, _ = models[name]
    r = run("inspect", d, "--layer", "[1][0][1]", "--json")
    assert r.exit_code == 0, r.stderr
    assert {t["name"].rsplit(".", 2)[0] for t in r.json()["tensors"]} >= {"transformer.h.1.attn", "transformer.h.1.mlp"}
    assert all(t["name"].startswith("transformer.h.1.") for t in r.json()["tensors"])
    assert [t["name"] for t in run("inspect", d, "--layer", "[0]", "--json").json()["tensors"]] == ["lm_head.weight"]
    assert [t["name"] for t in run("inspect", d, "--layer", "lm_head", "--json").json()["tensors"]] == ["lm_head.weight"]
    # the --json fast path (launch.py) agrees
    fast = subprocess.run([sys.executable, "-m", "paramtool", "inspect", str(d), "--layer", "[1][0][1]", "--json"],
                          capture_output=True, text=True)
    assert fast.returncode == 0 and json.loads(fast.stdout)["tensors"][0]["name"].startswith("transformer.h.1."), fast.stderr


def test_bin_directories(models, run):
    r = run("ties", models["gpt2-bin"][0], "--json")  # torch.save keeps the tie as shared storage
    assert r.json()["groups"] == [{"names": ["lm_head.weight", "transformer.wte.weight"], "kind": "alias", "source": "storage"}]
    r = run("inspect", models["gpt2-sharded-bin"][0], "--json")
    assert r.exit_code == 0 and r.json()["format"] == "sharded"
    assert {t["name"]: t["tied_to"] for t in r.json()["tensors"]}["lm_head.weight"] == "transformer.wte.weight"
    assert run("ties", models["llama-untied-sharded-bin"][0], "--json").json()["groups"] == []


def test_stored_pair_that_differs_warns(models, run, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(models["llama-untied"][0], d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    r = run("ties", d, "--json")
    assert r.exit_code == 0 and r.json()["groups"] == []
    assert "lm_head.weight" in r.stderr and "differ" in r.stderr
    model, _ = models["llama-untied"][1].from_pretrained(d, output_loading_info=True)
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # what the warning says transformers does
    sd = load_file(str(d / "model.safetensors"))
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    r = run("ties", d, "--json")
    assert r.exit_code == 0 and "warning" not in r.stderr
    r = run("set", d, "lm_head.weight[0, 0] = 5", "-o", tmp_path / "out")  # changes one of an equal, tied pair
    assert r.exit_code == 0 and "only 'lm_head.weight' changes" in r.stderr


def test_edit_names_the_config_tied_names(models, run):
    r = run("init", models["t5"][0], "--scheme", "zeros", "--layer", "shared", "--dry-run", "--json")
    assert r.exit_code == 0
    assert r.json()["ties"] == {"shared.weight": ["lm_head.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]}


def test_unmatched_declaration_warns(tmp_path, run):
    d = tmp_path / "m"
    d.mkdir()
    save_file({"emb.weight": torch.zeros(10, 4), "head.weight": torch.zeros(10, 4)}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "mystery", "tie_word_embeddings": True,
                                               "vocab_size": 10, "hidden_size": 4}))
    r = run("inspect", d, "--json")
    assert r.exit_code == 0 and "mystery" in r.stderr and "no tie assumed" in r.stderr
    assert all(t["tied_to"] is None for t in r.json()["tensors"])
    r = run("ties", d, "--json")
    assert r.json()["groups"] == [] and "no tie assumed" in r.stderr


def test_several_weight_files_is_an_error(tmp_path, run):
    d = tmp_path / "m"
    d.mkdir()
    save_file({"a": torch.zeros(2)}, str(d / "encoder.safetensors"))
    torch.save({"a": torch.zeros(2)}, d / "other.pt")
    (d / "config.json").write_text("{}")
    r = run("inspect", d)
    assert r.exit_code == 1 and r.stderr.count("error:") == 1 and r.stderr.count("\n") == 1
    assert "encoder.safetensors" in r.stderr and "other.pt" in r.stderr


# --- writing -----------------------------------------------------------------------------------------

WRITES = {
    "init": ["init", "--scheme", "zeros", "--layer", "{module}", "--param", "all"],
    "set": ["set", "{edit}"],
    "convert": ["convert", "--format", "{other}"],
}
EDITED = {"gpt2": "transformer.h.1.ln_1.bias", "llama-tied": "model.norm.weight", "llama-untied": "model.norm.weight",
          "bert": "bert.encoder.layer.0.output.dense.bias", "t5": "encoder.final_layer_norm.weight"}


@pytest.mark.parametrize("name", ["gpt2", "gpt2-sharded", "gpt2-bin", "gpt2-sharded-bin", "llama-tied", "llama-untied",
                                  "llama-untied-sharded-bin", "bert", "t5"])
@pytest.mark.parametrize("command", list(WRITES))
def test_outputs_load_with_from_pretrained(models, run, tmp_path, name, command):
    src, cls, before = models[name]
    base = name.replace("-sharded", "").replace("-bin", "")
    edited = EDITED.get(base, "model.norm.weight")
    other = "pt" if (src / "model.safetensors").exists() or (src / "model.safetensors.index.json").exists() else "safetensors"
    module = edited.rsplit(".", 1)[0]
    args = [a.format(edit=f"{edited}[0] = 7", other=other, module=module) for a in WRITES[command]]
    out = tmp_path / "out"
    r = run(args[0], src, *args[1:], "-o", out)
    assert r.exit_code == 0, r.stderr
    _sidecars_identical(src, out)
    weights = sorted(p.name for p in out.iterdir() if p.suffix in (".bin", ".safetensors") or p.name.endswith("index.json"))
    sharded = "sharded" in name
    fmt = other if command == "convert" else ("safetensors" if "bin" not in name else "pt")
    if sharded:
        stem, ext = ("model", ".safetensors") if fmt == "safetensors" else ("pytorch_model", ".bin")
        shards = [w for w in weights if not w.endswith(".json")]
        assert shards == [f"{stem}-{i:05d}-of-{len(shards):05d}{ext}" for i in range(1, len(shards) + 1)]
        assert f"{stem}{ext}.index.json" in weights and len(shards) > 1
    else:
        assert weights == ["model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"]
    after = _load(cls, out)
    assert set(after) == set(before)
    for k, v in before.items():
        if command == "init" and k.rsplit(".", 1)[0] == module:
            assert not after[k].any(), k
        elif command == "set" and k == edited:
            assert after[k][0] == 7 and torch.equal(after[k][1:], v[1:])
        else:
            assert _bit_identical(after[k], v), k


def test_sharded_index_total_size(models, run, tmp_path):
    for src, fmt, stem, ext in [(models["gpt2-sharded-bin"][0], "safetensors", "model", ".safetensors"),
                                (models["gpt2-sharded"][0], "pt", "pytorch_model", ".bin")]:
        out = tmp_path / fmt
        assert run("convert", src, "-o", out, "--format", fmt).exit_code == 0
        index = json.loads((out / f"{stem}{ext}.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert files == [f"{stem}-{i:05d}-of-00003{ext}" for i in (1, 2, 3)]
        stored = {}
        for f in files:
            part = load_file(str(out / f)) if fmt == "safetensors" else torch.load(out / f, weights_only=True)
            stored.update(part)
            if fmt == "safetensors":
                assert safe_open(str(out / f), "pt").metadata()["format"] == "pt"
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
        _load(models["gpt2"][1], out)


def test_max_shard_size_reshards(models, run, tmp_path):
    src, cls, before = models["gpt2"]
    out = tmp_path / "out"
    r = run("convert", src, "-o", out, "--max-shard-size", "40KB")
    assert r.exit_code == 0, r.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    for f in files:
        tensors = load_file(str(out / f))
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 40_000 or len(tensors) == 1
    _sidecars_identical(src, out)
    after = _load(cls, out)
    assert all(_bit_identical(after[k], v) for k, v in before.items())
    # back to fewer, larger shards (and pt), from the sharded directory
    again = tmp_path / "again"
    assert run("convert", out, "-o", again, "--format", "pt", "--max-shard-size", "5GB").exit_code == 0
    assert sorted(p.name for p in again.iterdir() if p.suffix == ".bin") == ["pytorch_model.bin"]
    assert not list(again.glob("*.index.json"))
    _load(cls, again)


def test_max_shard_size_shards_a_single_file(tmp_path, run):
    sd = {f"layer.{i}.weight": torch.randn(64, 64) for i in range(4)}  # 16 KiB each
    save_file(sd, str(tmp_path / "m.safetensors"))
    r = run("set", tmp_path / "m.safetensors", "layer.3.weight[0, 0] = 1", "-o", tmp_path / "d", "--max-shard-size", "40KB")
    assert r.exit_code == 0, r.stderr
    index = json.loads((tmp_path / "d" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"layer.0.weight": "model-00001-of-00002.safetensors",
                                   "layer.1.weight": "model-00001-of-00002.safetensors",
                                   "layer.2.weight": "model-00002-of-00002.safetensors",
                                   "layer.3.weight": "model-00002-of-00002.safetensors"}
    assert index["metadata"]["total_size"] == 4 * 64 * 64 * 4
    assert load_file(str(tmp_path / "d" / "model-00002-of-00002.safetensors"))["layer.3.weight"][0, 0] == 1


@pytest.mark.parametrize("text, size", [("500MB", 500 * 10**6), ("5GB", 5 * 10**9), ("200KB", 200_000),
                                        ("2GiB", 2 * 2**30), ("10MiB", 10 * 2**20), ("1kib", 1024), ("4096", 4096),
                                        ("8Mb", 10**6)])
def test_parse_size_as_transformers(text, size):
    from paramtool.formats.modeldir import parse_size

    assert parse_size(text) == size
    from transformers.utils.hub import convert_file_size_to_int

    assert convert_file_size_to_int(text if not text.isdigit() else int(text)) == size


def test_max_shard_size_usage_errors(tmp_path, run):
    save_file({"a": torch.zeros(4)}, str(tmp_path / "m.safetensors"))
    for args in (["--max-shard-size", "lots", "-o", tmp_path / "d"],
                 ["--max-shard-size", "5GB", "-o", tmp_path / "x.safetensors"],
                 ["--max-shard-size", "5GB", "--in-place"]):
        r = run("convert", tmp_path / "m.safetensors", *args)
        assert r.exit_code == 2 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr


def test_in_place_rewrites_only_the_weights(models, run, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(models["llama-tied"][0], d)
    stamps = {p.name: os.stat(p).st_mtime_ns for p in d.iterdir() if p.name != "model.safetensors"}
    r = run("set", d, "model.norm.weight[:] = 2", "--in-place")
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in d.iterdir()) == sorted(list(stamps) + ["model.safetensors"])
    assert {p.name: os.stat(p).st_mtime_ns for p in d.iterdir() if p.name != "model.safetensors"} == stamps
    after = _load(models["llama-tied"][1], d)
    assert (after["model.norm.weight"] == 2).all()
    assert "lm_head.weight" not in safe_open(str(d / "model.safetensors"), "pt").keys()


def test_convert_bin_file_to_safetensors_loads(models, run, tmp_path):
    src, cls, before = models["gpt2-bin"]
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(src / "config.json", d)
    r = run("convert", src / "pytorch_model.bin", d / "model.safetensors")
    assert r.exit_code == 0, r.stderr
    meta = safe_open(str(d / "model.safetensors"), "pt").metadata()
    assert meta["format"] == "pt" and meta["lm_head.weight"] == "transformer.wte.weight"
    after = _load(cls, d)
    assert all(_bit_identical(after[k], v) for k, v in before.items())


def test_format_metadata_on_every_safetensors_write(tmp_path, run):
    save_file({"w": torch.ones(3)}, str(tmp_path / "bare.safetensors"))  # no metadata at all
    assert run("set", tmp_path / "bare.safetensors", "w[0] = 2", "-o", tmp_path / "a.safetensors").exit_code == 0  # streamed
    assert safe_open(str(tmp_path / "a.safetensors"), "pt").metadata()["format"] == "pt"
    assert load_file(str(tmp_path / "a.safetensors"))["w"].tolist() == [2, 1, 1]
    save_file({"w": torch.ones(3)}, str(tmp_path / "tf.safetensors"), metadata={"format": "tf", "note": "kept"})
    assert run("set", tmp_path / "tf.safetensors", "w[0] = 2", "-o", tmp_path / "b.safetensors").exit_code == 0
    meta = safe_open(str(tmp_path / "b.safetensors"), "pt").metadata()
    assert (meta["format"], meta["note"]) == ("tf", "kept")
    # safetensors -> pt -> safetensors: "format" comes back
    assert run("convert", tmp_path / "a.safetensors", tmp_path / "a.pt").exit_code == 0
    assert run("convert", tmp_path / "a.pt", tmp_path / "c.safetensors").exit_code == 0
    assert safe_open(str(tmp_path / "c.safetensors"), "pt").metadata()["format"] == "pt"


def test_trainer_directory_picks_the_library_file(models, run, tmp_path):
    """A Trainer checkpoint directory: model.safetensors is the weights; optimizer.pt, training_args.bin go along."""
    d = tmp_path / "checkpoint-2"
    shutil.copytree(models["llama-untied"][0], d)
    torch.save({"state": {}, "param_groups": []}, d / "optimizer.pt")
    (d / "training_args.bin").write_bytes(b"\x80\x04N.")
    r = run("inspect", d, "--json")
    assert r.exit_code == 0 and r.json()["num_tensors"] == len(models["llama-untied"][2])
    assert run("convert", d, "-o", tmp_path / "out", "--format", "pt").exit_code == 0
    for name in ("optimizer.pt", "training_args.bin"):
        assert (tmp_path / "out" / name).read_bytes() == (d / name).read_bytes()
    assert not (tmp_path / "out" / "model.safetensors").exists()
    _load(models["llama-untied"][1], tmp_path / "out")
    (d / "pytorch_model.bin").write_bytes((tmp_path / "out" / "pytorch_model.bin").read_bytes())
    r = run("inspect", d)  # two library files: which one is meant is not for paramtool to guess
    assert r.exit_code == 1 and "model.safetensors" in r.stderr and "pytorch_model.bin" in r.stderr


def test_embedding_width_and_shape_checked(tmp_path, run):
    """ALBERT's embedding is [vocab_size, embedding_size], not hidden_size; a shape the config does not
    describe is a warning and no tie."""
    d = tmp_path / "albert"
    d.mkdir()
    save_file({"albert.embeddings.word_embeddings.weight": torch.randn(10, 4), "predictions.bias": torch.zeros(10)},
              str(d / "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": "albert", "vocab_size": 10, "hidden_size": 8, "embedding_size": 4}
    (d / "config.json").write_text(json.dumps(config))
    r = run("ties", d, "--json")
    assert r.exit_code == 0 and "warning" not in r.stderr
    assert [g["names"] for g in r.json()["groups"]] == [
        ["albert.embeddings.word_embeddings.weight", "predictions.decoder.weight"],
        ["predictions.bias", "predictions.decoder.bias"]]
    (d / "config.json").write_text(json.dumps({**config, "vocab_size": 12}))
    r = run("ties", d, "--json")
    assert "no tie assumed" in r.stderr and [g["names"] for g in r.json()["groups"]] == [
        ["predictions.bias", "predictions.decoder.bias"]]
    (d / "config.json").write_text("{not json")
    r = run("inspect", d, "--json")
    assert r.exit_code == 0 and "config.json" in r.stderr and r.json()["num_tensors"] == 2


def test_model_directory_listing_imports_no_torch(models):
    from conftest import listing_without_torch

    for name in ("gpt2", "gpt2-sharded", "t5"):
        p = listing_without_torch(models[name][0], "ties")
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["groups"][0]["source"] == "config"


def test_sharded_same_format_keeps_its_shards(models, run, tmp_path):
    src = models["gpt2-sharded"][0]
    r = run("convert", src, "-o", tmp_path / "out", "--format", "safetensors")
    assert r.exit_code == 0, r.stderr
    for p in src.iterdir():
        assert (tmp_path / "out" / p.name).read_bytes() == p.read_bytes(), p.name
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in src.iterdir())


def test_output_inside_the_source_directory(models, run, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(models["gpt2"][0], d)
    r = run("convert", d, "-o", d / "as-pt", "--format", "pt")
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in (d / "as-pt").iterdir()) == sorted(
        ["pytorch_model.bin", "config.json", "generation_config.json"] + list(SIDECARS))
    _load(models["gpt2"][1], d / "as-pt")


def test_config_without_the_key_ties_as_transformers_4(models, run, tmp_path):
    """transformers 4 wrote tie_word_embeddings only when it differed from its default, True."""
    d = tmp_path / "m"
    shutil.copytree(models["gpt2"][0], d)
    config = json.loads((d / "config.json").read_text())
    del config["tie_word_embeddings"]
    (d / "config.json").write_text(json.dumps(config))
    assert [g["source"] for g in run("ties", d, "--json").json()["groups"]] == ["config"]
    (d / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    assert run("ties", d, "--json").json()["groups"] == []
    (d / "config.json").write_text("[" * 100_000 + "]" * 100_000)  # nested past the JSON reader's depth
    r = run("ties", d, "--json")
    assert r.exit_code == 0 and r.json()["groups"] == [] and "config.json" in r.stderr


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_resharding_keeps_tied_names_in_one_shard(run, tmp_path, fmt):
    spec = "nn:let s = Linear(64, 64) in Sequential(Linear(64, 64), s, ReLU(), s)"  # 1 and 3 are one module
    r = run("convert", spec, "-o", tmp_path / "d", "--format", fmt, "--max-shard-size", "17KB")
    assert r.exit_code == 0, r.stderr
    stem, ext = ("model", ".safetensors") if fmt == "safetensors" else ("pytorch_model", ".bin")
    index = json.loads((tmp_path / "d" / f"{stem}{ext}.index.json").read_text())
    shard_of = index["weight_map"]
    assert shard_of["1.weight"] == shard_of["3.weight"] and shard_of["1.bias"] == shard_of["3.bias"]
    assert index["metadata"]["total_size"] == 2 * (64 * 64 + 64) * 4  # the tied module counted once
    assert run("ties", tmp_path / "d", "--json").json()["groups"] == [
        {"names": ["1.bias", "3.bias"], "kind": "alias", "source": "metadata" if fmt == "safetensors" else "storage"},
        {"names": ["1.weight", "3.weight"], "kind": "alias", "source": "metadata" if fmt == "safetensors" else "storage"}]

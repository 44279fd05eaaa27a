"""Checkpoint surgery: rename, drop, convert --dtype and resize, on pt, safetensors, sharded and training
checkpoints, and a transformers model that must load the result without missing or unexpected keys."""
from __future__ import annotations

import json
import zipfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_sharded import make_sharded
from torch import nn

from paramtool import surgery


def tied_model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 10, bias=False))
    m[3].weight = m[0].weight
    return m


def prefixed_pt(path, prefix="_orig_mod."):
    sd = tied_model().state_dict()
    torch.save({prefix + k: v for k, v in sd.items()}, path)
    return sd


def training_ckpt(path):
    """A real training checkpoint: an Adam step taken, then the usual dict."""
    m = tied_model()
    opt = torch.optim.Adam(m.parameters())
    m(torch.tensor([1, 2, 3])).sum().backward()
    opt.step()
    torch.save({"epoch": 3, "model": m.state_dict(), "optimizer": opt.state_dict()}, path)
    return m, opt


def tied_safetensors(path):
    sd = tied_model().state_dict()
    r = {k: v for k, v in sd.items() if k != "3.weight"}
    save_file(r, str(path), metadata={"format": "pt", "3.weight": "0.weight", "note": "kept"})
    return sd


def st_data(path) -> bytes:
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    return raw[8 + n:]


def zip_records(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {i.filename.split("/", 1)[1]: z.read(i) for i in z.infolist() if "/data/" in i.filename}


def ok(r):
    assert r.exit_code == 0, r.stderr
    return r


def one_error(r, code=1, text=""):
    assert r.exit_code == code, (r.exit_code, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert text in lines[0], lines[0]
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------- rename


def test_rename_strip_prefix_pt_keeps_ties_and_storage_bytes(tmp_path, run):
    sd = prefixed_pt(tmp_path / "a.pt")
    ok(run("rename", tmp_path / "a.pt", "--strip-prefix", "_orig_mod.", "-o", tmp_path / "b.pt"))
    got = torch.load(tmp_path / "b.pt", weights_only=True)
    assert list(got) == list(sd)
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    assert got["0.weight"].data_ptr() == got["3.weight"].data_ptr()  # still one storage
    assert sorted(zip_records(tmp_path / "a.pt").values()) == sorted(zip_records(tmp_path / "b.pt").values())
    nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 10, bias=False)).load_state_dict(got)


def test_rename_rules_in_order_with_groups_and_back(tmp_path, run):
    sd = prefixed_pt(tmp_path / "a.pt", "")
    ok(run("rename", tmp_path / "a.pt", r"s/^(\d)\./layer\1./", "s/layer/block_/", "-o", tmp_path / "b.pt"))
    assert list(torch.load(tmp_path / "b.pt", weights_only=True)) == ["block_" + k for k in sd]
    ok(run("rename", tmp_path / "b.pt", r"s/^block_(\d)/\1/", "-o", tmp_path / "c.pt"))
    assert run("diff", tmp_path / "a.pt", tmp_path / "c.pt").exit_code == 0


def test_rename_safetensors_renames_alias_metadata_and_copies_data_verbatim(tmp_path, run):
    tied_safetensors(tmp_path / "a.safetensors")
    ok(run("rename", tmp_path / "a.safetensors", "s/^/model./", "-o", tmp_path / "b.safetensors"))
    with safe_open(str(tmp_path / "b.safetensors"), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert json.loads(meta.pop("paramtool.order")).keys() == {"model.3.weight"}  # where the dropped name goes
    assert meta == {"format": "pt", "note": "kept", "model.3.weight": "model.0.weight"}
    assert "model.3.weight" not in keys and "model.0.weight" in keys
    assert st_data(tmp_path / "a.safetensors") == st_data(tmp_path / "b.safetensors")
    groups = run("ties", tmp_path / "b.safetensors", "--json").json()["groups"]
    assert [g["names"] for g in groups] == [["model.0.weight", "model.3.weight"]]


def test_rename_renames_paramtool_view_ties(tmp_path, run):
    base = torch.arange(12.0)
    torch.save({"a": base, "b": base[2:8].view(2, 3)}, tmp_path / "v.pt")
    ok(run("convert", tmp_path / "v.pt", tmp_path / "v.safetensors"))
    ok(run("rename", tmp_path / "v.safetensors", "s/^/x./", "-o", tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        views = json.loads(f.metadata()["paramtool.ties"])
    assert views == {"x.b": {"of": "x.a", "offset": 2, "shape": [2, 3], "stride": [3, 1]}}
    doc = run("show", tmp_path / "w.safetensors", "x.b", "--json").json()
    assert doc["values"] == [[2.0, 3.0, 4.0], [5.0, 6.0, 7.0]]


def test_rename_training_checkpoint_keeps_optimizer_and_extras(tmp_path, run):
    m, opt = training_ckpt(tmp_path / "t.ckpt")
    ok(run("rename", tmp_path / "t.ckpt", "s/^/net./", "-o", tmp_path / "r.ckpt"))
    got = torch.load(tmp_path / "r.ckpt", weights_only=True)
    assert got["epoch"] == 3 and list(got["model"]) == ["net." + k for k in m.state_dict()]
    want = opt.state_dict()
    assert got["optimizer"]["param_groups"] == want["param_groups"]
    assert torch.equal(got["optimizer"]["state"][0]["exp_avg"], want["state"][0]["exp_avg"])
    assert list(got["model"]._metadata) == ["", "net.0", "net.1", "net.2", "net.3"]  # module versions follow


def test_rename_sharded_rewrites_index(tmp_path, run):
    sd = make_sharded(tmp_path / "ck")
    ok(run("rename", tmp_path / "ck", "s/^layers/blocks/", "-o", tmp_path / "out"))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert list(index["weight_map"]) == [k.replace("layers", "blocks") for k in
                                         json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())["weight_map"]]
    for name, shard in index["weight_map"].items():
        with safe_open(str(tmp_path / "out" / shard), "pt") as f:
            assert torch.equal(f.get_tensor(name), sd[name.replace("blocks", "layers")])


def test_rename_dry_run_json_writes_nothing(tmp_path, run):
    prefixed_pt(tmp_path / "a.pt")
    r = ok(run("rename", tmp_path / "a.pt", "--strip-prefix", "_orig_mod.", "--dry-run", "--json"))
    assert r.json()["renamed"]["_orig_mod.0.weight"] == "0.weight"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]


def test_rename_pipe_from_stdin(tmp_path, run):
    prefixed_pt(tmp_path / "a.pt")
    r = ok(run("rename", "--strip-prefix", "_orig_mod.", input=(tmp_path / "a.pt").read_bytes()))
    (tmp_path / "b.pt").write_bytes(r.stdout_bytes)
    assert "0.weight" in torch.load(tmp_path / "b.pt", weights_only=True)


@pytest.mark.parametrize("args, code, text", [
    (["s/^.*$/x/"], 1, "rename collision: '_orig_mod.0.weight' and '_orig_mod.1.weight' would both be named 'x'"),
    (["s/_orig_mod.//", "s/^1/2/"], 1, "'_orig_mod.1.weight' and '_orig_mod.2.weight' would both be named '2.weight'"),
    (["s/[/x/"], 2, "bad regular expression"),
    (["s/a/\\3/"], 2, "invalid group reference"),
    (["s/a/b"], 2, "bad rename rule"),
    (["s/a/b/x"], 2, "bad rename rule"),
    (["s/^_orig_mod\\.0\\.weight$//"], 1, "empty name"),
    ([], 2, "give at least one RULE"),
])
def test_rename_misuse_is_one_error_line(tmp_path, run, args, code, text):
    prefixed_pt(tmp_path / "a.pt")
    one_error(run("rename", tmp_path / "a.pt", *args, "-o", tmp_path / "b.pt"), code, text)
    assert not (tmp_path / "b.pt").exists()


def test_parse_rule_delimiters_and_flags():
    rule = surgery.parse_rule("s|a/b|c|g")
    assert surgery.rename_map(["a/b.a/b"], [rule])[0] == {"a/b.a/b": "c.c"}
    first = surgery.parse_rule(r"s/\//_/")
    assert surgery.rename_map(["x/y/z"], [first])[0] == {"x/y/z": "x_y/z"}


# ---------------------------------------------------------------- drop


def test_drop_optimizer_key_from_training_checkpoint(tmp_path, run):
    m, _ = training_ckpt(tmp_path / "t.ckpt")
    ok(run("drop", tmp_path / "t.ckpt", "--key", "optimizer", "-o", tmp_path / "d.ckpt"))
    got = torch.load(tmp_path / "d.ckpt", weights_only=True)
    assert list(got) == ["epoch", "model"] and list(got["model"]) == list(m.state_dict())
    assert sorted(zip_records(tmp_path / "d.ckpt").values()) != sorted(zip_records(tmp_path / "t.ckpt").values())


def test_drop_one_tied_name_keeps_storage_for_the_other(tmp_path, run):
    sd = prefixed_pt(tmp_path / "a.pt", "")
    r = ok(run("drop", tmp_path / "a.pt", "--layer", "0", "-o", tmp_path / "b.pt"))
    assert "tied to 3.weight" in r.stderr
    got = torch.load(tmp_path / "b.pt", weights_only=True)
    assert "0.weight" not in got and torch.equal(got["3.weight"], sd["3.weight"])


def test_drop_stored_name_of_safetensors_alias_promotes_the_alias(tmp_path, run):
    sd = tied_safetensors(tmp_path / "a.safetensors")
    ok(run("drop", tmp_path / "a.safetensors", "--layer", "0.weight", "-o", tmp_path / "b.safetensors"))
    got = load_file(str(tmp_path / "b.safetensors"))
    assert torch.equal(got["3.weight"], sd["0.weight"]) and "0.weight" not in got
    with safe_open(str(tmp_path / "b.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "kept"}


def test_drop_sharded_removes_emptied_shard(tmp_path, run):
    make_sharded(tmp_path / "ck")
    ok(run("drop", tmp_path / "ck", "--layer", "layers.0.weight", "--layer", "layers.1.weight", "-o", tmp_path / "out"))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == ["layers.0.bias", "layers.2.weight", "layers.3.weight"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model-00002-of-00002.safetensors",
                                                                     "model.safetensors.index.json"]


def test_drop_in_place_and_optimizer_warning(tmp_path, run):
    training_ckpt(tmp_path / "t.ckpt")
    r = ok(run("drop", tmp_path / "t.ckpt", "--layer", "2", "--in-place"))
    assert "optimizer state in 'optimizer' indexes parameters by position" in r.stderr
    assert "2.weight" not in torch.load(tmp_path / "t.ckpt", weights_only=True)["model"]


@pytest.mark.parametrize("args, code, text", [
    (["--layer", "0", "--layer", "1", "--layer", "2", "--layer", "3"], 1, "would remove every tensor"),
    (["--layer", "nope"], 1, "matches nothing"),
    ([], 2, "give --layer"),
    (["--key", "optimizer", "--layer", "0"], 2, "one of the two"),
    (["--key", "nope"], 2, "--key 'nope' not found"),
    (["--key", "model"], 1, "would remove every tensor"),
])
def test_drop_misuse_is_one_error_line(tmp_path, run, args, code, text):
    training_ckpt(tmp_path / "t.ckpt")
    one_error(run("drop", tmp_path / "t.ckpt", *args, "-o", tmp_path / "b.pt"), code, text)


# ---------------------------------------------------------------- convert --dtype


def test_cast_pt_ties_once_ints_and_keep(tmp_path, run):
    m = nn.Sequential(nn.Embedding(10, 4), nn.BatchNorm1d(4), nn.Linear(4, 10, bias=False))
    m[2].weight = m[0].weight
    torch.save(m.state_dict(), tmp_path / "a.pt")
    ok(run("convert", tmp_path / "a.pt", "--dtype", "bf16", "--keep-dtype", "1.running_*", "-o", tmp_path / "b.pt"))
    got = torch.load(tmp_path / "b.pt", weights_only=True)
    assert got["0.weight"].dtype == torch.bfloat16 and got["0.weight"].data_ptr() == got["2.weight"].data_ptr()
    assert got["1.running_mean"].dtype == torch.float32 and got["1.weight"].dtype == torch.bfloat16
    assert got["1.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(got["0.weight"], m[0].weight.detach().to(torch.bfloat16))
    assert len(zip_records(tmp_path / "b.pt")) == len(zip_records(tmp_path / "a.pt"))


def test_cast_training_checkpoint_leaves_optimizer_fp32(tmp_path, run):
    training_ckpt(tmp_path / "t.ckpt")
    ok(run("convert", tmp_path / "t.ckpt", "--dtype", "fp16", "-o", tmp_path / "h.ckpt"))
    got = torch.load(tmp_path / "h.ckpt", weights_only=True)
    assert {t.dtype for t in got["model"].values()} == {torch.float16}
    assert got["optimizer"]["state"][0]["exp_avg"].dtype == torch.float32 and got["epoch"] == 3


def test_cast_fp16_overflow_is_counted_per_tensor(tmp_path, run):
    save_file({"big": torch.tensor([1e5, -7e4, 1.0, float("inf")]), "small": torch.ones(3)}, str(tmp_path / "a.safetensors"))
    r = ok(run("convert", tmp_path / "a.safetensors", "--dtype", "fp16", "-o", tmp_path / "b.safetensors"))
    assert "warning: 2 value(s) overflow float16 and became inf: big (2)" in r.stderr
    got = load_file(str(tmp_path / "b.safetensors"))
    assert got["big"].dtype == torch.float16 and torch.isinf(got["big"]).sum() == 3


def test_cast_safetensors_keeps_alias_and_metadata(tmp_path, run):
    sd = tied_safetensors(tmp_path / "a.safetensors")
    ok(run("convert", tmp_path / "a.safetensors", "--dtype", "bf16", "--keep-dtype", "2", "-o", tmp_path / "b.safetensors"))
    with safe_open(str(tmp_path / "b.safetensors"), "pt") as f:
        meta = f.metadata()
        assert json.loads(meta.pop("paramtool.order")).keys() == {"3.weight"}  # where the dropped name goes
        assert meta == {"format": "pt", "note": "kept", "3.weight": "0.weight"}
        assert f.get_tensor("2.weight").dtype == torch.float32
        assert torch.equal(f.get_tensor("0.weight"), sd["0.weight"].to(torch.bfloat16))


def test_cast_sharded_and_dry_run(tmp_path, run):
    make_sharded(tmp_path / "ck")
    plan = ok(run("convert", tmp_path / "ck", "--dtype", "bf16", "--keep-dtype", "*.bias", "--dry-run", "--json")).json()
    assert sorted(plan["changed"]) == [f"layers.{i}.weight" for i in range(4)]
    ok(run("convert", tmp_path / "ck", "--dtype", "bf16", "--keep-dtype", "*.bias", "-o", tmp_path / "out"))
    dtypes = {t["name"]: t["dtype"] for t in run("inspect", tmp_path / "out", "--json").json()["tensors"]}
    assert dtypes.pop("layers.0.bias") == "float32" and set(dtypes.values()) == {"bfloat16"}


def test_cast_reads_one_storage_at_a_time(tmp_path, run, monkeypatch):
    """The streamed path never loads the checkpoint: torch.load and safetensors' load are not called."""
    training_ckpt(tmp_path / "t.ckpt")
    tied_safetensors(tmp_path / "a.safetensors")
    from paramtool.formats import pt, safetensors_fmt

    def refuse(*a, **k):
        raise AssertionError("loaded the whole checkpoint")

    monkeypatch.setattr(pt, "load", refuse)
    monkeypatch.setattr(safetensors_fmt, "load", refuse)
    ok(run("convert", tmp_path / "t.ckpt", "--dtype", "bf16", "-o", tmp_path / "b.ckpt"))
    ok(run("convert", tmp_path / "a.safetensors", "--dtype", "bf16", "-o", tmp_path / "b.safetensors"))
    ok(run("rename", tmp_path / "t.ckpt", "s/^/x./", "-o", tmp_path / "c.ckpt"))
    ok(run("drop", tmp_path / "a.safetensors", "--layer", "1", "-o", tmp_path / "c.safetensors"))


@pytest.mark.parametrize("args, code, text", [
    (["--dtype", "int8"], 2, "--dtype must be bf16, fp16 or fp32"),
    (["--keep-dtype", "0"], 2, "--keep-dtype goes with --dtype"),
    (["--dtype", "bf16", "--keep-dtype", "zzz"], 1, "matches nothing"),
])
def test_cast_misuse_is_one_error_line(tmp_path, run, args, code, text):
    prefixed_pt(tmp_path / "a.pt", "")
    one_error(run("convert", tmp_path / "a.pt", *args, "-o", tmp_path / "b.pt"), code, text)


def test_cast_of_integer_only_checkpoint_is_an_error(tmp_path, run):
    torch.save({"ids": torch.arange(4), "mask": torch.ones(3, dtype=torch.bool)}, tmp_path / "i.pt")
    one_error(run("convert", tmp_path / "i.pt", "--dtype", "fp16", "-o", tmp_path / "o.pt"), 1,
              "nothing to cast to float16: no floating-point tensors")


# ---------------------------------------------------------------- resize


def test_resize_grows_with_mean_rows_and_tied_head(tmp_path, run):
    sd = prefixed_pt(tmp_path / "a.pt", "")
    r = ok(run("resize", tmp_path / "a.pt", "0.weight", "--rows", "13", "-o", tmp_path / "b.pt"))
    assert "tied: 3.weight changed with 0.weight" in r.stderr
    got = torch.load(tmp_path / "b.pt", weights_only=True)
    assert got["0.weight"].shape == (13, 4) and got["0.weight"].data_ptr() == got["3.weight"].data_ptr()
    assert torch.equal(got["0.weight"][:10], sd["0.weight"])
    assert torch.allclose(got["0.weight"][10:], sd["0.weight"].mean(0).expand(3, 4))


def test_resize_scheme_seed_reproducible_and_shrink(tmp_path, run):
    sd = tied_safetensors(tmp_path / "a.safetensors")
    args = ("--rows", "16", "--scheme", "normal", "--std", "0.02", "--seed", "7")
    ok(run("resize", tmp_path / "a.safetensors", "0.weight", *args, "-o", tmp_path / "b.safetensors"))
    ok(run("resize", tmp_path / "a.safetensors", "0.weight", *args, "-o", tmp_path / "c.safetensors"))
    b = load_file(str(tmp_path / "b.safetensors"))
    assert torch.equal(b["0.weight"], load_file(str(tmp_path / "c.safetensors"))["0.weight"])
    assert b["0.weight"][10:].std() < 0.1 and torch.equal(b["0.weight"][:10], sd["0.weight"])
    with safe_open(str(tmp_path / "b.safetensors"), "pt") as f:
        assert f.metadata()["3.weight"] == "0.weight"  # the head follows through the alias
    ok(run("resize", tmp_path / "b.safetensors", "0.weight", "--rows", "5", "-o", tmp_path / "d.safetensors"))
    doc = {t["name"]: t for t in run("inspect", tmp_path / "d.safetensors", "--json").json()["tensors"]}
    assert doc["3.weight"]["shape"] == [5, 4] and doc["3.weight"]["tied_to"] == "0.weight"


def test_resize_training_checkpoint_and_sharded(tmp_path, run):
    training_ckpt(tmp_path / "t.ckpt")
    r = ok(run("resize", tmp_path / "t.ckpt", "0.weight", "--rows", "11", "-o", tmp_path / "r.ckpt"))
    assert "reset the optimizer" in r.stderr
    got = torch.load(tmp_path / "r.ckpt", weights_only=True)
    assert got["model"]["3.weight"].shape == (11, 4) and got["epoch"] == 3
    make_sharded(tmp_path / "ck")
    ok(run("resize", tmp_path / "ck", "layers.3.weight", "--rows", "6", "-o", tmp_path / "out"))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    with safe_open(str(tmp_path / "out" / index["weight_map"]["layers.3.weight"]), "pt") as f:
        assert f.get_slice("layers.3.weight").get_shape() == [6, 4]
    assert index["metadata"]["total_size"] == (4 * 16 + 2 * 4 + 4) * 4


@pytest.mark.parametrize("args, code, text", [
    (["0.weight", "--rows", "0"], 2, "--rows must be at least 1"),
    (["0.weight", "--rows", "-3"], 2, "--rows must be at least 1"),
    (["nope", "--rows", "3"], 1, "no tensor named 'nope'"),
    (["0.weight", "--rows", "12", "--std", "1"], 2, "give --scheme too"),
    (["0.weight", "--rows", "12", "--scheme", "bogus"], 2, "unknown scheme"),
    (["0.weight", "--rows", "12", "--scheme", "normal", "--gain", "2"], 2, "--gain does not apply"),
    (["2.weight", "--rows", "12", "--scheme", "xavier"], 1, "cannot fill the new rows"),
    (["0.weight"], 2, "--rows"),
])
def test_resize_misuse_is_one_error_line(tmp_path, run, args, code, text):
    prefixed_pt(tmp_path / "a.pt", "")
    one_error(run("resize", tmp_path / "a.pt", *args, "-o", tmp_path / "b.pt"), code, text)


def test_resize_partial_view_is_refused(tmp_path, run):
    base = torch.zeros(6, 2)
    torch.save({"a": base, "b": base[2:]}, tmp_path / "v.pt")
    one_error(run("resize", tmp_path / "v.pt", "a", "--rows", "8", "-o", tmp_path / "o.pt"), 1, "partial view")


# ---------------------------------------------------------------- help, and the model-directory helpers


@pytest.mark.parametrize("command", ["rename", "drop", "resize", "convert"])
def test_help_has_an_example(run, command):
    r = ok(run(command, "--help"))
    assert f"paramtool {command} " in r.stdout and "Example" in r.stdout


def test_config_vocab_helpers():
    """formats.modeldir decides from config.json what resizes with an embedding and the new config.json."""
    from paramtool.formats import modeldir
    from paramtool.toc import TensorInfo

    def info(name, shape, storage):
        return TensorInfo(name, shape, "float32", storage, 0, (shape[1], 1), (name,))

    infos = [info("model.embed_tokens.weight", (100, 32), 1), info("lm_head.weight", (100, 32), 2),
             info("model.norm.weight", (32, 1), 3)]  # (not a vocabulary tensor: 32 rows)
    config = {"model_type": "llama", "vocab_size": 100, "hidden_size": 32, "tie_word_embeddings": False}
    assert modeldir.vocab_partners(config, infos, "model.embed_tokens.weight") == ["lm_head.weight"]
    assert modeldir.vocab_partners(config, infos, "lm_head.weight") == ["model.embed_tokens.weight"]
    assert modeldir.vocab_partners({**config, "vocab_size": 90}, infos, "model.embed_tokens.weight") == []
    assert modeldir.vocab_partners(None, infos, "model.embed_tokens.weight") == []
    new = modeldir.config_with_vocab(config, infos, "model.embed_tokens.weight", 128)
    assert json.loads(new) == {**config, "vocab_size": 128} and new.endswith(b"}\n")
    assert modeldir.config_with_vocab(config, infos, "model.norm.weight", 16) is None  # not a vocabulary tensor
    assert modeldir.config_with_vocab(config, infos, "model.embed_tokens.weight", 100) is None  # unchanged
    nested = {"model_type": "llava", "text_config": {"vocab_size": 100, "hidden_size": 32}}
    assert json.loads(modeldir.config_with_vocab(nested, infos, "lm_head.weight", 120))["text_config"]["vocab_size"] == 120


# ---------------------------------------------------------------- transformers


def _gpt2(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(tmp_path / "hf")
    return transformers, model


def _assemble(tmp_path, name, weights, config_from):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_bytes((config_from / "config.json").read_bytes())
    (d / "model.safetensors").write_bytes(weights.read_bytes())
    return d


def _load_clean(transformers, d):
    model, info = transformers.GPT2LMHeadModel.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


def test_transformers_rename_cast_resize_load_cleanly(tmp_path, run):
    transformers, model = _gpt2(tmp_path)
    st = tmp_path / "hf" / "model.safetensors"
    ok(run("rename", st, "--strip-prefix", "transformer.", "-o", tmp_path / "bare.safetensors"))
    with safe_open(str(tmp_path / "bare.safetensors"), "pt") as f:
        assert "wte.weight" in f.keys()
    ok(run("rename", tmp_path / "bare.safetensors", r"s/^(wte|wpe|h|ln_f)\./transformer.\1./", "-o", tmp_path / "back.safetensors"))
    back = _load_clean(transformers, _assemble(tmp_path, "renamed", tmp_path / "back.safetensors", tmp_path / "hf"))
    assert torch.equal(back.transformer.h[1].mlp.c_fc.weight, model.transformer.h[1].mlp.c_fc.weight)

    ok(run("convert", st, "--dtype", "bf16", "--keep-dtype", "*ln_*", "-o", tmp_path / "bf16.safetensors"))
    cast = _load_clean(transformers, _assemble(tmp_path, "cast", tmp_path / "bf16.safetensors", tmp_path / "hf"))
    with safe_open(str(tmp_path / "bf16.safetensors"), "pt") as f:
        assert f.get_tensor("transformer.ln_f.weight").dtype == torch.float32
        assert f.get_tensor("transformer.wte.weight").dtype == torch.bfloat16
    assert torch.equal(cast.transformer.wte.weight.to(torch.bfloat16), model.transformer.wte.weight.to(torch.bfloat16))

    ok(run("resize", tmp_path / "hf", "transformer.wte.weight", "--rows", "128", "-o", tmp_path / "resized"))
    grown = _load_clean(transformers, tmp_path / "resized")  # config.json's vocab_size follows
    assert grown.config.vocab_size == 128 and grown.lm_head.weight.shape == (128, 32)
    assert grown.lm_head.weight.data_ptr() == grown.transformer.wte.weight.data_ptr()
    old = model.transformer.wte.weight.detach()
    assert torch.equal(grown.transformer.wte.weight[:100], old)
    assert torch.allclose(grown.transformer.wte.weight[100:], old.mean(0).expand(28, 32))
    out = grown(torch.tensor([[1, 127]])).logits
    assert out.shape == (1, 2, 128)


def test_resize_also_resizes_config_tied_head_in_its_own_storage(tmp_path):
    """What a model directory wires: config ties (tie_word_embeddings) that are separate tensors on disk."""
    from paramtool import executor, sources, writer

    torch.manual_seed(0)
    emb = torch.randn(6, 3)
    save_file({"model.embed_tokens.weight": emb, "lm_head.weight": emb.clone(), "norm.weight": torch.ones(3)},
              str(tmp_path / "m.safetensors"))
    src = sources.resolve(str(tmp_path / "m.safetensors"))
    listing = sources.open_for_plan(src)
    plan = surgery.plan_resize(listing, "model.embed_tokens.weight", 8, surgery.NewRows(), ["lm_head.weight"])
    assert plan.report.with_ties == {"model.embed_tokens.weight": ["lm_head.weight"]}
    executor.execute(src, listing, plan, writer.Output(str(tmp_path / "o.safetensors"), "safetensors"))
    got = load_file(str(tmp_path / "o.safetensors"))
    assert got["lm_head.weight"].shape == (8, 3) and torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])
    assert torch.allclose(got["lm_head.weight"][6:], emb.mean(0).expand(2, 3))


def test_strip_ddp_prefix_moves_state_dict_metadata_and_loads(tmp_path, run):
    m = tied_model()
    torch.save(nn.DataParallel(m).state_dict(), tmp_path / "ddp.pt")
    ok(run("rename", tmp_path / "ddp.pt", "s/^module\\.//", "-o", tmp_path / "plain.pt"))
    got = torch.load(tmp_path / "plain.pt", weights_only=True)
    assert list(got) == list(m.state_dict())
    assert set(got._metadata) >= {"0", "1", "2", "3"} and "module.0" not in got._metadata
    fresh = tied_model()
    assert not fresh.load_state_dict(got).missing_keys


def test_rename_sharded_in_place(tmp_path, run):
    sd = make_sharded(tmp_path / "ck", "bin")
    ok(run("rename", tmp_path / "ck", "s/^layers\\.//", "--in-place"))
    index = json.loads((tmp_path / "ck" / "pytorch_model.bin.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(k.removeprefix("layers.") for k in sd)
    for name, shard in index["weight_map"].items():
        assert torch.equal(torch.load(tmp_path / "ck" / shard, weights_only=True)[name], sd["layers." + name])
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["model-00001-of-00002.bin", "model-00002-of-00002.bin",
                                                                   "pytorch_model.bin.index.json"]


def test_dry_run_text_shows_renames_and_drops(tmp_path, run):
    prefixed_pt(tmp_path / "a.pt")
    r = ok(run("rename", tmp_path / "a.pt", "--strip-prefix", "_orig_mod.", "s/^3/head/", "--dry-run"))
    assert "would apply rename to 6 tensor(s):" in r.stdout and "  _orig_mod.3.weight -> head.weight" in r.stdout
    r = ok(run("drop", tmp_path / "a.pt", "--layer", "_orig_mod.2", "--dry-run", "--json"))
    assert r.json()["dropped"] == ["_orig_mod.2.weight", "_orig_mod.2.bias"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]


def test_transformers_sharded_directory_resize_and_rename(tmp_path, run):
    """A sharded save_pretrained directory: the shards and the index are rewritten, the sidecars come along
    and config.json's vocab_size follows a resize."""
    transformers, model = _gpt2(tmp_path)
    model.save_pretrained(tmp_path / "sh", max_shard_size="40KB")
    assert (tmp_path / "sh" / "model.safetensors.index.json").exists()
    ok(run("resize", tmp_path / "sh", "transformer.wte.weight", "--rows", "120", "-o", tmp_path / "grown"))
    assert (tmp_path / "grown" / "generation_config.json").read_bytes() == (tmp_path / "sh" / "generation_config.json").read_bytes()
    grown = _load_clean(transformers, tmp_path / "grown")
    assert grown.lm_head.weight.shape == (120, 32)

    ok(run("rename", tmp_path / "sh", "--strip-prefix", "transformer.", "-o", tmp_path / "bare"))
    ok(run("rename", tmp_path / "bare", r"s/^(?!lm_head)/transformer./", "-o", tmp_path / "back"))
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((tmp_path / "sh" / "model.safetensors.index.json").read_text())["weight_map"]
    (tmp_path / "back" / "config.json").write_bytes((tmp_path / "sh" / "config.json").read_bytes())
    back = _load_clean(transformers, tmp_path / "back")
    assert torch.equal(back.transformer.h[0].attn.c_attn.weight, model.transformer.h[0].attn.c_attn.weight)


def test_keep_dtype_on_one_tied_name_keeps_the_group(tmp_path, run):
    prefixed_pt(tmp_path / "a.pt", "")
    r = ok(run("convert", tmp_path / "a.pt", "--dtype", "fp16", "--keep-dtype", "3.weight", "-o", tmp_path / "b.pt"))
    assert "warning: kept as they are, because a name they are tied to is kept: 0.weight" in r.stderr
    got = torch.load(tmp_path / "b.pt", weights_only=True)
    assert got["0.weight"].dtype == torch.float32 and got["0.weight"].data_ptr() == got["3.weight"].data_ptr()
    assert got["1.weight"].dtype == torch.float16


def test_one_plan_type_reports_structure_only_for_structural_changes(tmp_path, run):
    """Every writing command's plan is one ``plan.Plan``: a structural change (cast, resize) says what it renamed
    and dropped in its --dry-run JSON, a value edit (init) does not; resize is told by its data (the names whose
    shape changes), not by its label, so it never streams."""
    from paramtool import sources
    from paramtool.plan import Plan

    prefixed_pt(tmp_path / "a.pt")
    cast = ok(run("convert", tmp_path / "a.pt", "--dtype", "bf16", "--dry-run", "--json")).json()
    assert cast["renamed"] == {} and cast["dropped"] == [] and cast["action"] == "cast to bfloat16"
    init = ok(run("init", tmp_path / "a.pt", "--scheme", "zeros", "--dry-run", "--json")).json()
    assert "renamed" not in init and "dropped" not in init and init["action"] == "zeros"
    listing = sources.open_for_plan(sources.resolve(str(tmp_path / "a.pt")))
    plan = surgery.plan_resize(listing, "_orig_mod.0.weight", 12, surgery.NewRows())
    assert isinstance(plan, Plan) and plan.resized == ["_orig_mod.0.weight", "_orig_mod.3.weight"]
    assert not plan.untie and plan.restructure is not None

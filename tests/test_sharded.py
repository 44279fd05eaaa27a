"""Sharded checkpoints (index + shard files): one checkpoint for every command, written back as shards."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import listing_without_torch
from safetensors.torch import load_file, save_file


def make_sharded(root, kind="safetensors"):
    torch.manual_seed(0)
    sd = {f"layers.{i}.weight": torch.randn(4, 4) for i in range(4)}
    sd["layers.0.bias"] = torch.randn(4)
    names = list(sd)
    shards = {}
    root.mkdir()
    ext = "safetensors" if kind == "safetensors" else "bin"
    for j, part in enumerate((names[:2], names[2:])):
        shard = f"model-0000{j + 1}-of-00002.{ext}"
        tensors = {k: sd[k] for k in part}
        if kind == "safetensors":
            save_file(tensors, str(root / shard), metadata={"format": "pt"})
        else:
            torch.save(tensors, root / shard)
        shards.update({k: shard for k in part})
    index = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    (root / index).write_text(json.dumps({"metadata": {"total_size": 276}, "weight_map": shards}))
    return sd


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_inspect_sharded(tmp_path, run, kind):
    sd = make_sharded(tmp_path / "ck", kind)
    doc = run("inspect", tmp_path / "ck", "--json").json()
    assert doc["format"] == "sharded" and [t["name"] for t in doc["tensors"]] == list(sd)
    assert doc["num_params"] == 68
    index = next((tmp_path / "ck").glob("*.index.json"))
    assert run("inspect", index, "--json").json()["tensors"] == doc["tensors"]


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_init_keeps_sharding(tmp_path, run, kind):
    sd = make_sharded(tmp_path / "ck", kind)
    r = run("init", tmp_path / "ck", "--scheme", "zeros", "--layer", "layers.3", "-o", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    before = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    d = run("diff", tmp_path / "ck", tmp_path / "out", "--json").json()
    assert [c["name"] for c in d["changed"]] == ["layers.3.weight"]
    # the untouched shard is byte-identical
    first = next(p for p in (tmp_path / "ck").iterdir() if p.name.startswith("model-00001"))
    assert first.read_bytes() == (tmp_path / "out" / first.name).read_bytes()


def test_in_place_and_merge(tmp_path, run):
    sd = make_sharded(tmp_path / "ck")
    assert run("set", tmp_path / "ck", "layers.0.weight[0, 0] = 42", "--in-place").exit_code == 0
    shard1 = load_file(str(tmp_path / "ck" / "model-00001-of-00002.safetensors"))
    assert shard1["layers.0.weight"][0, 0] == 42
    assert run("convert", tmp_path / "ck", tmp_path / "all.safetensors").exit_code == 0
    merged = load_file(str(tmp_path / "all.safetensors"))
    assert set(merged) == set(sd) and merged["layers.0.weight"][0, 0] == 42


def test_errors(tmp_path, run):
    make_sharded(tmp_path / "ck")
    (tmp_path / "ck" / "model-00002-of-00002.safetensors").unlink()
    r = run("inspect", tmp_path / "ck")
    assert r.exit_code == 1 and "model-00002-of-00002.safetensors" in r.stderr and "missing" in r.stderr
    (tmp_path / "empty").mkdir()
    r = run("inspect", tmp_path / "empty")
    assert r.exit_code == 1 and "index" in r.stderr
    make_sharded(tmp_path / "ok")
    r = run("init", tmp_path / "ok", "--scheme", "zeros")
    assert r.exit_code == 2  # a sharded checkpoint does not go to stdout


def test_sharded_listing_imports_no_torch(tmp_path):
    make_sharded(tmp_path / "ck", "bin")
    p = listing_without_torch(tmp_path / "ck")
    assert p.returncode == 0, p.stderr

"""The committed sample generator: deterministic, and the chapter's parameter counts."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from conftest import _load_generator


def unique_params(sd):
    seen, n = set(), 0
    for t in sd.values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            n += t.numel()
    return n


def test_counts_and_kinds(samples):
    assert unique_params(torch.load(samples / "mlp.pt", weights_only=True)) == 49
    assert unique_params(torch.load(samples / "rgnet.pt", weights_only=True)) == 309
    tied = torch.load(samples / "tied.pt", weights_only=True)
    assert unique_params(tied) == 121
    assert tied["2.weight"].untyped_storage().data_ptr() == tied["4.weight"].untyped_storage().data_ptr()
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(samples / "bf16.safetensors")).values())
    train = torch.load(samples / "train.pt", weights_only=True)
    assert set(train) >= {"epoch", "model", "optimizer"} and "exp_avg" in train["optimizer"]["state"][0]
    assert all(p.stat().st_size < 16_000 for p in samples.iterdir())


def same_safetensors(a, b) -> bool:
    """Equal header (as JSON: safetensors orders metadata keys at random) and equal data bytes."""
    ra, rb = a.read_bytes(), b.read_bytes()
    na, nb = int.from_bytes(ra[:8], "little"), int.from_bytes(rb[:8], "little")
    return json.loads(ra[8:8 + na]) == json.loads(rb[8:8 + nb]) and ra[8 + na:] == rb[8 + nb:]


def test_deterministic(tmp_path):
    gen = _load_generator()
    a, b = gen.generate(tmp_path / "a"), gen.generate(tmp_path / "b")
    for pa, pb in zip(a, b):
        if pa.suffix == ".safetensors":
            assert same_safetensors(pa, pb)
        else:
            da, db = torch.load(pa, weights_only=True), torch.load(pb, weights_only=True)
            flat_a = {k: v for k, v in (da.get("model", da)).items()}
            flat_b = {k: v for k, v in (db.get("model", db)).items()}
            assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a)


def test_committed_samples_match_generator(tmp_path):
    import pathlib

    committed = pathlib.Path(__file__).resolve().parent.parent / "sample_models"
    for path in _load_generator().generate(tmp_path):
        if path.suffix == ".safetensors":
            assert same_safetensors(path, committed / path.name), path.name

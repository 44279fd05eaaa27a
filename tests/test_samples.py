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


def test_every_file_and_the_chapter_names(samples):
    assert sorted(p.name for p in samples.iterdir()) == sorted(
        f"{m}.{ext}" for m in ("mlp", "rgnet", "tied", "bf16") for ext in ("pt", "safetensors")) + ["train.pt"]
    assert list(torch.load(samples / "mlp.pt", weights_only=True)) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    rg = torch.load(samples / "rgnet.pt", weights_only=True)
    assert list(rg)[:2] == ["0.block 0.0.weight", "0.block 0.0.bias"] and list(rg)[-2:] == ["1.weight", "1.bias"]
    assert len(rg) == 18 and sum(t.numel() for t in rg.values()) == 309
    assert set(load_file(str(samples / "rgnet.safetensors"))) == set(rg)


def test_bf16_both_formats(samples):
    pt = torch.load(samples / "bf16.pt", weights_only=True)
    st = load_file(str(samples / "bf16.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in pt.values()) and set(pt) == set(st)
    assert all(torch.equal(pt[k], st[k]) for k in pt)
    mlp = torch.load(samples / "mlp.pt", weights_only=True)
    assert all(torch.equal(pt[k], mlp[k].to(torch.bfloat16)) for k in mlp)


def test_tied_safetensors_is_what_save_model_writes(samples, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_model

    gen = _load_generator()
    save_model(gen.tied(), str(tmp_path / "ref.safetensors"))
    assert same_safetensors(samples / "tied.safetensors", tmp_path / "ref.safetensors")
    with safe_open(str(samples / "tied.safetensors"), "pt") as f:
        assert f.metadata() == {"4.weight": "2.weight", "4.bias": "2.bias"}
        assert set(f.keys()) == {"0.weight", "0.bias", "2.weight", "2.bias", "6.weight", "6.bias"}
        assert sum(f.get_tensor(k).numel() for k in f.keys()) == 121
    pt = torch.load(samples / "tied.pt", weights_only=True)
    assert pt["4.bias"].untyped_storage().data_ptr() == pt["2.bias"].untyped_storage().data_ptr()
    assert sum(t.numel() for t in pt.values()) == 121 + 72  # the tied 2.* counted twice


def test_training_checkpoint_after_one_adam_step(samples):
    train = torch.load(samples / "train.pt", weights_only=True)
    assert train["epoch"] == 3 and isinstance(train.get("loss"), float)
    assert list(train["model"]) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    state = train["optimizer"]["state"]
    assert sorted(state) == [0, 1, 2, 3] and all(int(s["step"]) == 1 for s in state.values())
    assert all(s["exp_avg"].abs().sum() > 0 for s in state.values())
    assert train["optimizer"]["param_groups"][0]["params"] == [0, 1, 2, 3]
    # one real step moved the weights away from the freshly initialised mlp
    assert not torch.equal(train["model"]["0.weight"], torch.load(samples / "mlp.pt", weights_only=True)["0.weight"])


def test_two_generations_give_identical_tensors(tmp_path):
    gen = _load_generator()
    for pa, pb in zip(gen.generate(tmp_path / "a"), gen.generate(tmp_path / "b")):
        if pa.suffix == ".safetensors":
            da, db = load_file(str(pa)), load_file(str(pb))
        else:
            da, db = torch.load(pa, weights_only=True), torch.load(pb, weights_only=True)
        if "optimizer" in da:
            sa, sb = da["optimizer"]["state"], db["optimizer"]["state"]
            assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
            assert da["loss"] == db["loss"]
            da, db = da["model"], db["model"]
        assert list(da) == list(db) and all(torch.equal(da[k], db[k]) for k in da), pa.name

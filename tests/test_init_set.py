"""`paramtool init` and `set`: the D2L chapter's examples from the shell, writing rules, ties, failures."""
from __future__ import annotations

import math
import os
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


def load(path):
    return load_file(str(path)) if str(path).endswith(".safetensors") else torch.load(path, weights_only=True)


def test_normal_std_001_zero_bias(samples, tmp_path, run):
    r = run("init", samples / "mlp.pt", "--scheme", "normal", "--std", "0.01", "--zero-bias", "--seed", "1",
            "-o", tmp_path / "out.pt")
    assert r.exit_code == 0, r.stderr
    sd = load(tmp_path / "out.pt")
    w = sd["0.weight"]
    assert w.abs().max() < 0.06 and w.std() < 0.02 and w.std() > 0.003
    assert torch.count_nonzero(sd["0.bias"]) == 0 and torch.count_nonzero(sd["2.bias"]) == 0
    assert "normal" in r.stderr and "0.weight" in r.stderr


def test_normal_statistics_on_large_tensor(tmp_path, run):
    torch.save({"w": torch.zeros(512, 512)}, tmp_path / "big.pt")
    run("init", tmp_path / "big.pt", "--scheme", "normal", "--std", "0.01", "--seed", "0", "--param", "all", "-o", tmp_path / "o.pt")
    w = load(tmp_path / "o.pt")["w"]
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.01) < 5e-4


def test_constant_one(samples, tmp_path, run):
    run("init", samples / "mlp.pt", "--scheme", "constant", "--value", "1", "-o", tmp_path / "o.pt")
    before, after = load(samples / "mlp.pt"), load(tmp_path / "o.pt")
    assert torch.all(after["0.weight"] == 1) and torch.all(after["2.weight"] == 1)
    assert torch.equal(after["0.bias"], before["0.bias"])  # --param defaults to weight


def test_xavier_layer0_and_42_on_layer2(samples, tmp_path, run):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    assert run("init", samples / "mlp.pt", "--scheme", "xavier", "--layer", "0", "--seed", "3", "-o", a).exit_code == 0
    assert run("init", a, "--scheme", "constant", "--value", "42", "--layer", "2", "-o", b).exit_code == 0
    before, after = load(samples / "mlp.pt"), load(b)
    bound = math.sqrt(6 / (4 + 8))
    assert after["0.weight"].abs().max() <= bound and not torch.equal(after["0.weight"], before["0.weight"])
    assert torch.all(after["2.weight"] == 42)
    assert torch.equal(after["0.bias"], before["0.bias"]) and torch.equal(after["2.bias"], before["2.bias"])


def test_masked_uniform(tmp_path, run):
    torch.save({"w": torch.zeros(256, 256)}, tmp_path / "m.pt")
    run("init", tmp_path / "m.pt", "--scheme", "masked_uniform", "--seed", "0", "--param", "all", "-o", tmp_path / "o.pt")
    w = load(tmp_path / "o.pt")["w"]
    zeros = (w == 0).float().mean().item()
    assert 0.45 < zeros < 0.55
    nz = w[w != 0].abs()
    assert nz.min() >= 5 and nz.max() <= 10


def test_set_reproduces_chapter_edit(samples, tmp_path, run):
    r = run("set", samples / "mlp.pt", "0.weight[:] += 1", "0.weight[0, 0] = 42", "-o", tmp_path / "o.pt")
    assert r.exit_code == 0, r.stderr
    w = load(samples / "mlp.pt")["0.weight"].clone()
    w[:] += 1
    w[0, 0] = 42
    assert torch.equal(load(tmp_path / "o.pt")["0.weight"], w)


def test_roundtrip_keeps_untouched_and_extras(samples, tmp_path, run):
    r = run("init", samples / "train.pt", "--scheme", "zeros", "--layer", "2", "-o", tmp_path / "o.pt")
    assert r.exit_code == 0, r.stderr
    before, after = torch.load(samples / "train.pt", weights_only=True), torch.load(tmp_path / "o.pt", weights_only=True)
    assert after["epoch"] == before["epoch"]
    assert torch.equal(after["model"]["0.weight"], before["model"]["0.weight"])
    assert torch.count_nonzero(after["model"]["2.weight"]) == 0
    assert after["optimizer"]["param_groups"] == before["optimizer"]["param_groups"]
    for k, st in before["optimizer"]["state"].items():
        for name, v in st.items():
            assert torch.equal(after["optimizer"]["state"][k][name], v)
    assert list(after["model"]) == list(before["model"])
    assert "optimizer" in r.stderr and "stale" in r.stderr  # optimizer moments refer to reinitialized params


def test_bf16_stays_bf16(samples, tmp_path, run):
    for name in ("bf16.pt", "bf16.safetensors"):
        out = tmp_path / ("o_" + name)
        r = run("init", samples / name, "--scheme", "orthogonal", "-o", out)
        assert r.exit_code == 0, r.stderr
        sd = load(out)
        assert all(t.dtype == torch.bfloat16 for t in sd.values())


def test_safetensors_metadata_kept(tmp_path, run):
    from safetensors import safe_open
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2, 2), "b": torch.ones(3)}, str(tmp_path / "m.safetensors"), metadata={"format": "pt", "x": "y"})
    run("init", tmp_path / "m.safetensors", "--scheme", "zeros", "--layer", "a", "--param", "all",
        "-o", tmp_path / "o.safetensors")
    with safe_open(str(tmp_path / "o.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "x": "y"}
        assert torch.equal(f.get_tensor("b"), torch.ones(3))


def test_pipes_chain(samples, tmp_path):
    exe = [sys.executable, "-m", "paramtool"]
    data = (samples / "mlp.pt").read_bytes()
    init = subprocess.run(exe + ["init", "--scheme", "normal", "--std", "0.01"], input=data, capture_output=True)
    assert init.returncode == 0, init.stderr
    insp = subprocess.run(exe + ["inspect", "-", "--json"], input=init.stdout, capture_output=True)
    assert insp.returncode == 0 and b'"num_params": 49' in insp.stdout
    with open(samples / "mlp.pt", "rb") as fin, open(tmp_path / "o.pt", "wb") as fout:
        p = subprocess.run(exe + ["init", "--scheme", "ones"], stdin=fin, stdout=fout, stderr=subprocess.PIPE)
    assert p.returncode == 0, p.stderr
    assert torch.all(load(tmp_path / "o.pt")["0.weight"] == 1)


def test_seed_reproducible_and_selection_independent(samples, tmp_path, run):
    run("init", samples / "rgnet.pt", "--scheme", "xavier", "--seed", "7", "-o", tmp_path / "all.pt")
    run("init", samples / "rgnet.pt", "--scheme", "xavier", "--seed", "7", "--layer", "1", "-o", tmp_path / "one.pt")
    run("init", samples / "rgnet.pt", "--scheme", "xavier", "--seed", "7", "-o", tmp_path / "again.pt")
    a, b, c = load(tmp_path / "all.pt"), load(tmp_path / "one.pt"), load(tmp_path / "again.pt")
    assert torch.equal(a["1.weight"], b["1.weight"])
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_tied_stays_tied_or_untie(samples, tmp_path, run):
    r = run("init", samples / "tied.pt", "--scheme", "constant", "--value", "3", "--layer", "4", "-o", tmp_path / "t.pt")
    assert r.exit_code == 0 and "2.weight" in r.stderr
    sd = load(tmp_path / "t.pt")
    assert torch.all(sd["2.weight"] == 3)
    assert sd["2.weight"].untyped_storage().data_ptr() == sd["4.weight"].untyped_storage().data_ptr()
    run("init", samples / "tied.pt", "--scheme", "constant", "--value", "3", "--layer", "4", "--untie", "-o", tmp_path / "u.pt")
    sd2, orig = load(tmp_path / "u.pt"), load(samples / "tied.pt")
    assert torch.all(sd2["4.weight"] == 3) and torch.equal(sd2["2.weight"], orig["2.weight"])


def test_skips_1d_with_warning_and_empty_is_error(samples, tmp_path, run):
    r = run("init", samples / "mlp.pt", "--scheme", "xavier", "--param", "all", "-o", tmp_path / "o.pt")
    assert r.exit_code == 0 and "warning" in r.stderr and "0.bias" in r.stderr
    r = run("init", samples / "mlp.pt", "--scheme", "xavier", "--param", "bias", "-o", tmp_path / "o2.pt")
    assert r.exit_code == 1 and r.stderr.startswith("error:")
    assert not (tmp_path / "o2.pt").exists()


def test_dry_run_writes_nothing(samples, tmp_path, run):
    r = run("init", samples / "tied.pt", "--scheme", "zeros", "--layer", "2", "--dry-run", "--json")
    assert r.exit_code == 0
    plan = r.json()
    assert plan["changed"] == ["2.weight"] and plan["ties"] == {"2.weight": ["4.weight"]}
    assert list(tmp_path.iterdir()) == [samples]
    assert run("init", samples / "tied.pt", "--scheme", "zeros", "--json", "-o", tmp_path / "o.pt").exit_code == 2
    assert list(tmp_path.iterdir()) == [samples]
    r = run("init", samples / "tied.pt", "--scheme", "zeros", "--layer", "2", "--dry-run")  # for people
    assert r.exit_code == 0 and "would apply zeros to 1 tensor(s):" in r.stdout and "2.weight" in r.stdout
    assert list(tmp_path.iterdir()) == [samples]


def test_output_rules(samples, tmp_path, run):
    src = tmp_path / "m.pt"
    src.write_bytes((samples / "mlp.pt").read_bytes())
    os.chmod(src, 0o640)
    before = src.read_bytes()
    # -o naming the input counts as --in-place; permissions kept
    r = run("init", src, "--scheme", "zeros", "-o", src)
    assert r.exit_code == 0 and src.read_bytes() != before
    assert stat.S_IMODE(os.stat(src).st_mode) == 0o640
    r = run("init", src, "--scheme", "ones", "--in-place")
    assert r.exit_code == 0 and torch.all(load(src)["0.weight"] == 1)
    # format follows -o's extension
    run("init", src, "--scheme", "ones", "-o", tmp_path / "x.safetensors")
    assert (tmp_path / "x.safetensors").read_bytes()[8:9] == b"{"
    r = run("init", src, "--scheme", "ones", "--in-place", "-o", tmp_path / "other.pt")
    assert r.exit_code == 2


def test_safetensors_target_refuses_extras(samples, tmp_path, run):
    r = run("init", samples / "train.pt", "--scheme", "ones", "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 1 and "epoch" in r.stderr and "--drop-extra" in r.stderr
    assert not (tmp_path / "o.safetensors").exists()
    r = run("init", samples / "train.pt", "--scheme", "ones", "--drop-extra", "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 0 and set(load(tmp_path / "o.safetensors")) == {"0.weight", "0.bias", "2.weight", "2.bias"}


@pytest.mark.parametrize("source", ["mlp.pt", "mlp.safetensors"])  # streamed path, and full-load path
def test_failed_write_leaves_target(samples, tmp_path, run, monkeypatch, source):
    target = tmp_path / "t.pt"
    target.write_bytes(b"precious")
    import paramtool.formats.pt as pt
    import paramtool.formats.storage as stream

    def boom(*args):
        path = next(a for a in args if isinstance(a, str))
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pt, "save", boom)
    monkeypatch.setattr(stream.ZipStorageFile, "patch", boom)
    r = run("init", samples / source, "--scheme", "ones", "-o", target)
    assert r.exit_code == 1 and "No space left" in r.stderr and r.stderr.count("\n") == 1
    assert target.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples", "t.pt"]


def test_unwritable_target_directory(samples, tmp_path, run):
    # (root ignores permission bits, so the directory is made unusable another way: it is a file, or absent)
    (tmp_path / "afile").write_text("x")
    for target in (tmp_path / "afile" / "o.pt", tmp_path / "absent" / "o.pt"):
        r = run("init", samples / "mlp.pt", "--scheme", "ones", "-o", target)
        assert r.exit_code == 1 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "samples"]


def test_module_spec_source_can_be_written(tmp_path, run):
    r = run("init", "nn:Sequential(Linear(4, 8), ReLU(), Linear(8, 1))", "--scheme", "xavier", "-o", tmp_path / "mlp.pt")
    assert r.exit_code == 0, r.stderr
    assert list(load(tmp_path / "mlp.pt")) == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_terminal_stdout_is_usage_error(samples, run, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    from paramtool import writer
    from paramtool.errors import UsageError
    from paramtool.sources import resolve

    with pytest.raises(UsageError):
        writer.plan_output(resolve(str(samples / "mlp.pt")), None, False, None)


def test_schemes_listing(run):
    doc = run("schemes", "--json").json()
    names = {s["name"] for s in doc["schemes"]}
    assert {"normal", "uniform", "constant", "xavier_uniform", "kaiming_uniform", "masked_uniform"} <= names
    mu = next(s for s in doc["schemes"] if s["name"] == "masked_uniform")
    assert mu["options"] == {"low": -10, "high": 10, "threshold": 5}

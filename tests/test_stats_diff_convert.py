"""`stats` (with histograms), `diff` and `convert`."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from safetensors.torch import load_file

SAMPLES = ["mlp.pt", "rgnet.pt", "tied.pt", "bf16.pt", "mlp.safetensors", "rgnet.safetensors", "tied.safetensors",
           "bf16.safetensors", "train.pt"]


def load(path):
    return load_file(str(path)) if str(path).endswith(".safetensors") else torch.load(path, weights_only=True)


@pytest.mark.parametrize("name", ["mlp.pt", "rgnet.safetensors", "bf16.pt"])
def test_stats_match_torch(samples, run, name):
    sd = load(samples / name)
    doc = run("stats", samples / name, "--json").json()
    assert [t["name"] for t in doc["tensors"]] == list(sd)
    for row in doc["tensors"]:
        t = sd[row["name"]].double()
        assert math.isclose(row["mean"], t.mean().item(), rel_tol=1e-9, abs_tol=1e-12)
        if t.numel() > 1:
            assert math.isclose(row["std"], t.std().item(), rel_tol=1e-9)
        assert row["min"] == t.min().item() and row["max"] == t.max().item()
        assert math.isclose(row["norm"], t.norm().item(), rel_tol=1e-9)
        assert row["zeros"] == (t == 0).double().mean().item()


def test_stats_flags_nan(tmp_path, run):
    torch.save({"w": torch.tensor([1.0, float("nan"), float("inf"), 0.0])}, tmp_path / "n.pt")
    row = run("stats", tmp_path / "n.pt", "--json").json()["tensors"][0]
    assert row["nan"] == 1 and row["inf"] == 1 and row["mean"] == "nan"
    assert "1/1" in run("stats", tmp_path / "n.pt").stdout


def test_masked_uniform_histogram_shows_hole_and_spike(tmp_path, run):
    torch.save({"w": torch.zeros(128, 128)}, tmp_path / "z.pt")
    run("init", tmp_path / "z.pt", "--scheme", "masked_uniform", "--seed", "0", "--param", "all", "-o", tmp_path / "m.pt")
    doc = run("stats", tmp_path / "m.pt", "--hist", "--json").json()
    h = doc["histograms"]["w"]
    edges, counts = h["edges"], h["counts"]
    for (lo, hi), n in zip(zip(edges, edges[1:]), counts):
        if -5 < lo and hi < 5:
            assert n == 0, (lo, hi, n)
    assert h["zeros"] > 0.45 * 128 * 128 and h["zeros"] == max([h["zeros"]] + counts)
    text = run("stats", tmp_path / "m.pt", "--hist", env={"COLUMNS": "120", "NO_COLOR": "1"}).stdout
    zero_row = next(line for line in text.splitlines() if line.strip().startswith("= 0"))
    assert zero_row.count("█") == 40  # the spike is the tallest bar
    rows = [line for line in text.splitlines() if " .. " in line]
    empty = [r for r in rows if "█" not in r and "▏" not in r and r.rstrip().endswith(" 0")]
    assert len(empty) >= 6  # the hole between -5 and 5


GOLDEN_HIST = """\
w
         1 .. 1.5        │████████████████████████████████████████ 2
       1.5 .. 2          │                                         0
         2 .. 2.5        │████████████████████████████████████████ 2
       2.5 .. 3          │████████████████████████████████████████ 2
"""


def test_histogram_golden(tmp_path, run):
    torch.save({"w": torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0])}, tmp_path / "h.pt")
    r = run("stats", tmp_path / "h.pt", "--hist", "--bins", "4", env={"COLUMNS": "120", "NO_COLOR": "1"})
    assert r.stdout.endswith(GOLDEN_HIST)


def test_hist_png(samples, tmp_path, run):
    r = run("stats", samples / "mlp.pt", "--hist-png", tmp_path / "h.png")
    if importlib.util.find_spec("matplotlib") is None:
        assert r.exit_code == 1 and "matplotlib" in r.stderr
    else:
        assert r.exit_code == 0 and (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diff_self_and_after_init(samples, tmp_path, run):
    same = run("diff", samples / "rgnet.pt", samples / "rgnet.pt", "--json")
    assert same.exit_code == 0 and same.json()["changed"] == [] and same.json()["same"] == 18
    run("init", samples / "rgnet.pt", "--scheme", "ones", "--layer", "[0][0][0]", "--param", "all", "-o", tmp_path / "o.pt")
    d = run("diff", samples / "rgnet.pt", tmp_path / "o.pt", "--json")
    assert d.exit_code == 1
    assert [c["name"] for c in d.json()["changed"]] == ["0.block 0.0.weight", "0.block 0.0.bias"]
    assert d.json()["changed"][0]["max_abs_diff"] > 0


def test_diff_across_formats_and_tolerance(samples, tmp_path, run):
    assert run("diff", samples / "mlp.pt", samples / "mlp.safetensors").exit_code == 0
    run("convert", samples / "train.pt", tmp_path / "w.safetensors", "--drop-extra")
    assert run("diff", samples / "train.pt", tmp_path / "w.safetensors").exit_code == 0  # nested vs flat
    run("set", samples / "mlp.pt", "0.bias[0] += 1e-7", "-o", tmp_path / "near.pt")
    assert run("diff", samples / "mlp.pt", tmp_path / "near.pt").exit_code == 1
    assert run("diff", samples / "mlp.pt", tmp_path / "near.pt", "--atol", "1e-5").exit_code == 0
    d = run("diff", samples / "mlp.pt", samples / "bf16.pt", "--json").json()
    assert d["changed"][0]["a"]["dtype"] == "float32" and d["changed"][0]["b"]["dtype"] == "bfloat16"


def test_diff_added_removed_ties(samples, tmp_path, run):
    torch.save({"a": torch.ones(2), "b": torch.ones(2)}, tmp_path / "x.pt")
    t = torch.ones(2)
    torch.save({"a": t, "b": t, "c": torch.zeros(1)}, tmp_path / "y.pt")
    d = run("diff", tmp_path / "x.pt", tmp_path / "y.pt", "--json").json()
    assert d["added"] == ["c"] and d["removed"] == [] and d["ties_gained"] == [["a", "b"]]


def test_diff_error_is_exit_2(samples, tmp_path, run):
    (tmp_path / "bad.pt").write_bytes(b"junk")
    r = run("diff", samples / "mlp.pt", tmp_path / "bad.pt")
    assert r.exit_code == 2 and r.stderr.startswith("error:")


@pytest.mark.parametrize("name", SAMPLES)
def test_convert_roundtrip_bit_exact(samples, tmp_path, run, name):
    other = ".pt" if name.endswith(".safetensors") else ".safetensors"
    mid, back = tmp_path / ("mid" + other), tmp_path / ("back" + name[name.index("."):])
    extra = ["--drop-extra"] if name == "train.pt" else []
    assert run("convert", samples / name, mid, *extra).exit_code == 0
    assert run("convert", mid, back).exit_code == 0
    assert run("diff", mid, back).exit_code == 0
    if name != "train.pt":
        assert run("diff", samples / name, back).exit_code == 0
        a_ties = [g["names"] for g in run("ties", samples / name, "--json").json()["groups"]]
        b_ties = [g["names"] for g in run("ties", back, "--json").json()["groups"]]
        assert a_ties == b_ties


def test_convert_training_checkpoint_needs_drop_extra(samples, tmp_path, run):
    r = run("convert", samples / "train.pt", tmp_path / "w.safetensors")
    assert r.exit_code == 1 and "epoch" in r.stderr and "--drop-extra" in r.stderr
    assert not (tmp_path / "w.safetensors").exists()

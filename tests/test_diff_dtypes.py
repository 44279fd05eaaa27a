"""diff across dtypes: a cast is compared value by value in float64, with each side's NaN/Inf counts."""
from __future__ import annotations

import torch


def test_diff_of_a_cast_compares_values(tmp_path, run):
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    w[3, 1] = float("inf")
    torch.save({"w": w, "b": torch.ones(3)}, tmp_path / "a.pt")
    torch.save({"w": w.bfloat16(), "b": torch.ones(3)}, tmp_path / "b.pt")
    r = run("diff", tmp_path / "a.pt", tmp_path / "b.pt", "--json")
    assert r.exit_code == 1, r.stderr
    (changed,) = r.json()["changed"]
    finite = torch.isfinite(w)
    expected = (w[finite].double() - w.bfloat16()[finite].double()).abs().max().item()
    assert changed["name"] == "w" and changed["a"]["dtype"] == "float32" and changed["b"]["dtype"] == "bfloat16"
    assert changed["a"]["nonfinite"] == {"nan": 0, "inf": 1, "first_inf": [3, 1]}
    assert changed["b"]["nonfinite"]["first_inf"] == [3, 1]
    # inf - inf is NaN, as torch computes it: the largest difference of the finite values is checked apart
    assert changed["max_abs_diff"] == "nan"
    w[3, 1] = 0.0
    torch.save({"w": w, "b": torch.ones(3)}, tmp_path / "a.pt")
    torch.save({"w": w.bfloat16(), "b": torch.ones(3)}, tmp_path / "b.pt")
    (changed,) = run("diff", tmp_path / "a.pt", tmp_path / "b.pt", "--json").json()["changed"]
    assert abs(changed["max_abs_diff"] - (w.double() - w.bfloat16().double()).abs().max().item()) < 1e-12
    assert 0.999 < changed["cosine"] <= 1.0 and expected > 0
    r = run("diff", tmp_path / "a.pt", tmp_path / "b.pt")
    assert "float32 -> [4, 4] bfloat16, max abs diff" in r.stdout


def test_named_runs_collapse_like_numbered_ones(run, tmp_path):
    """The chapter's rgnet (``block 0`` … ``block 3``, four identical blocks) is one line, as ``h.0 … h.11`` is;
    a block that differs, or another stem, breaks the run."""
    block = {"0.weight": torch.zeros(8, 4), "0.bias": torch.zeros(8), "2.weight": torch.zeros(4, 8), "2.bias": torch.zeros(4)}
    sd = {f"block {i}.{k}": v.clone() for i in range(4) for k, v in block.items()}
    sd.update({"layer1.weight": torch.zeros(2, 2), "layer2.weight": torch.zeros(3, 3)})
    torch.save(sd, tmp_path / "rg.pt")
    out = run("inspect", tmp_path / "rg.pt").stdout
    assert "block 0 … block 3  4 ×" in out
    assert "layer1" in out and "layer2" in out and "layer1 … layer2" not in out

"""init --type CLASS, and normalization layers left alone unless named (issue 26)."""
from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

SPEC = "nn:Sequential(Linear(4, 8), LayerNorm(8), Linear(8, 1))"


def _load(path):
    return torch.load(path, weights_only=True)


def test_norm_gain_skipped_with_warning(tmp_path, run):
    out = tmp_path / "o.pt"
    r = run("init", SPEC, "--scheme", "normal", "--std", "0.02", "--seed", "1", "-o", out)
    assert r.exit_code == 0, r.stderr
    assert "skipped 1 normalization-layer tensor(s)" in r.stderr and "1.weight" in r.stderr
    sd = _load(out)
    assert torch.equal(sd["1.weight"], torch.ones(8))  # LayerNorm's gain kept
    assert sd["0.weight"].std() < 0.1  # the Linear weights were reinitialized with std 0.02


def test_norm_named_explicitly_is_initialized(tmp_path, run):
    out = tmp_path / "o.pt"
    r = run("init", SPEC, "--scheme", "constant", "--value", "3", "--layer", "1", "-o", out)
    assert r.exit_code == 0, r.stderr
    assert "normalization" not in r.stderr
    assert torch.equal(_load(out)["1.weight"], torch.full((8,), 3.0))
    out2 = tmp_path / "o2.pt"
    r = run("init", SPEC, "--scheme", "zeros", "--type", "LayerNorm", "--param", "all", "-o", out2)
    assert r.exit_code == 0, r.stderr
    sd = _load(out2)
    assert torch.equal(sd["1.weight"], torch.zeros(8)) and not torch.equal(sd["0.weight"], torch.zeros(8, 4))


def test_type_selects_by_class(tmp_path, run):
    r = run("init", SPEC, "--scheme", "normal", "--type", "nn.Linear", "--param", "all", "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["changed"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    r = run("init", SPEC, "--scheme", "normal", "--type", "Conv2d", "--dry-run")
    assert r.exit_code == 1 and r.stderr.startswith("error: --type Conv2d") and "LayerNorm, Linear" in r.stderr


def test_type_on_pickled_model(tmp_path, run):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    src = tmp_path / "m.pt"
    torch.save(model, src)
    r = run("init", src, "--scheme", "zeros", "--type", "Conv2d", "--param", "all", "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["changed"] == ["0.weight", "0.bias"]
    r = run("init", src, "--scheme", "normal", "--param", "all", "--dry-run", "--json")  # BatchNorm left alone
    assert set(r.json()["skipped"]) == {"1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"}


def test_type_on_state_dict_is_an_error(tmp_path, run):
    src = tmp_path / "m.safetensors"
    save_file({"0.weight": torch.ones(2, 2)}, src)
    r = run("init", src, "--scheme", "normal", "--type", "Linear", "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 1
    assert r.stderr.startswith("error: --type needs module classes") and "--layer" in r.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_gpt2_block_keeps_layer_norms(tmp_path, run):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
    src = tmp_path / "gpt2.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, src)
    out = tmp_path / "o.safetensors"
    r = run("init", src, "--scheme", "normal", "--std", "0.02", "--layer", "transformer.h.1", "--zero-bias", "-o", out)
    assert r.exit_code == 0, r.stderr
    assert "transformer.h.1.ln_1.weight" in r.stderr and "transformer.h.1.ln_2.weight" in r.stderr
    before, after = load_file(src), load_file(out)
    for name in ("ln_1.weight", "ln_2.weight", "ln_1.bias", "ln_2.bias"):
        assert torch.equal(after[f"transformer.h.1.{name}"], before[f"transformer.h.1.{name}"]), name
    assert not torch.equal(after["transformer.h.1.mlp.c_fc.weight"], before["transformer.h.1.mlp.c_fc.weight"])
    # named: the glob names the norm modules themselves
    r = run("init", src, "--scheme", "ones", "--layer", "*.ln_1", "-o", out)
    assert r.exit_code == 0 and "normalization" not in r.stderr
    assert torch.equal(load_file(out)["transformer.h.0.ln_1.weight"], torch.ones(16))


def test_glob_over_blocks_does_not_name_norms(tmp_path, run):
    spec = "nn:Sequential(Sequential(Linear(4, 4), LayerNorm(4)), Sequential(Linear(4, 4), LayerNorm(4)))"
    r = run("init", spec, "--scheme", "normal", "--layer", "*", "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["changed"] == ["0.0.weight", "1.0.weight"]
    r = run("init", spec, "--scheme", "normal", "--layer", "*.1", "--dry-run", "--json")  # the norm modules themselves
    assert r.json()["changed"] == ["0.1.weight", "1.1.weight"]

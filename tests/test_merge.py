"""``merge``: the four methods checked against torch computations written here from mergekit's definitions, on
real transformers models (GPT-2, Llama) saved by ``save_pretrained``, and on training checkpoints."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file


def _tiny_llama(seed: int, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(dtype)


def _tiny_gpt2(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2))


def _dirs(tmp_path, make, count):
    out = []
    for i in range(count):
        d = tmp_path / f"m{i}"
        make(i).save_pretrained(d)
        out.append(d)
    return out


def _weights(d):
    return load_file(str(d / "model.safetensors"))


# ---------------------------------------------------------------- reference computations (mergekit's definitions)


def ref_ties(tensors, base, weights, density, lam=1.0):
    deltas = []
    for t in tensors:
        d = t.float() - base.float()
        k = int(density * d.numel())
        keep = torch.topk(d.abs().flatten(), k).indices
        trimmed = torch.zeros_like(d).flatten()
        trimmed[keep] = d.flatten()[keep]
        deltas.append(trimmed.view_as(d))
    w = torch.tensor(weights).view(-1, *([1] * base.dim()))
    weighted = torch.stack(deltas) * w
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(weighted) == sign).float()
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    return base.float() + lam * (weighted * agree).sum(0) / divisor


def ref_slerp(a, b, t):
    v0, v1 = a.double().flatten(), b.double().flatten()
    u0, u1 = v0 / v0.norm(), v1 / v1.norm()
    dot = float(u0 @ u1)
    if abs(dot) > 0.9995:
        return ((1 - t) * v0 + t * v1).view_as(a)
    theta = math.acos(dot)
    return ((math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)).view_as(a)


# ---------------------------------------------------------------- the methods


def test_linear_weighted_average_of_model_directories_loads_in_transformers(tmp_path, run):
    from transformers import GPT2LMHeadModel

    dirs = _dirs(tmp_path, _tiny_gpt2, 3)
    (dirs[0] / "tokenizer_config.json").write_text('{"model_max_length": 16}')
    out = tmp_path / "soup"
    r = run("merge", *dirs, "--weights", "1", "2", "5", "-o", out)
    assert r.exit_code == 0, r.stderr
    srcs = [_weights(d) for d in dirs]
    got = _weights(out)
    assert list(got) == list(srcs[0])  # the first source's order
    for name, value in got.items():
        want = (srcs[0][name].float() * 1 + srcs[1][name].float() * 2 + srcs[2][name].float() * 5) / 8
        torch.testing.assert_close(value, want, rtol=0, atol=1e-6)
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 16}'  # sidecars kept
    assert (out / "config.json").read_bytes() == (dirs[0] / "config.json").read_bytes()
    model = GPT2LMHeadModel.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tie declared by config
    torch.testing.assert_close(model.transformer.h[1].mlp.c_fc.weight, got["transformer.h.1.mlp.c_fc.weight"])


def test_default_weights_average_and_bf16_is_accumulated_in_float32(tmp_path, run):
    dirs = _dirs(tmp_path, lambda i: _tiny_llama(i, torch.bfloat16), 4)
    out = tmp_path / "avg"
    assert run("merge", *dirs, "-o", out).exit_code == 0
    srcs = [_weights(d) for d in dirs]
    for name, value in _weights(out).items():
        assert value.dtype == torch.bfloat16
        want = sum(s[name].float() for s in srcs) / 4  # float32 sum, rounded once
        assert torch.equal(value, want.to(torch.bfloat16)), name


def test_task_arithmetic_against_torch(tmp_path, run):
    base, a, b = _dirs(tmp_path, _tiny_llama, 3)
    out = tmp_path / "ta"
    r = run("merge", a, b, "--method", "task-arithmetic", "--base", base, "--weights", "0.7,0.4", "--lambda", "0.5",
            "-o", out)
    assert r.exit_code == 0, r.stderr
    wb, wa, wbb = _weights(base), _weights(a), _weights(b)
    for name, value in _weights(out).items():
        want = wb[name] + 0.5 * (0.7 * (wa[name] - wb[name]) + 0.4 * (wbb[name] - wb[name]))
        torch.testing.assert_close(value, want, rtol=0, atol=2e-6)


def test_ties_against_torch(tmp_path, run):
    base, a, b, c = _dirs(tmp_path, _tiny_llama, 4)
    out = tmp_path / "ties"
    r = run("merge", a, b, c, "--method", "ties", "--base", base, "--density", "0.3", "--weights", "1", "0.5", "2",
            "-o", out)
    assert r.exit_code == 0, r.stderr
    wb = _weights(base)
    srcs = [_weights(d) for d in (a, b, c)]
    got = _weights(out)
    for name, value in got.items():
        want = ref_ties([s[name] for s in srcs], wb[name], [1, 0.5, 2], 0.3)
        torch.testing.assert_close(value, want, rtol=0, atol=2e-6)
    name = "model.layers.0.mlp.up_proj.weight"  # trimmed: most entries take one source's delta or none
    assert not torch.equal(got[name], wb[name])


def test_slerp_against_torch(tmp_path, run):
    a, b = _dirs(tmp_path, _tiny_llama, 2)
    out = tmp_path / "slerp"
    assert run("merge", a, b, "--method", "slerp", "--t", "0.3", "-o", out).exit_code == 0
    wa, wb = _weights(a), _weights(b)
    got = _weights(out)
    for name, value in got.items():
        torch.testing.assert_close(value, ref_slerp(wa[name], wb[name], 0.3).float(), rtol=0, atol=2e-6)
    # the norms (per-layer RMSNorm weights are all ones in both) are colinear: linear interpolation, i.e. ones
    assert torch.equal(got["model.norm.weight"], wa["model.norm.weight"])
    same = tmp_path / "w"
    assert run("merge", a, b, "--method", "slerp", "--weights", "0.7", "0.3", "-o", same).exit_code == 0
    assert all(torch.equal(v, got[n]) for n, v in _weights(same).items())  # t = w2 / (w1 + w2)


# ---------------------------------------------------------------- what is kept, what is refused


def test_training_checkpoints_with_key_keep_the_first_ones_container(tmp_path, run):
    paths = []
    for i in range(3):
        torch.manual_seed(i)
        lin = torch.nn.Linear(4, 3)
        sd = lin.state_dict()
        sd["alias"] = sd["weight"]  # a tie (shared storage)
        opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
        lin(torch.randn(2, 4)).sum().backward()
        opt.step()
        p = tmp_path / f"ckpt-{i}.pt"
        torch.save({"epoch": i, "model": sd, "optimizer": opt.state_dict()}, p)
        paths.append(p)
    out = tmp_path / "avg.pt"
    r = run("merge", *paths, "--key", "model", "-o", out)
    assert r.exit_code == 0, r.stderr
    got = torch.load(out, weights_only=True)
    srcs = [torch.load(p, weights_only=True) for p in paths]
    assert got["epoch"] == 0 and got["optimizer"]["param_groups"] == srcs[0]["optimizer"]["param_groups"]
    for name in ("weight", "bias"):
        torch.testing.assert_close(got["model"][name], sum(s["model"][name] for s in srcs) / 3, rtol=0, atol=1e-6)
    assert got["model"]["alias"].untyped_storage().data_ptr() == got["model"]["weight"].untyped_storage().data_ptr()


def test_mismatches_are_listed_and_layer_narrows(tmp_path, run):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"x.weight": torch.ones(2, 2), "y.weight": torch.ones(3), "z": torch.ones(1)}, a)
    save_file({"x.weight": torch.zeros(2, 2), "y.weight": torch.zeros(4), "w": torch.ones(1)}, b)
    r = run("merge", a, b, "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 1
    assert r.stderr.startswith("error: the sources do not match")
    assert "not in" in r.stderr and "z" in r.stderr and "only in" in r.stderr and "'y.weight' is float32[3]" in r.stderr
    assert not (tmp_path / "o.safetensors").exists()
    r = run("merge", a, b, "--layer", "x", "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 0, r.stderr
    got = load_file(str(tmp_path / "o.safetensors"))
    assert torch.equal(got["x.weight"], torch.full((2, 2), 0.5)) and torch.equal(got["y.weight"], torch.ones(3))


def test_dtype_mismatch_and_usage_errors(tmp_path, run):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"x": torch.ones(2)}, a)
    save_file({"x": torch.ones(2, dtype=torch.float16)}, b)
    r = run("merge", a, b, "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 1 and "float16[2]" in r.stderr
    assert run("merge", a, b, "--method", "ties", "-o", tmp_path / "o.pt").exit_code == 2  # no --base
    assert run("merge", a, b, a, "--method", "slerp", "-o", tmp_path / "o.pt").exit_code == 2
    assert run("merge", a, b, "--weights", "1", "-o", tmp_path / "o.pt").exit_code == 2
    assert run("merge", a, "-o", tmp_path / "o.pt").exit_code == 2


def test_dry_run_json_and_stdout_pipe(tmp_path, run):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"x": torch.ones(2), "n": torch.tensor([3])}, a)
    save_file({"x": torch.zeros(2), "n": torch.tensor([4])}, b)
    r = run("merge", a, b, "--dry-run", "--json")
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    assert doc["action"] == "merge (linear)" and doc["changed"] == ["x"]
    r = run("merge", a, b, "-o", "-")
    assert r.exit_code == 0
    out = tmp_path / "piped.safetensors"
    out.write_bytes(r.stdout_bytes)
    got = load_file(str(out))
    assert torch.equal(got["x"], torch.full((2,), 0.5)) and torch.equal(got["n"], torch.tensor([3]))


def test_pt_into_safetensors_and_nn_sources(tmp_path, run):
    a = tmp_path / "a.pt"
    torch.manual_seed(0)
    torch.save(torch.nn.Linear(3, 2).state_dict(), a)
    spec = "nn:Sequential(Linear(3, 2))"  # names 0.weight, 0.bias: no match for weight, bias
    r = run("merge", a, spec, "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 1 and "do not match" in r.stderr
    b = tmp_path / "b.pt"
    torch.save({k: v * 3 for k, v in torch.load(a).items()}, b)
    r = run("merge", a, b, "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 0, r.stderr
    got = load_file(str(tmp_path / "o.safetensors"))
    torch.testing.assert_close(got["weight"], torch.load(a)["weight"] * 2)


@pytest.mark.parametrize("density", [0.0, 1.5])
def test_density_out_of_range(tmp_path, run, density):
    a = tmp_path / "a.safetensors"
    save_file({"x": torch.ones(2)}, a)
    r = run("merge", a, a, "--method", "ties", "--base", a, "--density", str(density), "-o", tmp_path / "o.pt")
    assert r.exit_code == 2 and "--density" in r.stderr


def test_sharded_model_directories_stay_sharded_and_load(tmp_path, run):
    from transformers import LlamaForCausalLM

    dirs = []
    for i in range(2):
        d = tmp_path / f"s{i}"
        _tiny_llama(i).save_pretrained(d, max_shard_size="20KB")
        dirs.append(d)
    out = tmp_path / "avg"
    r = run("merge", *dirs, "-o", out)
    assert r.exit_code == 0, r.stderr
    assert (out / "model.safetensors.index.json").read_bytes() == (dirs[0] / "model.safetensors.index.json").read_bytes()
    merged = LlamaForCausalLM.from_pretrained(out).state_dict()
    a, b = (LlamaForCausalLM.from_pretrained(d).state_dict() for d in dirs)
    for name, value in merged.items():
        torch.testing.assert_close(value, (a[name] + b[name]) / 2, rtol=0, atol=1e-6)


def test_python_built_sources_are_read_once(tmp_path, run):
    factory = tmp_path / "models.py"
    factory.write_text("import torch\n\ndef a():\n    torch.manual_seed(1)\n    return torch.nn.Linear(3, 2)\n\n"
                       "def b():\n    torch.manual_seed(2)\n    return torch.nn.Linear(3, 2)\n")
    out = tmp_path / "m.pt"
    r = run("merge", f"{factory}:a", f"{factory}:b", "--method", "slerp", "--t", "0.25", "-o", out)
    assert r.exit_code == 0, r.stderr
    torch.manual_seed(1)
    a = torch.nn.Linear(3, 2).state_dict()
    torch.manual_seed(2)
    b = torch.nn.Linear(3, 2).state_dict()
    got = torch.load(out, weights_only=True)
    for name in ("weight", "bias"):
        torch.testing.assert_close(got[name], ref_slerp(a[name], b[name], 0.25).float(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- the core, without the command line


def test_core_methods():
    from paramtool import merge as m

    t = torch.tensor([0.1, -3.0, 2.0, -0.5])
    assert torch.equal(m.trim(t, 0.5), torch.tensor([0.0, -3.0, 2.0, 0.0]))  # the two largest magnitudes
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    mid = m.slerp(a, b, 0.5)  # a quarter turn, halved: 45 degrees, the norms interpolated along the arc
    torch.testing.assert_close(mid, torch.tensor([math.sin(math.pi / 4), 2 * math.sin(math.pi / 4)]))
    assert torch.equal(a, torch.tensor([1.0, 0.0]))  # inputs are never changed in place
    base = torch.zeros(3)
    spec = m.method_of("ties", 2, [1.0, 1.0], True, 1.0, None, None)
    got = m.combine(spec, [torch.tensor([1.0, -1.0, 2.0]), torch.tensor([3.0, 1.0, -1.0])], base)
    # signs elected by the sum: +, 0 (>= 0: +), +; only agreeing entries averaged
    assert torch.equal(got, torch.tensor([2.0, 1.0, 2.0]))
    assert torch.equal(base, torch.zeros(3))
    with pytest.raises(Exception, match="--t goes with"):
        m.method_of("linear", 2, None, False, None, None, 0.3)

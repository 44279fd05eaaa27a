"""LoRA adapters made by PEFT (``get_peft_model`` + ``save_pretrained``) on tiny transformers models: ``lora merge``
equals PEFT's ``merge_and_unload()``, ``lora extract`` writes what ``PeftModel.from_pretrained`` loads, and
``inspect``/``stats``/``diff`` describe adapter directories."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

peft = pytest.importorskip("peft")


def _gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0))


def _llama(seed=0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    return LlamaForCausalLM(config).to(dtype)


def _adapter(model, path, **config):
    """A PEFT adapter with non-zero B (init_lora_weights=False), saved; returns PEFT's merged model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    wrapped = get_peft_model(model, LoraConfig(init_lora_weights=False, **config))
    wrapped.save_pretrained(path)
    return wrapped.merge_and_unload()


def _state(directory):
    path = directory / "model.safetensors"
    return load_file(str(path)) if path.exists() else torch.load(directory / "pytorch_model.bin", weights_only=True)


# ---------------------------------------------------------------- lora merge


def test_gpt2_conv1d_embedding_rslora_modules_to_save_equal_merge_and_unload(tmp_path, run):
    from transformers import GPT2LMHeadModel

    base = tmp_path / "base"
    _gpt2().save_pretrained(base)
    from peft import PeftModel

    adapter = tmp_path / "adapter"
    _adapter(GPT2LMHeadModel.from_pretrained(base), adapter, r=4, lora_alpha=8,
             target_modules=["c_attn", "c_proj", "wte"], fan_in_fan_out=True, use_rslora=True,
             modules_to_save=["ln_f"], bias="lora_only")
    trained = load_file(str(adapter / "adapter_model.safetensors"))  # as if ln_f and the biases had been trained
    for k in trained:
        if "ln_f" in k or k.endswith("c_attn.base_layer.bias"):
            trained[k] = trained[k] + 0.5
    save_file(trained, str(adapter / "adapter_model.safetensors"))
    merged = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), adapter).merge_and_unload()
    out = tmp_path / "merged"
    r = run("lora", "merge", base, tmp_path / "adapter", out)
    assert r.exit_code == 0, r.stderr
    assert "lm_head.weight changed with transformer.wte.weight" in r.stderr  # the tie config.json declares
    want = {k: v for k, v in merged.state_dict().items() if k != "lm_head.weight"}
    got = _state(out)
    assert list(got) == list(_state(base))  # the base's layout and order
    base_sd = _state(base)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-6, msg=name)
    changed = {n for n in got if not torch.equal(got[n], base_sd[n])}
    assert {"transformer.h.0.attn.c_proj.weight", "transformer.h.1.mlp.c_proj.weight", "transformer.wte.weight",
            "transformer.ln_f.weight", "transformer.ln_f.bias", "transformer.h.1.attn.c_attn.bias"} <= changed
    loaded = GPT2LMHeadModel.from_pretrained(out).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(loaded(ids).logits, merged.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    bare = tmp_path / "bare.safetensors"  # no config.json: square Conv1D weights (c_proj) go by fan_in_fan_out
    bare.write_bytes((base / "model.safetensors").read_bytes())
    assert run("lora", "merge", bare, adapter, "-o", tmp_path / "bare-merged.safetensors").exit_code == 0
    assert all(torch.equal(v, got[n]) for n, v in load_file(str(tmp_path / "bare-merged.safetensors")).items())


def test_llama_bf16_rank_and_alpha_patterns_from_a_bare_file(tmp_path, run):
    from transformers import LlamaForCausalLM

    base = tmp_path / "base"
    _llama(dtype=torch.bfloat16).save_pretrained(base)
    merged = _adapter(LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16), tmp_path / "adapter", r=4,
                      lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                      rank_pattern={"down_proj": 2}, alpha_pattern={"layers.1.self_attn.v_proj": 3})
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"]
    single = tmp_path / "weights.safetensors"  # no config.json beside it: the shapes decide
    single.write_bytes((base / "model.safetensors").read_bytes())
    out = tmp_path / "merged.safetensors"
    r = run("lora", "merge", single, tmp_path / "adapter", "-o", out)
    assert r.exit_code == 0, r.stderr
    got = load_file(str(out))
    for name, value in merged.state_dict().items():
        assert got[name].dtype == torch.bfloat16
        # PEFT adds the bf16-rounded update to the bf16 weight; paramtool rounds the float32 sum once
        torch.testing.assert_close(got[name].float(), value.float(), rtol=2 * 2 ** -7, atol=1e-6, msg=name)  # 2 ulp
    wb = load_file(str(single))
    a = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    pre = "base_model.model.model.layers.1.self_attn.v_proj"
    exact = wb["model.layers.1.self_attn.v_proj.weight"].float() + \
        (a[f"{pre}.lora_B.weight"].float() @ a[f"{pre}.lora_A.weight"].float()) * (3 / 4)
    assert torch.equal(got["model.layers.1.self_attn.v_proj.weight"], exact.to(torch.bfloat16))


def test_pt_base_stays_pt_and_adapter_on_inner_model_names(tmp_path, run):
    from transformers import LlamaForCausalLM

    base = tmp_path / "base"
    _llama().save_pretrained(base, safe_serialization=False)
    merged = _adapter(LlamaForCausalLM.from_pretrained(base), tmp_path / "adapter", r=2, lora_alpha=4,
                      target_modules=["o_proj"])
    inner = tmp_path / "inner.pt"  # the bare LlamaModel's names: model.layers.0 -> layers.0
    torch.save({k.removeprefix("model."): v for k, v in _state(base).items() if k.startswith("model.")}, inner)
    out = tmp_path / "merged.pt"
    assert run("lora", "merge", inner, tmp_path / "adapter", "-o", out).exit_code == 0
    got = torch.load(out, weights_only=True)
    want = merged.state_dict()
    for name in ("layers.0.self_attn.o_proj.weight", "layers.1.self_attn.o_proj.weight", "layers.0.mlp.up_proj.weight"):
        torch.testing.assert_close(got[name], want["model." + name], rtol=1e-6, atol=1e-6)


def test_dora_is_refused_by_name_and_nothing_is_written(tmp_path, run):
    from transformers import LlamaForCausalLM

    base = tmp_path / "base"
    _llama().save_pretrained(base)
    _adapter(LlamaForCausalLM.from_pretrained(base), tmp_path / "adapter", r=2, target_modules=["q_proj"], use_dora=True)
    out = tmp_path / "merged"
    r = run("lora", "merge", base, tmp_path / "adapter", "-o", out)
    assert r.exit_code == 1 and "DoRA (use_dora)" in r.stderr and r.stderr.startswith("error:")
    assert not out.exists()
    r = run("inspect", tmp_path / "adapter", "--json")
    assert r.json()["adapter"]["variant"] == "DoRA (use_dora)"


def test_wrong_base_is_an_error(tmp_path, run):
    from transformers import LlamaForCausalLM

    base = tmp_path / "base"
    _llama().save_pretrained(base)
    _adapter(LlamaForCausalLM.from_pretrained(base), tmp_path / "adapter", r=2, target_modules=["q_proj"])
    other = tmp_path / "other.safetensors"
    save_file({"x.weight": torch.ones(2, 2)}, other)
    r = run("lora", "merge", other, tmp_path / "adapter", "-o", tmp_path / "o.safetensors")
    assert r.exit_code == 1 and "not this adapter's base" in r.stderr
    r = run("lora", "merge", base, base, "-o", tmp_path / "o")
    assert r.exit_code == 1 and "not a PEFT adapter" in r.stderr


# ---------------------------------------------------------------- inspect, stats, diff


def test_inspect_stats_diff_on_adapter_directories(tmp_path, run):
    from transformers import LlamaForCausalLM

    base = tmp_path / "base"
    _llama().save_pretrained(base)
    _adapter(LlamaForCausalLM.from_pretrained(base), tmp_path / "a1", r=4, lora_alpha=8, target_modules=["q_proj"])
    doc = run("inspect", tmp_path / "a1", "--json").json()
    ad = doc["adapter"]
    assert (ad["r"], ad["lora_alpha"], ad["target_modules"]) == (4, 8, ["q_proj"])
    assert [p["modifies"] for p in ad["pairs"]] == ["model.layers.0.self_attn.q_proj.weight",
                                                     "model.layers.1.self_attn.q_proj.weight"]
    assert ad["pairs"][0]["scale"] == 2.0 and ad["pairs"][0]["a_shape"] == [4, 16]
    text = run("inspect", tmp_path / "a1").stdout
    assert "model.layers.0.self_attn.q_proj.weight += 2 · B·A" in text
    stats = run("stats", tmp_path / "a1", "--json").json()
    w = load_file(str(tmp_path / "a1" / "adapter_model.safetensors"))
    pre = "base_model.model.model.layers.1.self_attn.q_proj"
    norm = float((w[f"{pre}.lora_B.weight"].double() @ w[f"{pre}.lora_A.weight"].double()).norm() * 2)
    assert stats["adapter_updates"][1]["modifies"] == "model.layers.1.self_attn.q_proj.weight"
    assert stats["adapter_updates"][1]["norm"] == pytest.approx(norm, rel=1e-9)
    _adapter(LlamaForCausalLM.from_pretrained(base), tmp_path / "a2", r=4, lora_alpha=8, target_modules=["q_proj"])
    assert run("diff", tmp_path / "a1", tmp_path / "a1").exit_code == 0
    torch.manual_seed(5)
    save_file({k: v + torch.randn_like(v) if "layers.0" in k else v for k, v in w.items()},
              str(tmp_path / "a2" / "adapter_model.safetensors"))
    r = run("diff", tmp_path / "a1", tmp_path / "a2", "--json")
    assert r.exit_code == 1
    assert {c["name"] for c in r.json()["changed"]} == {f"base_model.model.model.layers.0.self_attn.q_proj.lora_{x}.weight"
                                                         for x in "AB"}
    assert r.json()["adapter"] == {"config": {}, "updates_changed": ["model.layers.0.self_attn.q_proj.weight"]}
    config = json.loads((tmp_path / "a1" / "adapter_config.json").read_text())
    (tmp_path / "a3").mkdir()
    (tmp_path / "a3" / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 16}))
    (tmp_path / "a3" / "adapter_model.safetensors").write_bytes((tmp_path / "a1" / "adapter_model.safetensors").read_bytes())
    r = run("diff", tmp_path / "a1", tmp_path / "a3")  # same tensors, another scale: different adapters
    assert r.exit_code == 1 and "~ adapter lora_alpha: 8 -> 16" in r.stdout


# ---------------------------------------------------------------- lora extract


def _tuned(model, seed, scale=0.05):
    """A "fine-tune": a low-rank change (rank 2) to every Linear/Conv1D/Embedding weight."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p += scale * (torch.randn(p.shape[0], 2) @ torch.randn(2, p.shape[1]))
    return model


def test_extract_gpt2_loads_in_peft_and_reproduces_the_fine_tune(tmp_path, run):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    base, tuned = tmp_path / "base", tmp_path / "tuned"
    _gpt2().save_pretrained(base)
    _tuned(GPT2LMHeadModel.from_pretrained(base), 3).save_pretrained(tuned)
    out = tmp_path / "adapter"
    r = run("lora", "extract", base, tuned, "--rank", "2", "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    doc = r.json()
    names = {t["name"] for t in doc["tensors"]}
    assert {"transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.wpe.weight"} <= names
    assert all(t["energy"] == pytest.approx(1.0, abs=1e-6) for t in doc["tensors"])  # rank-2 changes, rank 2 kept
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["r"] == 2
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), out)
    merged = peft_model.merge_and_unload().state_dict()
    want = _state(tuned)
    for name, value in want.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-5, atol=1e-5, msg=name)


def test_extract_low_rank_reports_the_energy_kept(tmp_path, run):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base, tuned = tmp_path / "base", tmp_path / "tuned"
    _llama().save_pretrained(base)
    _tuned(LlamaForCausalLM.from_pretrained(base), 4).save_pretrained(tuned)
    out = tmp_path / "adapter"
    r = run("lora", "extract", base, tuned, "--rank", "1", "--layer", "model.layers.0.mlp", "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    doc = r.json()
    assert sorted(t["name"] for t in doc["tensors"]) == [f"model.layers.0.mlp.{p}_proj.weight" for p in ("down", "gate", "up")]
    wb, wt = _state(base), _state(tuned)
    for t in doc["tensors"]:
        s = torch.linalg.svdvals(wt[t["name"]].double() - wb[t["name"]].double())
        assert t["energy"] == pytest.approx(float(s[0] ** 2 / (s ** 2).sum()), rel=1e-5)
        assert t["energy"] < 1
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), out).merge_and_unload().state_dict()
    name = "model.layers.0.mlp.up_proj.weight"
    u, s, vh = torch.linalg.svd(wt[name] - wb[name])
    torch.testing.assert_close(merged[name], wb[name] + s[0] * torch.outer(u[:, 0], vh[0]), rtol=1e-5, atol=1e-5)
    assert torch.equal(merged["model.layers.1.mlp.up_proj.weight"], wb["model.layers.1.mlp.up_proj.weight"])
    text = run("lora", "extract", base, tuned, "--rank", "1", "--layer", "model.layers.0.mlp.up_proj", "-o",
               tmp_path / "again").stdout
    assert "model.layers.0.mlp.up_proj.weight" in text and "energy kept" in text


def test_extract_nothing_changed_is_an_error(tmp_path, run):
    a = tmp_path / "a.safetensors"
    save_file({"l.weight": torch.ones(3, 3)}, a)
    r = run("lora", "extract", a, a, "--rank", "2", "-o", tmp_path / "ad")
    assert r.exit_code == 1 and "nothing to extract" in r.stderr and not (tmp_path / "ad").exists()


def test_sharded_base_stays_sharded_and_loads(tmp_path, run):
    from transformers import LlamaForCausalLM

    base = tmp_path / "base"
    _llama().save_pretrained(base, max_shard_size="20KB")
    merged = _adapter(LlamaForCausalLM.from_pretrained(base), tmp_path / "adapter", r=2, lora_alpha=4,
                      target_modules=["q_proj", "down_proj", "embed_tokens"])
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.base_layer.weight" in saved  # PEFT saves the embedding beside its pair
    out = tmp_path / "merged"
    r = run("lora", "merge", base, tmp_path / "adapter", "-o", out)
    assert r.exit_code == 0, r.stderr
    assert (out / "model.safetensors.index.json").read_bytes() == (base / "model.safetensors.index.json").read_bytes()
    loaded = LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(loaded(ids).logits, merged.eval()(ids).logits, rtol=1e-5, atol=1e-5)

"""GGUF files written by the ``gguf`` package itself (``GGUFWriter``, quantized by ``gguf.quants``), from tiny
transformers models as llama.cpp's converter lays them out: inspect, show, stats, convert, and diff against the
checkpoint they came from."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")

HEADS, KV_HEADS = 4, 2


def _permute(w, heads):
    """llama.cpp's converter's row order for LLaMA's q/k projections (its ``permute``)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture
def llama(tmp_path):
    """A tiny Llama saved by save_pretrained, and its GGUF: 2-D weights Q8_0, the rest F32 (one F16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS))
    directory = tmp_path / "llama"
    model.save_pretrained(directory)
    path = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(64)])
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    types = {}
    for name, t in model.state_dict().items():
        if name.endswith("q_proj.weight"):
            t = _permute(t, HEADS)
        if name.endswith("k_proj.weight"):
            t = _permute(t, KV_HEADS)
        gname = table.get_name(name, try_suffixes=(".weight", ".bias"))
        a = t.numpy()
        if a.ndim == 2:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            types[gname] = "Q8_0"
        elif gname == "output_norm.weight":
            w.add_tensor(gname, a.astype(np.float16))
            types[gname] = "F16"
        else:
            w.add_tensor(gname, a)
            types[gname] = "F32"
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return directory, path, types


def test_inspect_lists_types_shapes_and_metadata(llama, run):
    _, path, types = llama
    doc = run("inspect", path, "--json").json()
    assert doc["format"] == "gguf"
    got = {t["name"]: t for t in doc["tensors"]}
    assert {n: t["quantization"] for n, t in got.items()} == types
    assert got["blk.0.attn_k.weight"]["shape"] == [16 * KV_HEADS * 2 // 2, 64]  # torch's order, not GGUF's
    assert got["output_norm.weight"]["dtype"] == "float16" and got["blk.0.ffn_up.weight"]["dtype"] == "float32"
    assert doc["metadata"]["general.architecture"] == "llama"
    assert doc["metadata"]["llama.attention.head_count"] == "4"
    assert doc["metadata"]["tokenizer.ggml.tokens"] == "[64 strs]"  # long arrays summarised
    text = run("inspect", path).stdout
    assert "stored as Q8_0 (16)" in text and "stored as F16 (1): output_norm.weight" in text


def test_show_stats_and_convert_dequantize(llama, run, tmp_path):
    _, path, _ = llama
    reader = gguf.GGUFReader(str(path))
    record = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    want = torch.from_numpy(gguf.quants.dequantize(record.data, record.tensor_type)).reshape(64, 128)
    doc = run("show", path, "blk.1.ffn_down.weight", "--json").json()
    assert torch.equal(torch.tensor(doc["values"]), want)
    stats = {t["name"]: t for t in run("stats", path, "--json").json()["tensors"]}
    assert stats["blk.1.ffn_down.weight"]["norm"] == pytest.approx(float(want.double().norm()), rel=1e-9)
    out = tmp_path / "deq.safetensors"
    assert run("convert", path, out).exit_code == 0
    got = load_file(str(out))
    assert torch.equal(got["blk.1.ffn_down.weight"], want) and got["output_norm.weight"].dtype == torch.float16
    r = run("diff", path, out, "--json")  # the file against its own dequantized copy, by the file's names
    assert r.exit_code == 0 and r.json()["same"] == 21 and not r.json()["changed"]
    out16 = tmp_path / "deq16.pt"
    assert run("convert", path, "--dtype", "bf16", "-o", out16).exit_code == 0
    loaded = torch.load(out16, weights_only=True)
    assert torch.equal(loaded["blk.1.ffn_down.weight"], want.to(torch.bfloat16))


def test_diff_against_the_checkpoint_reports_what_quantization_cost(llama, run):
    directory, path, types = llama
    r = run("diff", directory, path, "--json")
    assert r.exit_code == 1
    doc = r.json()
    assert doc["added"] == [] and doc["removed"] == []
    changed = {c["name"]: c for c in doc["changed"]}
    sd = load_file(str(directory / "model.safetensors"))
    assert set(changed) == {n for n, t in sd.items() if t.dim() == 2}
    assert doc["same"] == len(sd) - len(changed)  # F32 tensors come back exactly, and the norm's ones in F16
    reader = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.layers.0.mlp.up_proj.weight"):
        c = changed[name]
        assert c["quantization"] == "Q8_0" and c["gguf_name"].startswith(("blk.0.", "blk.1."))
        rec = reader[c["gguf_name"]]
        deq = torch.from_numpy(gguf.quants.dequantize(rec.data, rec.tensor_type)).double().reshape(sd[name].shape)
        ref = sd[name].double()
        if "q_proj" in name or "k_proj" in name:
            ref = _permute(ref, HEADS if "q_proj" in name else KV_HEADS)
        assert c["max_abs_diff"] == pytest.approx(float((ref - deq).abs().max()), rel=1e-9)
        assert c["cosine"] == pytest.approx(float(ref.flatten() @ deq.flatten() / (ref.norm() * deq.norm())), rel=1e-9)
        assert 0.9999 < c["cosine"] < 1  # the permutation is undone: q/k agree with the file
    text = run("diff", path, directory).stdout
    assert "model.layers.0.self_attn.q_proj.weight  max abs diff" in text and "(Q8_0 blk.0.attn_q.weight)" in text


def test_not_gguf_and_no_key(tmp_path, run, llama):
    _, path, _ = llama
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 8)
    r = run("inspect", bad)
    assert r.exit_code == 1 and r.stderr.startswith("error:") and "GGUF" in r.stderr
    r = run("inspect", path, "--key", "model")
    assert r.exit_code == 2
    assert json.loads(run("inspect", path, "--json").stdout)["num_tensors"] == 21


def test_names_and_metadata_from_the_file_cannot_drive_the_terminal(tmp_path, run):
    path = tmp_path / "hostile.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.name", "evil\x1b[31mred")
    w.add_tensor("x\x1b[2Jy.weight", np.ones((2, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = run("inspect", path)
    assert r.exit_code == 0 and "\x1b" not in r.stdout
    assert "x\\x1b[2Jy" in r.stdout and "evil\\x1b[31mred" in r.stdout


def test_a_weight_stored_transposed_is_compared_transposed(tmp_path, run):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    up = torch.randn(8, 32)
    save_file({"model.layers.0.mlp.up_proj.weight": up}, str(tmp_path / "c.safetensors"))
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("blk.0.ffn_up.weight", up.T.contiguous().numpy().astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    doc = run("diff", tmp_path / "c.safetensors", path, "--json").json()
    (c,) = doc["changed"]
    assert c["transposed"] is True and c["quantization"] == "F16"
    assert c["max_abs_diff"] == pytest.approx(float((up - up.half().float()).abs().max()), rel=1e-9)


def test_check_reads_dequantized_values(tmp_path, run):
    """`check` on a GGUF file: its rules run on the values as dequantized (zero and NaN tensors found)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.full((8,), np.nan, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = run("check", tmp_path / "t.gguf", "--json")
    assert r.exit_code == 1, r.stderr
    found = {(f["rule"], f["name"]) for f in r.json()["findings"]}
    assert found == {("zero", "blk.0.attn_q.weight"), ("nan", "output_norm.weight")}

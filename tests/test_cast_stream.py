"""``convert --dtype`` from a sharded checkpoint into one file, one storage at a time: the values are torch's
``.to(dtype)``, ties stay ties, the result loads in transformers and torch, and memory stays near a few storages
(a checkpoint twice the address space left converts; a limit smaller than one storage is one error line)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import address_space_limit, vm_peak_kib


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=64, n_head=2, vocab_size=500, n_positions=64))


def _hf_sharded(tmp_path) -> tuple[GPT2LMHeadModel, str]:
    """A model saved by transformers itself in several safetensors shards, with its config."""
    model = _gpt2()
    out = tmp_path / "hf"
    model.save_pretrained(out, max_shard_size="100KB")
    assert len(list(out.glob("model-*.safetensors"))) > 2
    return model, str(out)


def _pt_sharded(tmp_path) -> tuple[dict[str, torch.Tensor], str]:
    """The GPT-2 state dict in three ``pytorch_model`` shards as torch.save writes them: ``lm_head.weight`` and
    ``transformer.wte.weight`` share one storage in the first shard (a tie)."""
    sd = _gpt2().state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
    names = ["lm_head.weight", "transformer.wte.weight"] + [n for n in sd if n not in ("lm_head.weight",
                                                                                       "transformer.wte.weight")]
    out = tmp_path / "pt"
    out.mkdir()
    chunks = [names[:8], names[8:20], names[20:]]
    weight_map = {}
    for i, chunk in enumerate(chunks, 1):
        shard = f"pytorch_model-{i:05d}-of-{len(chunks):05d}.bin"
        torch.save({n: sd[n] for n in chunk}, out / shard)
        weight_map.update({n: shard for n in chunk})
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sd, str(out)


def _same_cast(original: dict[str, torch.Tensor], got: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    assert set(got) == set(original)
    for name, t in original.items():
        want = t.to(dtype) if t.is_floating_point() else t
        assert got[name].dtype == want.dtype, name
        assert torch.equal(got[name], want), name


@pytest.mark.parametrize("flag, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_transformers_shards_into_one_safetensors_file(tmp_path, run, flag, dtype):
    model, src = _hf_sharded(tmp_path)
    out = tmp_path / "one"
    out.mkdir()
    r = run("convert", src, out / "model.safetensors", "--dtype", flag)
    assert r.exit_code == 0, r.stderr
    original = {}
    for shard in sorted(os.listdir(src)):
        if shard.endswith(".safetensors"):
            original.update(load_file(os.path.join(src, shard)))
    _same_cast(original, load_file(str(out / "model.safetensors")), dtype)
    shutil.copy(os.path.join(src, "config.json"), out / "config.json")
    loaded = GPT2LMHeadModel.from_pretrained(out, dtype=dtype)
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p.to(dtype)), name
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_torch_shards_into_one_file_keep_their_tie(tmp_path, run, suffix):
    sd, src = _pt_sharded(tmp_path)
    out = tmp_path / f"one{suffix}"
    r = run("convert", src, out, "--dtype", "bf16")
    assert r.exit_code == 0, r.stderr
    if suffix == ".pt":
        got = torch.load(out, weights_only=True)
        _same_cast(sd, got, torch.bfloat16)
        assert got["lm_head.weight"].data_ptr() == got["transformer.wte.weight"].data_ptr()
    else:  # one tensor stored, the other recorded as its alias: paramtool reads both, as one storage
        r = run("ties", out, "--json")
        assert r.exit_code == 0, r.stderr
        groups = [sorted(g["names"]) for g in json.loads(r.stdout)["groups"]]
        assert ["lm_head.weight", "transformer.wte.weight"] in groups
        stored = load_file(str(out))
        assert torch.equal(stored.get("lm_head.weight", stored.get("transformer.wte.weight")),
                           sd["lm_head.weight"].to(torch.bfloat16))


def test_keep_dtype_and_overflow_warning_across_shards(tmp_path, run):
    _, src = _hf_sharded(tmp_path)
    shards = sorted(p for p in os.listdir(src) if p.endswith(".safetensors"))
    last = os.path.join(src, shards[-1])
    part = load_file(last)
    big = next(n for n, t in part.items() if t.dim() == 2)
    part[big][0, :3] = torch.tensor([1e5, -7e4, 6e4])  # two beyond fp16's 65504
    save_file(part, last, metadata={"format": "pt"})
    out = tmp_path / "one.safetensors"
    r = run("convert", src, out, "--dtype", "fp16", "--keep-dtype", "*ln_f*")
    assert r.exit_code == 0, r.stderr
    assert f"2 value(s) overflow float16 and became inf: {big} (2)" in r.stderr
    got = load_file(str(out))
    assert got["transformer.ln_f.weight"].dtype == torch.float32
    assert got["transformer.h.0.attn.c_attn.weight"].dtype == torch.float16
    assert torch.isinf(got[big][0, :2]).all() and got[big][0, 2] == torch.tensor(6e4).half()


def test_one_file_into_the_other_format(tmp_path, run):
    """.pt -> .safetensors and back with --dtype: the same values and ties as the loaded path would write."""
    sd = _gpt2().state_dict()
    torch.save(sd, tmp_path / "a.pt")
    r = run("convert", tmp_path / "a.pt", tmp_path / "b.safetensors", "--dtype", "fp16")
    assert r.exit_code == 0, r.stderr
    r = run("convert", tmp_path / "b.safetensors", tmp_path / "c.pt", "--dtype", "bf16")
    assert r.exit_code == 0, r.stderr
    got = torch.load(tmp_path / "c.pt", weights_only=True)
    _same_cast({n: t.to(torch.float16) for n, t in sd.items()}, got, torch.bfloat16)
    assert got["lm_head.weight"].data_ptr() == got["transformer.wte.weight"].data_ptr()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cast_storage_counts_overflow_exactly(dtype):
    """Only finite values that become infinite count: not infs already there, not NaNs (which hide the result's
    min and max), with the count right across chunks."""
    from paramtool.surgery import cast_storage

    flat = torch.zeros((1 << 22) + 5, dtype=torch.float64)
    big = 1e300 if dtype == "bfloat16" else 1e5
    flat[[0, 3, (1 << 22) + 1]] = big  # the last in the second chunk
    flat[7] = -big
    flat[9] = float("inf")
    out, overflow = cast_storage(flat, dtype)
    assert torch.equal(out, flat.to(getattr(torch, dtype)))
    assert overflow == 4
    flat[11] = float("nan")
    assert cast_storage(flat, dtype)[1] == 4
    assert cast_storage(torch.ones(10, dtype=torch.float64), dtype)[1] == 0
    assert cast_storage(torch.empty(0), dtype)[1] == 0


# ---------------------------------------------------------------- memory




def _big_sharded(tmp_path, shards: int = 4) -> dict[str, torch.Tensor]:
    """``shards`` safetensors shards of two 64 MiB float32 tensors each (512 MiB in four)."""
    src = tmp_path / "big"
    src.mkdir()
    g = torch.Generator().manual_seed(3)
    sd = {f"layers.{i}.weight": torch.randn(4096, 4096, generator=g) for i in range(2 * shards)}
    weight_map = {}
    for s in range(shards):
        shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        names = [f"layers.{i}.weight" for i in (2 * s, 2 * s + 1)]
        save_file({n: sd[n] for n in names}, str(src / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in names})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sd


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="address-space limits and /proc are Linux's")
def test_sharded_cast_larger_than_its_memory_limit(tmp_path):
    """512 MiB of shards cast into one file with 256 MiB of address space above the program's own: a few
    storages at a time (loading the shards, even memory-mapped, does not fit)."""
    sd = _big_sharded(tmp_path)
    base = vm_peak_kib("import torch, zipfile, paramtool.cli, paramtool.convert_stream, paramtool.writer")
    for dst in ("one.safetensors", "one.pt"):
        r = subprocess.run([sys.executable, "-m", "paramtool", "convert", str(tmp_path / "big"), str(tmp_path / dst),
                            "--dtype", "bf16"], capture_output=True, text=True,
                           preexec_fn=address_space_limit((base + 256 * 1024) * 1024))
        assert r.returncode == 0, r.stderr
    _same_cast(sd, load_file(str(tmp_path / "one.safetensors")), torch.bfloat16)
    _same_cast(sd, torch.load(tmp_path / "one.pt", weights_only=True, mmap=True), torch.bfloat16)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="address-space limits and /proc are Linux's")
def test_sharded_cast_out_of_memory_is_one_error_line(tmp_path):
    _big_sharded(tmp_path, shards=2)
    base = vm_peak_kib("import torch, zipfile, paramtool.cli, paramtool.convert_stream, paramtool.writer")
    for dst in ("one.safetensors", "one.pt"):
        r = subprocess.run([sys.executable, "-m", "paramtool", "convert", str(tmp_path / "big"), str(tmp_path / dst),
                            "--dtype", "bf16"], capture_output=True, text=True,
                           preexec_fn=address_space_limit((base + 48 * 1024) * 1024))  # less than one 64 MiB storage
        assert r.returncode == 1, (r.returncode, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / dst).exists()
        assert not [p for p in os.listdir(tmp_path) if "paramtool-tmp" in p]

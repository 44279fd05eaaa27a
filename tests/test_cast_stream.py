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
    from paramtool.convert_stream import cast_storage

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
@pytest.mark.parametrize("path", ["as read", "torch"])
def test_cast_out_of_memory_is_one_error_line(tmp_path, path):
    """A memory limit below what the cast needs is one error line, with no output and no temporary file left:
    where storages are cast as they are read (a few 4 MiB chunks; the limit leaves 8 MiB above the program's
    imports) and where a storage is read whole and cast by torch (a tensor that is part of its storage; 48 MiB
    left for a 64 MiB storage)."""
    if path == "as read":
        _big_sharded(tmp_path, shards=2)
        src, outs, margin = tmp_path / "big", ("one.safetensors", "one.pt"), 8
        base = vm_peak_kib("import numpy, zipfile, concurrent.futures, paramtool.cli, paramtool.convert_stream, "
                           "paramtool.writer, paramtool.numeric")
    else:
        storage = torch.randn(4096 * 4096, generator=torch.Generator().manual_seed(1))
        halves = storage.view(2, 2048, 4096)
        torch.save({"a": halves[0], "b": halves[1]}, tmp_path / "views.pt")  # two views of one storage
        src, outs, margin = tmp_path / "views.pt", ("one.safetensors",), 48
        base = vm_peak_kib("import torch, zipfile, paramtool.cli, paramtool.convert_stream, paramtool.writer")
    for dst in outs:
        r = subprocess.run([sys.executable, "-m", "paramtool", "convert", str(src), str(tmp_path / dst),
                            "--dtype", "bf16"], capture_output=True, text=True,
                           preexec_fn=address_space_limit((base + margin * 1024) * 1024))
        assert r.returncode == 1, (r.returncode, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / dst).exists()
        assert not [p for p in os.listdir(tmp_path) if "paramtool-tmp" in p]


# ---------------------------------------------------------------- casts without torch

_PAIRS = [(a, b) for a in ("float64", "float32", "float16", "bfloat16") for b in ("float32", "float16", "bfloat16")
          if a != b]


def _bit_patterns(dtype: str) -> torch.Tensor:
    """Values of ``dtype`` that test a cast: every bit pattern of a 16-bit dtype; for float32 random patterns,
    the neighbours of every rounding boundary of bfloat16 and float16 and the edges (largest finite, infinities,
    NaNs with payloads, denormals); for float64 random patterns, values over 90 decades, and the edges of
    float32 and float16 (including a value that rounds differently directly and through float32)."""
    g = torch.Generator().manual_seed(5)
    if dtype in ("float16", "bfloat16"):
        return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(getattr(torch, dtype))
    if dtype == "float32":
        rand = torch.randint(-(1 << 31), (1 << 31) - 1, (1 << 18,), generator=g, dtype=torch.int64)
        high = torch.randint(0, 1 << 16, (2048,), generator=g, dtype=torch.int64) << 16
        low = torch.tensor([0x7FFF, 0x8000, 0x8001, 0x18000, 0x0FFF, 0x1000, 0x1001, 0x3000])
        edges = torch.tensor([0x7F7F8000, 0x7F7F7FFF, 0x7F7FFFFF, 0x7F800000, 0x7F800001, 0x7FBFFFFF, 0xFFFFFFFF,
                              0x477FE000, 0x477FEFFF, 0x477FF000, 0x33000000, 0x33000001, 0x387FE000, 1])
        bits = torch.cat([rand, (high[:, None] | low[None, :]).flatten(), edges, edges | (1 << 31)])
        return ((bits + (1 << 31)) % (1 << 32) - (1 << 31)).to(torch.int32).view(torch.float32)
    rand = torch.randint(-(1 << 63), (1 << 63) - 1, (1 << 17,), generator=g, dtype=torch.int64).view(torch.float64)
    spread = torch.randn(1 << 17, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-45, 45, (1 << 17,),
                                                                                            generator=g)
    edges = torch.tensor([3.4028235677973366e38, 3.4028235677973366e38 * (1 + 2 ** -25), 65504.0, 65520.0,
                          65519.99, 1 + 2 ** -11 + 2 ** -40, 1 + 2 ** -8 + 2 ** -30, 1e-8, 5e-324, 1e308,
                          float("inf"), float("nan")], dtype=torch.float64)
    return torch.cat([rand, spread, edges, -edges])


@pytest.mark.parametrize("src,dst", _PAIRS)
def test_cast_without_torch_gives_torchs_bits(src, dst):
    """``numeric.cast_values`` against torch's ``.to``: every value that is not a NaN gets torch's bits, NaNs
    stay NaNs, and the overflow count is the number of finite values torch turns infinite."""
    from paramtool import numeric

    x = _bit_patterns(src)
    want = x.to(getattr(torch, dst))
    raw = x.contiguous().view(torch.uint8).numpy()
    got_bytes, overflow = numeric.cast_values(memoryview(raw), src, dst, {})
    got = torch.frombuffer(bytearray(got_bytes), dtype=getattr(torch, dst))
    ints = torch.int32 if dst == "float32" else torch.int16
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got.view(ints)[~nan], want.view(ints)[~nan])
    assert overflow == int((torch.isinf(want) & torch.isfinite(x)).sum())
    assert overflow > 0 or src in ("float16", "bfloat16") or dst == "float32" and src == "float32"


def test_cast_chunks_across_chunks(tmp_path, monkeypatch):
    """``CastChunks`` over a storage of several chunks (and a short last one): the bytes torch's cast gives,
    the overflows of every chunk counted once; a storage that ends beyond the file is one FormatError."""
    from paramtool.errors import FormatError
    from paramtool.formats.storage import CastChunks, Chunks

    monkeypatch.setattr(CastChunks, "VALUES", 1000)
    x = torch.randn(4321, generator=torch.Generator().manual_seed(2))
    x[[5, 1500, 4320]] = 1e5  # one overflow in three chunks
    x[2500] = float("-inf")
    path = tmp_path / "values.bin"
    path.write_bytes(b"head" + x.numpy().tobytes())
    counted = []
    with open(path, "rb") as f:
        chunks = Chunks(f.fileno(), 4, x.numel() * 4, str(path)).cast("float32", "float16", counted.append)
        assert len(chunks) == x.numel() * 2
        got = b"".join(bytes(part) for part in chunks)
        assert got == x.to(torch.float16).numpy().tobytes()
        assert counted == [3]
        with pytest.raises(FormatError, match="ends beyond the file"):
            list(Chunks(f.fileno(), 4, x.numel() * 4 + 8, str(path)).cast("float32", "float16", counted.append))


@pytest.mark.parametrize("src,dst", [("one.safetensors", "out.safetensors"), ("one.safetensors", "out.pt"),
                                     ("one.pt", "out.safetensors"), ("hf", "out.safetensors"), ("hf", "out.pt")])
def test_convert_dtype_without_importing_torch(tmp_path, src, dst):
    """``convert --dtype`` of whole storages never imports torch (torch's import costs more than casting a
    gigabyte): from one file of either format and from shards, into either format, with torch's values."""
    from conftest import launch_without

    model, hf = _hf_sharded(tmp_path)
    sd = model.state_dict()
    if src == "one.safetensors":
        save_file({n: t.contiguous() for n, t in sd.items() if n != "lm_head.weight"}, str(tmp_path / src))
    elif src == "one.pt":
        torch.save({n: t for n, t in sd.items() if n != "lm_head.weight"}, tmp_path / src)
    source = hf if src == "hf" else str(tmp_path / src)
    r = launch_without(["convert", source, str(tmp_path / dst), "--dtype", "fp16"], ("torch",), entry="paramtool.cli")
    assert r.returncode == 0, r.stderr
    got = load_file(str(tmp_path / dst)) if dst.endswith(".safetensors") else \
        torch.load(tmp_path / dst, weights_only=True)
    _same_cast({n: t for n, t in sd.items() if n in got}, got, torch.float16)
    assert len(got) >= len(sd) - 1

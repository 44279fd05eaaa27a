"""Value commands at the speed of the disk: the fast paths give torch's numbers, convert streams bit-exact for
every pair of formats, patched copies go through the kernel, and the listing's --json path stays light.
(Correctness only: speed is measured by benchmarks/bench.py.)"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import zipfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from paramtool import stats as st
from paramtool.pipeline import ordered_map

from conftest import address_space_limit, launch_without, vm_peak_kib

N = 300_001  # more than one chunk (stats.CHUNK), not a multiple of it


def _num(v: float):
    """The contract's JSON convention for a float: non-finite numbers are the strings "nan", "inf", "-inf"."""
    v = float(v)
    return v if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(N, generator=g, dtype=torch.float64)
    with_nan = base.float().clone()
    with_nan[[5, 200_000]] = float("nan")
    with_inf = base.float().clone()
    with_inf[7] = float("inf")
    zeros = base.float().clone()
    zeros[::3] = 0
    return {
        "f32": (base * 0.02 + 1).float(),  # LayerNorm-like: a large mean, a small spread
        "f64": base * 1e3 - 5,
        "bf16": base.bfloat16(),
        "f16": (base * 3).half(),
        "zeros": zeros,
        "allzero": torch.zeros(1000),
        "nan": with_nan,
        "inf": with_inf,
        "i64": torch.randint(-1000, 1000, (N,), generator=g),
        "i8": torch.randint(-100, 100, (4096,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (4096,), generator=g, dtype=torch.uint8),
        "one": torch.tensor([3.5]),
        "2d": torch.randn(300, 1001, generator=g),
    }


@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
def test_stats_equal_plain_torch(tmp_path, run, ext):
    sd = _tensors()
    path = tmp_path / f"m{ext}"
    torch.save(sd, path) if ext == ".pt" else save_file(sd, str(path))
    rows = {r["name"]: r for r in run("stats", path, "--json").json()["tensors"]}
    for name, t in sd.items():
        row, d = rows[name], t.double()
        assert row["nan"] == int(torch.isnan(d).sum()) and row["inf"] == int(torch.isinf(d).sum()), name
        assert row["zeros"] == (d == 0).double().mean().item(), name
        if row["nan"]:
            assert row["mean"] == row["std"] == row["min"] == row["max"] == "nan"
            continue
        assert row["min"] == _num(d.min().item()) and row["max"] == _num(d.max().item()), name
        if row["inf"]:
            assert row["mean"] == _num(d.mean().item()) and row["std"] == "nan" and row["norm"] == "inf"
            continue
        assert math.isclose(row["mean"], d.mean().item(), rel_tol=1e-9, abs_tol=1e-12), name
        if d.numel() > 1:
            assert math.isclose(row["std"], d.std().item(), rel_tol=1e-9), name
        assert math.isclose(row["norm"], d.norm().item(), rel_tol=1e-9), name


def test_stats_hist_png_reads_each_tensor_once(tmp_path, run):
    sd = {"a": torch.randn(5000), "b": torch.zeros(100), "c": torch.tensor([1.0, float("nan"), 0.0])}
    reads: list[str] = []
    lock = threading.Lock()

    def tensor_of(name: str):
        with lock:
            reads.append(name)
        return sd[name]

    done = st.stats_many(tensor_of, list(sd), 20, True)
    assert sorted(reads) == sorted(sd)  # numbers, terminal histogram and PNG histogram from one read
    assert [r.name for r in done.results] == list(sd) and set(done.png) == set(sd)
    assert sum(done.png["a"].counts) == 5000 and done.png["b"].zeros == 100 and done.png["c"].nonfinite == 1
    torch.save(sd, tmp_path / "m.pt")
    r = run("stats", tmp_path / "m.pt", "--hist-png", tmp_path / "h.png")
    pytest.importorskip("matplotlib")
    assert r.exit_code == 0 and (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pool_keeps_order_and_bounds_work_in_flight():
    live, peak = [0], [0]
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        torch.randn(20000).sum()  # releases the GIL: threads really overlap
        with lock:
            live[0] -= 1
        return i * i

    assert list(ordered_map(work, range(50), workers=2)) == [i * i for i in range(50)]
    assert 1 <= peak[0] <= 3  # workers + one read ahead


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int32])
def test_diff_numbers_equal_plain_torch(tmp_path, run, dtype):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(N, generator=g).mul(100).to(dtype)
    b = a.clone()
    b[::1000] += 3
    same = torch.randn(64, generator=g)
    torch.save({"w": a, "s": same, "shape": torch.zeros(3)}, tmp_path / "a.pt")
    save_file({"w": b, "s": same.clone(), "shape": torch.zeros(4)}, str(tmp_path / "b.safetensors"))
    r = run("diff", tmp_path / "a.pt", tmp_path / "b.safetensors", "--json")
    assert r.exit_code == 1
    doc = r.json()
    assert doc["same"] == 1
    changed = {c["name"]: c for c in doc["changed"]}
    assert changed["shape"]["max_abs_diff"] is None and changed["shape"]["b"]["shape"] == [4]
    fa, fb = a.double(), b.double()
    c = changed["w"]
    assert c["max_abs_diff"] == (fa - fb).abs().max().item()
    assert math.isclose(c["max_rel_diff"], (fa - fb).abs().max().item() / fb.abs().max().item(), rel_tol=1e-12)
    assert math.isclose(c["cosine"], ((fa @ fb) / (fa.norm() * fb.norm())).item(), rel_tol=1e-9)
    tol = run("diff", tmp_path / "a.pt", tmp_path / "b.safetensors", "--json", "--atol", str(c["max_abs_diff"] + 0.5))
    assert [x["name"] for x in tol.json()["changed"]] == ["shape"]


def test_diff_nan_propagates(tmp_path, run):
    a = torch.tensor([1.0, 2.0, float("nan")])
    torch.save({"w": a}, tmp_path / "a.pt")
    torch.save({"w": torch.tensor([1.0, 2.5, 0.0])}, tmp_path / "b.pt")
    c = run("diff", tmp_path / "a.pt", tmp_path / "b.pt", "--json").json()["changed"][0]
    assert c["max_abs_diff"] == "nan" and c["cosine"] == "nan"


@pytest.mark.parametrize("libc", [True, False])
def test_bytes_equal_in_place_and_through_copies(tmp_path, monkeypatch, libc):
    """``bytes_equal`` by libc's memcmp on the buffers themselves and, where there is no libc, through small
    copies: a difference in the first byte, the last byte of a block, the last byte, and sizes that differ;
    mapped file bytes as diff reads them."""
    import mmap

    from paramtool import numeric

    if not libc:
        monkeypatch.setattr(numeric, "_MEMCMP", None)
    elif numeric._memcmp() is None:
        pytest.skip("no libc memcmp to call here")
    data = bytes(range(256)) * 20000  # 5 MB: several 1 MiB blocks and a short last one
    (tmp_path / "f").write_bytes(data)
    with open(tmp_path / "f", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        assert numeric.bytes_equal(memoryview(mm), memoryview(bytearray(data)))
        for at in (0, (1 << 20) - 1, 1 << 20, len(data) - 1):
            other = bytearray(data)
            other[at] ^= 1
            assert not numeric.bytes_equal(memoryview(mm), memoryview(other)), at
        assert not numeric.bytes_equal(memoryview(mm), memoryview(data[:-1]))
    assert numeric.bytes_equal(memoryview(b""), memoryview(bytearray()))


def test_ties_values_equal_bytes_only(tmp_path, run, monkeypatch):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 400, generator=g)
    sd = {"a": x, "b": x.clone(), "c": torch.randn(300, 400, generator=g), "d": x.clone(), "e": x.double(),
          "h": torch.tensor([float("nan")]), "i": torch.tensor([float("nan")])}
    save_file(sd, str(tmp_path / "m.safetensors"))
    groups = [g["names"] for g in run("ties", tmp_path / "m.safetensors", "--values", "--json").json()["groups"]]
    assert groups == [["a", "b", "d"], ["h", "i"]]  # same bytes (NaN included); not c, not the float64 copy
    from paramtool import numeric

    monkeypatch.setattr(numeric, "crc32", lambda *a: 0)  # every checksum collides: bytes still decide
    groups = [g["names"] for g in run("ties", tmp_path / "m.safetensors", "--values", "--json").json()["groups"]]
    assert groups == [["a", "b", "d"], ["h", "i"]]


def test_ties_values_samples_only_filter(tmp_path, run):
    """Equal 4 KiB samples (start, middle, end) are only a filter: a difference between them still decides."""
    x = torch.randn(300, 400, generator=torch.Generator().manual_seed(5))
    y = x.clone()
    y[100] += 1  # bytes 160000..161600: outside every sample
    save_file({"a": x, "b": y, "c": x.clone(), "d": y.clone()}, str(tmp_path / "m.safetensors"))
    groups = [g["names"] for g in run("ties", tmp_path / "m.safetensors", "--values", "--json").json()["groups"]]
    assert groups == [["a", "c"], ["b", "d"]]


# --- convert: streamed, bit-exact, for every pair ---------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(_bits(a[k]), _bits(b[k])), k


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"emb": torch.randn(64, 32, generator=g), "w": torch.randn(32, 32, generator=g).bfloat16(),
            "h": torch.randn(7, generator=g).half(), "n": torch.tensor([float("nan"), -0.0, float("inf")]),
            "i": torch.arange(10), "m": torch.tensor([True, False]), "e": torch.zeros(0, 3),
            "d": torch.randn(5, generator=g, dtype=torch.float64), "u": torch.arange(6, dtype=torch.uint8)}


def _load_pt(path) -> dict:
    plain = torch.load(path, weights_only=True)
    mapped = torch.load(path, weights_only=True, mmap=True)  # aligned records: memory-mappable
    _same(plain, mapped)
    return plain


def _aligned(path) -> bool:
    import struct

    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            if "/data/" in info.filename and not info.filename.endswith("serialization_id"):
                f.seek(info.header_offset)
                n, e = struct.unpack("<HH", f.read(30)[26:30])
                if (info.header_offset + 30 + n + e) % 64:
                    return False
    return True


def test_convert_pt_safetensors_round_trip_bit_exact(tmp_path, run):
    sd = _state()
    torch.save(sd, tmp_path / "a.pt")
    assert run("convert", tmp_path / "a.pt", tmp_path / "b.safetensors").exit_code == 0
    _same(sd, load_file(str(tmp_path / "b.safetensors")))
    assert run("convert", tmp_path / "b.safetensors", tmp_path / "c.pt").exit_code == 0
    _same(sd, _load_pt(tmp_path / "c.pt"))
    assert _aligned(tmp_path / "c.pt")
    assert run("convert", tmp_path / "c.pt", tmp_path / "d.safetensors").exit_code == 0
    _same(sd, load_file(str(tmp_path / "d.safetensors")))


def test_convert_keeps_ties_and_views_both_ways(tmp_path, run):
    base = torch.randn(8, 4)
    sd = {"emb": base, "head": base, "row": base[2], "t": base.t(), "other": torch.ones(3)}
    torch.save(sd, tmp_path / "a.pt")
    assert run("convert", tmp_path / "a.pt", tmp_path / "b.safetensors").exit_code == 0
    with safe_open(str(tmp_path / "b.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["emb", "other"]
        meta = f.metadata()
    assert meta["head"] == "emb" and set(json.loads(meta["paramtool.ties"])) == {"row", "t"}
    assert run("convert", tmp_path / "b.safetensors", tmp_path / "c.pt").exit_code == 0
    back = _load_pt(tmp_path / "c.pt")
    _same({k: v.contiguous() for k, v in sd.items()}, {k: v.contiguous() for k, v in back.items()})
    ptr = back["emb"].untyped_storage().data_ptr()
    assert all(back[k].untyped_storage().data_ptr() == ptr for k in ("head", "row", "t"))
    assert back["t"].stride() == (1, 4) and back["row"].storage_offset() == 8


@pytest.mark.parametrize("shard_ext", [".safetensors", ".bin"])
@pytest.mark.parametrize("out_ext", [".pt", ".safetensors"])
def test_convert_sharded_to_one_file(tmp_path, run, shard_ext, out_ext):
    sd = _state()
    names = list(sd)
    ck = tmp_path / "ck"
    ck.mkdir()
    stem = "model" if shard_ext == ".safetensors" else "pytorch_model"
    weight_map = {}
    for i, part in enumerate((names[:4], names[4:])):
        shard = f"{stem}-0000{i + 1}-of-00002{shard_ext}"
        tensors = {n: sd[n] for n in part}
        save_file(tensors, str(ck / shard)) if shard_ext == ".safetensors" else torch.save(tensors, ck / shard)
        weight_map.update({n: shard for n in part})
    (ck / f"{stem}{shard_ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = tmp_path / f"one{out_ext}"
    r = run("convert", ck, "-o", out)
    assert r.exit_code == 0, r.stderr
    _same(sd, _load_pt(out) if out_ext == ".pt" else load_file(str(out)))


@pytest.mark.parametrize("out_ext", [".pt", ".safetensors"])
def test_convert_dcp_to_one_file(tmp_path, run, out_ext):
    import warnings

    import torch.distributed.checkpoint as dcp

    sd = {k: v for k, v in _state().items() if k != "e"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({k: v.clone() for k, v in sd.items()}, storage_writer=dcp.FileSystemWriter(str(tmp_path / "d")))
    out = tmp_path / f"one{out_ext}"
    r = run("convert", tmp_path / "d", "-o", out)
    assert r.exit_code == 0, r.stderr
    _same(sd, _load_pt(out) if out_ext == ".pt" else load_file(str(out)))




@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="address-space limits and /proc are Linux's")
def test_convert_larger_than_its_memory_limit(tmp_path):
    """A 384 MiB checkpoint converts both ways with 256 MiB of address space above the program's own: only
    a few storages are ever in memory (a whole load, even memory-mapped, does not fit)."""
    base = vm_peak_kib("import torch, zipfile, paramtool.cli, paramtool.convert_stream, paramtool.writer")
    g = torch.Generator().manual_seed(4)
    sd = {f"layers.{i}.weight": torch.randn(4096, 4096, generator=g) for i in range(6)}
    save_file(sd, str(tmp_path / "big.safetensors"))
    limit = (base + 256 * 1024) * 1024
    for src, dst in (("big.safetensors", "big.pt"), ("big.pt", "back.safetensors")):
        r = subprocess.run([sys.executable, "-m", "paramtool", "convert", str(tmp_path / src), str(tmp_path / dst)],
                           capture_output=True, text=True, preexec_fn=address_space_limit(limit))
        assert r.returncode == 0, r.stderr
    del sd
    a = load_file(str(tmp_path / "big.safetensors"))
    _same(a, load_file(str(tmp_path / "back.safetensors")))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="address-space limits are Linux's")
def test_convert_out_of_memory_is_one_error_line(tmp_path):
    whole = torch.randn(4096, 1024)  # tensors that are slices of one storage: their bytes need torch to cut out
    torch.save({f"w{i}": whole[i * 1024:(i + 1) * 1024] for i in range(4)}, tmp_path / "a.pt")
    base = vm_peak_kib("import typer")
    for extra_mib in (64, 160):  # where torch itself cannot load, and a little above
        r = subprocess.run([sys.executable, "-m", "paramtool", "convert", str(tmp_path / "a.pt"),
                            str(tmp_path / "b.safetensors")], capture_output=True, text=True,
                           preexec_fn=address_space_limit((base + extra_mib * 1024) * 1024))
        assert r.returncode == 1, (r.returncode, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr
        assert not (tmp_path / "b.safetensors").exists()
        assert not [p for p in os.listdir(tmp_path) if "paramtool-tmp" in p]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="address-space limits are Linux's")
def test_convert_moving_bytes_needs_no_torch_and_little_memory(tmp_path):
    """Whole storages are written as the bytes they are (copied by the kernel, or from a mapping into the zip):
    no torch import, so this converts both ways where torch itself could not even be imported."""
    sd = {f"w{i}": torch.randn(1024, 1024) for i in range(4)}
    sd["tied"] = sd["w0"]
    torch.save(sd, tmp_path / "a.pt")
    base = vm_peak_kib("import typer")
    for src, dst in (("a.pt", "b.safetensors"), ("b.safetensors", "c.pt")):
        r = subprocess.run([sys.executable, "-m", "paramtool", "convert", str(tmp_path / src), str(tmp_path / dst)],
                           capture_output=True, text=True, preexec_fn=address_space_limit((base + 64 * 1024) * 1024))
        assert r.returncode == 0, r.stderr
    back = torch.load(tmp_path / "c.pt", weights_only=True)
    _same(sd, back)
    assert back["tied"].data_ptr() == back["w0"].data_ptr()


# --- patched copies through the kernel -----------------------------------------------------------------------


def _sparse_safetensors(path, n: int, rows: int) -> int:
    """A safetensors file whose data section is one hole (all zeros, no blocks) and its data offset."""
    header = {f"layers.{i}.weight": {"dtype": "F32", "shape": [rows, 1024],
                                      "data_offsets": [i * rows * 4096, (i + 1) * rows * 4096]} for i in range(n)}
    header["__metadata__"] = {"format": "pt"}  # what paramtool writes into every safetensors file: kept verbatim
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + n * rows * 4096)
    return 8 + len(raw)


def test_init_copies_unchanged_bytes_and_keeps_holes(tmp_path, run):
    src, out = tmp_path / "sparse.safetensors", tmp_path / "out.safetensors"
    start = _sparse_safetensors(src, 6, 2048)  # 6 x 8 MiB
    r = run("init", src, "--scheme", "normal", "--seed", "0", "--layer", "layers.3", "-o", out)
    assert r.exit_code == 0, r.stderr
    a, b = src.read_bytes(), out.read_bytes()
    size = 2048 * 4096
    changed = range(start + 3 * size, start + 4 * size)
    assert len(a) == len(b) and a[: changed.start] == b[: changed.start] and a[changed.stop :] == b[changed.stop :]
    assert a[changed.start : changed.stop] != b[changed.start : changed.stop]
    got = load_file(str(out))
    assert torch.count_nonzero(got["layers.3.weight"]) > 0 and torch.count_nonzero(got["layers.5.weight"]) == 0
    if os.stat(src).st_blocks * 512 < size:  # the filesystem keeps holes: so does the copy
        assert os.stat(out).st_blocks * 512 < 2 * size


def test_copy_falls_back_without_a_kernel_copy(tmp_path):
    import io

    from paramtool.formats.storage import _copy

    data = os.urandom(3 << 20)
    dst = io.BytesIO()
    src = io.BytesIO(data)
    src.seek(100)
    _copy(src, dst, len(data) - 200)  # BytesIO has no file descriptor: the buffered loop
    assert dst.getvalue() == data[100:-100] and src.tell() == len(data) - 100
    (tmp_path / "s").write_bytes(data)
    with open(tmp_path / "s", "rb") as s, open(tmp_path / "d", "wb") as d:
        d.write(b"head")
        s.seek(7)
        _copy(s, d, 1 << 20)  # the kernel path: positions advance as with read/write
        d.write(b"tail")
        assert s.tell() == 7 + (1 << 20)
    assert (tmp_path / "d").read_bytes() == b"head" + data[7 : 7 + (1 << 20)] + b"tail"


# --- start-up ------------------------------------------------------------------------------------------------



@pytest.mark.parametrize("argv", [["inspect", "{f}", "--json"], ["inspect", "{f}", "--json", "--layer", "0", "--depth", "1"],
                                  ["ties", "{f}", "--json"], ["schemes", "--json"]])
def test_json_listing_imports_no_rich_typer_or_torch(tmp_path, argv):
    torch.save({"0.weight": torch.ones(2, 2), "0.bias": torch.zeros(2)}, tmp_path / "m.pt")
    args = [a.replace("{f}", str(tmp_path / "m.pt")) for a in argv]
    # dataclasses (with inspect, ast, dis), typing and pickletools cost ~25 ms of a 60 ms budget (issue 15)
    r = launch_without(args, ("rich", "typer", "click", "torch", "numpy", "dataclasses", "inspect", "typing",
                       "pickletools", "tempfile"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)


@pytest.mark.parametrize("argv", [["stats", "{a}", "--json"], ["stats", "{a}", "--json", "--layer", "w"],
                                  ["diff", "{a}", "{b}", "--json"], ["diff", "{a}", "{a}", "--json"],
                                  ["stats", "{shards}", "--json"], ["stats", "{model}", "--json"],
                                  ["diff", "{shards}", "{model}", "--json"], ["diff", "{a}", "{shards}", "--json"]])
def test_json_values_fast_path_matches_the_full_cli_and_imports_no_cli_or_torch(tmp_path, run, argv):
    """stats and diff --json are answered before typer and rich (and, on mapped bytes, torch) are imported,
    with the full CLI's output and exit status: of files, sharded checkpoints and model directories."""
    save_file({"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1.0, float("nan")])}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.arange(6.0).reshape(2, 3) + 1, "b": torch.tensor([1.0, float("nan")])}, str(tmp_path / "b.safetensors"))
    shards, model = tmp_path / "shards", tmp_path / "model"
    shards.mkdir()
    model.mkdir()
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(shards / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.tensor([1.0, float("nan")])}, str(shards / "model-00002-of-00002.safetensors"))
    (shards / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"w": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    save_file({"w": torch.arange(6.0).reshape(2, 3) * 2, "b": torch.tensor([1.0, 2.0])}, str(model / "model.safetensors"))
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "tie_word_embeddings": False}))
    names = {"{a}": tmp_path / "a.safetensors", "{b}": tmp_path / "b.safetensors", "{shards}": shards, "{model}": model}
    args = [str(names.get(x, x)) for x in argv]
    fast = launch_without(args, ("rich", "typer", "click", "torch"))
    full = run(*args)
    assert fast.returncode == full.exit_code, fast.stderr
    assert json.loads(fast.stdout) == full.json()


def test_json_diff_fast_path_errors_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "paramtool", "diff", str(tmp_path / "no.pt"), str(tmp_path / "no2.pt"), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1


def test_fast_json_path_answers_like_the_full_cli(tmp_path, run):
    torch.save({"0.weight": torch.ones(2, 2), "0.bias": torch.zeros(2), "1.weight": torch.ones(1)}, tmp_path / "m.pt")
    for argv in (["inspect", str(tmp_path / "m.pt"), "--json", "--layer", "0"], ["ties", str(tmp_path / "m.pt"), "--json"],
                 ["schemes", "--json"]):
        fast = subprocess.run([sys.executable, "-m", "paramtool", *argv], capture_output=True, text=True)
        assert fast.returncode == 0 and json.loads(fast.stdout) == run(*argv).json()
    bad = subprocess.run([sys.executable, "-m", "paramtool", "inspect", str(tmp_path / "nope.pt"), "--json"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("error:") and len(bad.stderr.splitlines()) == 1
    usage = subprocess.run([sys.executable, "-m", "paramtool", "inspect", str(tmp_path / "m.pt"), "--json", "--depth", "x"],
                           capture_output=True, text=True)
    assert usage.returncode == 2  # the full CLI's usage error


@pytest.mark.parametrize("argv", [["diff", "{f}", "{g}", "--json"], ["ties", "{f}", "--values", "--json"]])
def test_equal_bytes_need_no_torch(tmp_path, argv):
    """Identical data is recognised from the mapped bytes: torch is never imported for it."""
    x = torch.randn(64, 64)
    save_file({"a": x, "b": x.clone(), "c": torch.zeros(3)}, str(tmp_path / "f.safetensors"))
    save_file({"a": x.clone(), "b": x.clone(), "c": torch.zeros(3)}, str(tmp_path / "g.safetensors"))
    args = [a.replace("{f}", str(tmp_path / "f.safetensors")).replace("{g}", str(tmp_path / "g.safetensors")) for a in argv]
    r = launch_without(args, ("torch",))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    if argv[0] == "diff":
        assert doc["same"] == 3 and doc["changed"] == []
    else:
        assert [g["names"] for g in doc["groups"]] == [["a", "b"]]


@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
def test_mapped_reads_are_copy_on_write(tmp_path, ext):
    """Value commands read storages mapped from the file; writing into one (as a future command might) gets a
    private copy: no crash, and the file is unchanged."""
    from paramtool import sources

    path = tmp_path / f"m{ext}"
    sd = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(3)}
    torch.save(sd, path) if ext == ".pt" else save_file(sd, str(path))
    before = path.read_bytes()
    ckpt = sources.load_lazy(sources.resolve(str(path)))
    t = ckpt.tensor("w")
    t.mul_(-1)
    assert t[2, 3].item() == -11.0
    assert torch.equal(ckpt.tensor("w"), sd["w"]) and path.read_bytes() == before


def test_own_differences_are_differences_against_a_copy():
    """A streamed diff sums a chunk pair of equal bytes from one side (``numeric.own_differences``): the same
    numbers, to the bit, as ``differences`` against a copy, NaN, infinities and float64 overflow included."""
    import math

    import numpy as np

    from paramtool import numeric

    rng = np.random.default_rng(0)
    for dtype in ("<f4", "<f8", "<f2", "<i8", "u1"):
        for case in range(5):
            x = (rng.standard_normal(1 << 18) * 100).astype(dtype)
            if case == 1 and dtype[1] == "f":
                x[5] = np.nan
            if case == 2 and dtype[1] == "f":
                x[7] = -np.inf
            if case == 3 and dtype == "<f8":
                x[3] = 1e200  # its square overflows: |x - x| is still 0
            if case == 4:
                x = x[:1000]
            with numeric.quiet():
                got, want = numeric.own_differences(x), numeric.differences(x, x.copy())
            assert all(g == w or (math.isnan(g) and math.isnan(w)) for g, w in zip(got, want)), (dtype, case)

"""New storage bytes of a streamed ``init``/``set`` are written with ``O_DIRECT`` where the filesystem allows it
(``formats.storage.DirectWriter``), storages are generated two at a time when each has its own seeded generator
(``produce_ahead``), and a one-tensor ``init`` holds that tensor in memory once. None of it may change a byte."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

import paramtool.formats.storage as storage
from paramtool import schemes

BLOCK = storage.DIRECT_ALIGN


def direct_available(path) -> bool:
    return storage.DirectWriter(str(path)).fd is not None


@pytest.mark.parametrize("start", [0, 1, 100, BLOCK - 1, BLOCK + 64])
@pytest.mark.parametrize("size", [10, 5 * BLOCK, 5 * BLOCK + 123, 3 * 2**20 + 17])
@pytest.mark.parametrize("aligned", [True, False])
def test_direct_writer_writes_exactly_the_bytes(tmp_path, start, size, aligned):
    import numpy as np

    path = tmp_path / "out"
    prefix = os.urandom(start)
    path.write_bytes(b"")
    memory = np.frombuffer(os.urandom(size + 2 * BLOCK), dtype=np.uint8).copy()
    # place the bytes so their address matches the file offset (the fast path), or deliberately not (bounce)
    shift = (start - memory.ctypes.data) % BLOCK + (0 if aligned else 8)
    raw = memory[shift:shift + size]
    with open(path, "wb") as out, storage.DirectWriter(str(path)) as direct:
        direct.BOUNCE = 2 * BLOCK  # several bounce rounds even for small sizes
        out.write(prefix)
        direct.write(out, raw)
        out.write(b"tail")
    assert path.read_bytes() == prefix + raw.tobytes() + b"tail"


def test_empty_storage_matches_the_file_offset(tmp_path):
    src = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(3), "b": torch.zeros(100, 1000)}, str(src))
    from paramtool.sources import open_for_plan, resolve
    from paramtool.formats.storage import open_storage_file

    listing = open_for_plan(resolve(str(src)), None)
    f = open_storage_file(listing)
    try:
        for key, span in f.spans.items():
            buf = f.empty_storage(key)
            assert buf.numel() * buf.element_size() == span.nbytes
            assert (buf.data_ptr() - span.offset) % BLOCK == 0
            info = next(i for i in listing.infos() if i.storage == key)
            view = f.view(buf, info)  # a view over memory that does not start at the allocation
            assert view.data_ptr() == buf.data_ptr() and tuple(view.shape) == tuple(info.shape)
            f.recycle(buf)
    finally:
        f.close()


def expected_xavier(sd: dict, seed: int) -> dict:
    """What ``init --scheme xavier --seed SEED`` gives, computed by torch.nn.init with the per-name generator."""
    out = {}
    for name, t in sd.items():
        t = t.clone()
        if t.dim() >= 2:
            g = schemes.generator_for(seed, "xavier_uniform", {"gain": 1.0}, name, tuple(t.shape), t.dtype)
            torch.nn.init.xavier_uniform_(t, 1.0, generator=g)
        out[name] = t
    return out


def big_state_dict() -> dict:
    """Storages of several blocks, at offsets that are not block-aligned, with small tensors between them."""
    g = torch.Generator().manual_seed(3)
    sd = {}
    for i, (rows, cols) in enumerate([(130, 257), (3, 5), (512, 300), (77, 1031)]):
        sd[f"l{i}.weight"] = torch.randn(rows, cols, generator=g)
        sd[f"l{i}.bias"] = torch.randn(rows, generator=g)
    return sd


@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
def test_streamed_init_is_what_torch_computes(tmp_path, run, monkeypatch, ext):
    sd = big_state_dict()
    src, out = tmp_path / f"m{ext}", tmp_path / f"o{ext}"
    torch.save(sd, src) if ext == ".pt" else save_file(sd, str(src))
    direct_bytes = []
    original = storage.DirectWriter._direct

    def counted(self, raw, offset):
        done = original(self, raw, offset)
        direct_bytes.append(done)
        return done

    monkeypatch.setattr(storage.DirectWriter, "_direct", counted)
    r = run("init", src, "--scheme", "xavier", "--seed", "7", "-o", out)
    assert r.exit_code == 0, r.stderr
    got = torch.load(out, weights_only=True) if ext == ".pt" else load_file(str(out))
    want = expected_xavier(sd, 7)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    if direct_available(tmp_path):
        assert sum(direct_bytes) > 0.9 * sum(t.nbytes for n, t in sd.items() if t.dim() >= 2)
    # the same values through the in-memory path (another format: load, init, save)
    other = tmp_path / ("p.safetensors" if ext == ".pt" else "p.pt")
    assert run("init", src, "--scheme", "xavier", "--seed", "7", "-o", other).exit_code == 0
    again = load_file(str(other)) if ext == ".pt" else torch.load(other, weights_only=True)
    for name in want:
        assert torch.equal(again[name], got[name]), name


def test_produce_ahead_keeps_order_and_bounds_what_is_in_flight(monkeypatch):
    lock = threading.Lock()
    live = {"now": 0, "most": 0}

    def produce(key):
        with lock:
            live["now"] += 1
            live["most"] = max(live["most"], live["now"])
        return key * 10

    def consume(keys, workers, size):
        got = []
        for key, value in storage.produce_ahead(keys, produce, workers, size):
            got.append((key, value))
            with lock:
                live["now"] -= 1  # written: its memory is free again
        return got

    keys = list(range(12))
    assert consume(keys, 2, lambda k: 1) == [(k, k * 10) for k in keys]
    assert live["most"] <= 3  # one being written, two produced ahead
    live["most"] = 0
    big = storage.AHEAD_BYTES // 2 + 1  # two of these exceed the budget: one produced ahead at a time, as before
    assert consume(keys, 2, lambda k: big) == [(k, k * 10) for k in keys]
    assert live["most"] <= 2
    live["most"] = 0
    assert consume(keys, 1, lambda k: 1) == [(k, k * 10) for k in keys]
    assert live["most"] <= 2


def peak_rss_kib(args: list[str]) -> int:
    """Peak RSS of ``paramtool ARGS`` in a child process of its own."""
    code = ("import resource, subprocess, sys\n"
            "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    r = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "paramtool", *args],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[-1])


def test_one_tensor_init_holds_that_tensor_once(tmp_path):
    """Memory, not time: the peak above the same command on a tiny file is about the one storage changed."""
    from test_values_fast import _sparse_safetensors

    rows, cols = 32768, 1024  # 128 MiB
    big, tiny = tmp_path / "big.safetensors", tmp_path / "tiny.safetensors"
    _sparse_safetensors(big, 4, rows)
    _sparse_safetensors(tiny, 4, 4)
    args = ["--scheme", "normal", "--seed", "0", "--layer", "layers.3", "-o"]
    base = min(peak_rss_kib(["init", str(tiny), *args, str(tmp_path / "t.safetensors")]) for _ in range(2))
    peak = peak_rss_kib(["init", str(big), *args, str(tmp_path / "o.safetensors")])
    storage_kib = rows * cols * 4 // 1024
    assert peak - base < 1.3 * storage_kib, (peak, base, storage_kib)
    assert os.stat(tmp_path / "o.safetensors").st_blocks * 512 < 1.1 * rows * cols * 4  # the holes stay holes


def test_crc32_is_zlibs():
    import zlib

    for size in (0, 1, 4095, 1 << 20):
        data = os.urandom(size)
        for start in (0, 1, 0xDEADBEEF):
            assert storage.crc32(data, start) == zlib.crc32(data, start)

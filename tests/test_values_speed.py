"""stats and diff computed with numpy on mapped bytes (no torch import): the same numbers as torch's, for every
dtype they take; mapped pages released behind the reading; other memory never touched.
(Behaviour only: speed is measured by benchmarks/bench.py.)"""
from __future__ import annotations

import math
import mmap
import os

import pytest
import torch
from safetensors.torch import save_file

from conftest import launch_without
from paramtool import compare, numeric, sources
from paramtool import stats as st
from paramtool.numeric import drop_mapped

N = 300_001  # more than one chunk (numeric.CHUNK), not a multiple of it


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    base = torch.randn(N, generator=g, dtype=torch.float64)
    nan = base.float().clone()
    nan[[3, 290_000]] = float("nan")
    inf = base.float().clone()
    inf[[11, 12]] = float("inf")
    both_inf = base.float().clone()
    both_inf[5], both_inf[6] = float("inf"), float("-inf")
    zeros = base.float().clone()
    zeros[::4] = 0
    zeros[1::4] = -0.0
    return {
        "f32": base.float(),
        "offset": (base * 1e-3 + 1000).float(),  # a mean far from zero: deviations taken from the chunk mean
        "f64": base * 1e6 + 3,
        "bf16": (base * 5).bfloat16(),
        "f16": (base * 7).half(),
        "zeros": zeros,
        "const": torch.full((N,), 0.25),
        "nan": nan,
        "inf": inf,
        "both_inf": both_inf,
        "i64": torch.randint(-(1 << 40), 1 << 40, (N,), generator=g),
        "i32": torch.randint(-1000, 1000, (N,), generator=g, dtype=torch.int32),
        "i16": torch.randint(-1000, 1000, (N,), generator=g, dtype=torch.int16),
        "i8": torch.randint(-100, 100, (5000,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (5000,), generator=g, dtype=torch.uint8),
        "bool": torch.rand(5000, generator=g) > 0.3,
        "one": torch.tensor([-2.5]),
        "empty": torch.zeros(0, 4),
        "2d": torch.randn(301, 1003, generator=g),
    }


def _same_number(ours: float, theirs: float, rel: float = 1e-12) -> bool:
    if math.isnan(theirs):
        return math.isnan(ours)
    if math.isinf(theirs):
        return ours == theirs
    return math.isclose(ours, theirs, rel_tol=rel, abs_tol=1e-12)


def test_numpy_stats_equal_torch_path_and_torch(tmp_path):
    sd = _data()
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    ckpt = sources.load_lazy(sources.resolve(str(path)))
    raw_of = st.raw_reader(ckpt)
    for name, t in sd.items():
        raw = raw_of(name)
        assert raw is not None and raw[1] == str(t.dtype).removeprefix("torch."), name  # the numpy path is taken
        ours, torch_path = st.raw_stats(name, *raw), st.tensor_stats(name, t)
        assert (ours.numel, ours.zeros, ours.nan, ours.inf) == (torch_path.numel, torch_path.zeros, torch_path.nan,
                                                                torch_path.inf), name
        for field in ("mean", "std", "min", "max", "norm"):
            assert _same_number(getattr(ours, field), getattr(torch_path, field)), (name, field)
        if t.numel() == 0:
            continue
        d = t.double()
        assert ours.nan == int(torch.isnan(d).sum()) and ours.inf == int(torch.isinf(d).sum()), name
        assert ours.zeros == (d == 0).double().mean().item(), name  # -0.0 is a zero
        if ours.nan:
            assert math.isnan(ours.mean) and math.isnan(ours.std) and math.isnan(ours.min), name
            continue
        assert ours.min == d.min().item() and ours.max == d.max().item(), name
        assert _same_number(ours.mean, d.mean().item(), 1e-12), name
        assert _same_number(ours.norm, d.norm().item(), 1e-12), name
        if not ours.inf and t.numel() > 1:
            assert _same_number(ours.std, d.std().item(), 1e-10), name


def test_numpy_stats_of_offset_integers(tmp_path):
    """int64 far from zero (timestamps): the chunk sums must be as exact as torch's float64 ones, or the chunk
    mean drifts by more than the spread and std comes out wrong (a BLAS dot with ones gave 0.55 % here)."""
    g = torch.Generator().manual_seed(1)
    t = 1_700_000_000_000_000_000 + torch.randint(0, 10**6, (N,), generator=g)
    save_file({"ts": t}, str(tmp_path / "ts.safetensors"))
    ckpt = sources.load_lazy(sources.resolve(str(tmp_path / "ts.safetensors")))
    ours = st.raw_stats("ts", *st.raw_reader(ckpt)("ts"))
    d = t.double()
    assert math.isclose(ours.mean, d.mean().item(), rel_tol=1e-15)
    assert math.isclose(ours.std, d.std().item(), rel_tol=1e-6)  # values 256 apart in float64: torch's own rounding


def test_stats_of_mapped_files_never_imports_torch(tmp_path):
    """A safetensors file and a torch zip file: the numbers come from numpy, torch is never imported."""
    g = torch.Generator().manual_seed(1)
    sd = {"w": torch.randn(600, 700, generator=g), "b": torch.randn(3, generator=g).bfloat16()}
    save_file(sd, str(tmp_path / "m.safetensors"))
    torch.save(sd, tmp_path / "m.pt")
    for path in (tmp_path / "m.safetensors", tmp_path / "m.pt"):
        r = launch_without(["stats", str(path), "--json"], ("torch",), "paramtool.cli")
        assert r.returncode == 0, r.stderr
        import json

        rows = {row["name"]: row for row in json.loads(r.stdout)["tensors"]}
        for name, t in sd.items():
            assert math.isclose(rows[name]["std"], t.double().std().item(), rel_tol=1e-12), name
            assert rows[name]["max"] == t.double().max().item(), name


@pytest.mark.parametrize("rtol,atol", [(0.0, 0.0), (0.0, 1e-3), (1e-2, 0.0)])
def test_numpy_diff_equals_torch_diff(tmp_path, rtol, atol):
    a = _data()
    g = torch.Generator().manual_seed(9)
    b = {}
    for name, t in a.items():
        u = t.clone()
        if u.numel() > 10 and u.dtype != torch.bool:
            u.view(-1)[:: 97] += torch.tensor(3).to(u.dtype)
            u.view(-1)[5] = u.view(-1)[5] + (torch.rand((), generator=g) * 1e-4).to(u.dtype) if u.is_floating_point() else u.view(-1)[5]
        elif u.dtype == torch.bool:
            u[::13] = ~u[::13]
        b[name] = u
    b["nan_b"] = a["f32"].clone()
    b["nan_b"][17] = float("nan")
    a["nan_b"] = a["f32"].clone()
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    ca = sources.load_lazy(sources.resolve(str(tmp_path / "a.safetensors")))
    cb = sources.load_lazy(sources.resolve(str(tmp_path / "b.safetensors")))
    for name in a:
        ra, rb = ca.raw_bytes(name), cb.raw_bytes(name)
        dtype = str(a[name].dtype).removeprefix("torch.")
        expected = compare.compare_tensors(a[name], b[name], rtol, atol)
        if rtol == 0 and atol == 0 and numeric.bytes_equal(ra, rb):
            assert expected is None, name
            continue
        sums = compare.compare_raw(ra, rb, dtype, rtol, atol)
        if expected is None:
            assert sums is None, name
            continue
        assert sums is not None, name
        ours = compare._changed(sums, expected["a"], expected["b"])
        for key in ("max_abs_diff", "max_rel_diff", "cosine"):
            x, y = ours[key], expected[key]
            assert (x is None) == (y is None), (name, key)
            if x is not None:
                assert _same_number(x, y, 1e-12), (name, key, x, y)


def test_diff_cli_numpy_path_matches_plain_torch(tmp_path, run):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(N, generator=g)
    y = x + 1e-3
    save_file({"w": x, "same": x[:10].clone(), "h": x.half()}, str(tmp_path / "a.safetensors"))
    save_file({"w": y, "same": x[:10].clone(), "h": y.half()}, str(tmp_path / "b.safetensors"))
    r = run("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--json")
    assert r.exit_code == 1
    doc = r.json()
    assert doc["same"] == 1
    for c in doc["changed"]:
        fa, fb = (x, y) if c["name"] == "w" else (x.half(), y.half())
        fa, fb = fa.double(), fb.double()
        assert c["max_abs_diff"] == (fa - fb).abs().max().item()
        assert math.isclose(c["max_rel_diff"], c["max_abs_diff"] / fb.abs().max().item(), rel_tol=1e-12)
        assert math.isclose(c["cosine"], ((fa @ fb) / (fa.norm() * fb.norm())).item(), rel_tol=1e-12)
    within = run("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--json", "--atol", "5e-3")
    assert within.exit_code == 0 and within.json()["same"] == 3


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def test_reading_a_mapped_tensor_releases_its_pages(tmp_path):
    """64 MiB read through its mapping (stats chunks, then a byte compare) leave the process's memory where it
    was: the pages are dropped behind the reading, not held until the tensor is done."""
    t = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(3))
    save_file({"w": t}, str(tmp_path / "m.safetensors"))
    ckpt = sources.load_lazy(sources.resolve(str(tmp_path / "m.safetensors")))
    raw, dtype = st.raw_reader(ckpt)("w")
    for _ in numeric.values(raw, dtype):  # warm the buffers
        break
    before = _rss_kib()
    result = st.raw_stats("w", raw, dtype)
    assert _rss_kib() - before < 16 * 1024  # far below the tensor's 64 MiB
    assert math.isclose(result.std, t.double().std().item(), rel_tol=1e-12)
    other = ckpt.raw_bytes("w")
    before = _rss_kib()
    assert numeric.bytes_equal(raw, other)
    assert _rss_kib() - before < 16 * 1024
    assert bytes(raw[-4096:]) == t.reshape(-1).view(torch.uint8).numpy()[-4096:].tobytes()  # pages come back


def test_drop_mapped_leaves_other_memory_alone(tmp_path):
    """Heap memory, or a writable mapping, is never advised away (there MADV_DONTNEED would lose its bytes)."""
    heap = bytearray(os.urandom(1 << 20))
    copy = bytes(heap)
    drop_mapped(memoryview(heap), 0, len(heap))
    assert heap == copy
    anon = mmap.mmap(-1, 1 << 20)
    anon.write(copy)
    drop_mapped(memoryview(anon), 0, len(anon))
    assert anon[:] == copy
    path = tmp_path / "f.bin"
    path.write_bytes(copy)
    with open(path, "rb") as f:
        ro = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(ro)[100:]
        drop_mapped(view, 0, view.nbytes)
        assert bytes(view) == copy[100:]  # a read-only file mapping reads back the same
        view.release()
        ro.close()


@pytest.mark.parametrize("bins", [2, 20, 60])
def test_numpy_histograms_equal_torch_histograms(tmp_path, bins):
    sd = _data()
    sd["positive"] = torch.rand(N, generator=torch.Generator().manual_seed(5)) + 0.5
    sd["negative_f16"] = -(torch.rand(N, generator=torch.Generator().manual_seed(6)) + 0.5).half()
    save_file(sd, str(tmp_path / "m.safetensors"))
    raw_of = st.raw_reader(sources.load_lazy(sources.resolve(str(tmp_path / "m.safetensors"))))
    for name, t in sd.items():
        ours, theirs = st.raw_histogram(*raw_of(name), bins), st.histogram(t, bins)
        assert ours == theirs, name
    assert sum(st.raw_histogram(*raw_of("f32"), bins).counts) == N


def test_histograms_of_ranges_near_float64_limits(tmp_path):
    """A range whose width overflows float64 (values near ±1.7e308) still gets finite edges and every value a
    bin, on both paths (it used to end in an internal error)."""
    sd = {"split": torch.tensor([-1.7e308, 1.7e308, 1.0, -2.0], dtype=torch.float64),
          "positive": torch.tensor([3.0, 1e308, 1.7e308], dtype=torch.float64)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    raw_of = st.raw_reader(sources.load_lazy(sources.resolve(str(tmp_path / "m.safetensors"))))
    for name, t in sd.items():
        ours, theirs = st.raw_histogram(*raw_of(name), 20), st.histogram(t, 20)
        assert ours == theirs and all(map(math.isfinite, ours.edges)), name
        assert sum(ours.counts) == t.numel() and ours.edges == sorted(ours.edges), name
    assert st.histogram(sd["split"], 20).counts[0] == 1 and st.histogram(sd["split"], 20).counts[-1] == 1


def test_stats_hist_cli_without_torch(tmp_path):
    """--hist on a safetensors file: the histogram is torch's, and torch is never imported."""
    import json

    t = torch.randn(5000, generator=torch.Generator().manual_seed(8))
    t[::10] = 0
    t[3] = float("nan")
    save_file({"w": t}, str(tmp_path / "m.safetensors"))
    r = launch_without(["stats", str(tmp_path / "m.safetensors"), "--hist", "--bins", "7", "--json"], ("torch",),
                       "paramtool.cli")
    assert r.returncode == 0, r.stderr
    h = json.loads(r.stdout)["histograms"]["w"]
    expected = st.histogram(t, 7)
    assert (h["edges"], h["counts"], h["zeros"]) == (expected.edges, expected.counts, expected.zeros)
    assert expected.zeros == 500 and expected.nonfinite == 1


def _edges(lo: float, hi: float, bins: int) -> list[float]:
    return st._histogram(lambda: iter([(torch.tensor([lo, hi], dtype=torch.float64), 0, 0)]), bins,
                         lambda v, e, n: [0] * n).edges


def test_bucket_counts_are_searchsorted_exactly():
    """The grid lookup puts every value in the bin torch.bucketize(right=True) gives, values on and next to
    every edge included, for ranges from subnormal to 1e305 and bins split at zero."""
    import numpy as np

    rng = np.random.default_rng(0)
    ranges = [(-1e-9, 1.0), (-1.0, 1e-9), (1e-300, 2e-300), (5e-324, 2e-323), (-1e305, 1e305), (3.0, 3.0),
              (-1e308, -1e307), (1.0, 1.0000000000000002), (-4.2, 3.9)]
    ranges += [tuple(sorted(rng.standard_normal(2) * rng.choice([1e-6, 1, 1e6, 1e300]))) for _ in range(60)]
    for lo, hi in ranges:
        for bins in (2, 3, 20, 60, 200):
            edges = _edges(lo, hi, bins)
            v = list(rng.uniform(lo, hi, 500)) + edges
            v += [np.nextafter(e, np.inf) for e in edges] + [np.nextafter(e, -np.inf) for e in edges]
            values = np.array([x for x in v if x != 0 and lo <= x <= hi])
            n = len(edges) - 1
            expected = torch.bincount(torch.bucketize(torch.from_numpy(values), torch.tensor(edges[1:-1],
                                      dtype=torch.float64), right=True), minlength=n).tolist()
            assert numeric.bucket_counts(values, edges, n) == expected, (lo, hi, bins)

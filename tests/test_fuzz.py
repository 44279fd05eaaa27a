"""Fuzzing: mutated sample files (bit flips, truncation, header edits) end in success or one clean error.

The CI budget is small; `make fuzz` runs many more examples (PARAMTOOL_FUZZ_EXAMPLES).
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("PARAMTOOL_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _check(run, tmp_path, data: bytes, suffix: str) -> None:
    f = tmp_path / f"fuzz{suffix}"
    f.write_bytes(data)
    for args in (["inspect", f, "--json"], ["ties", f], ["stats", f], ["show", f, "0.weight"]):
        r = run(*args)
        assert r.exit_code in (0, 1), (args[0], r.exit_code, r.stderr)
        if r.exit_code == 1:
            assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
            assert "internal error" not in r.stderr, r.stderr


def _mutations():
    flips = st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 7)), min_size=1, max_size=8)
    return st.one_of(
        st.tuples(st.just("flip"), flips),
        st.tuples(st.just("truncate"), st.integers(0, 10**9)),
        st.tuples(st.just("splice"), st.tuples(st.integers(0, 10**9), st.binary(min_size=1, max_size=16))),
    )


def _mutate(data: bytes, mutation) -> bytes:
    kind, arg = mutation
    buf = bytearray(data)
    if kind == "flip":
        for pos, bit in arg:
            buf[pos % len(buf)] ^= 1 << bit
    elif kind == "truncate":
        del buf[arg % len(buf):]
    else:
        pos, blob = arg
        pos %= len(buf)
        buf[pos:pos + len(blob)] = blob
    return bytes(buf)


def test_fuzz_torch_zip(samples, tmp_path_factory, run):
    data = (samples / "mlp.pt").read_bytes()
    tmp = tmp_path_factory.mktemp("fuzzpt")

    @FUZZ
    @given(_mutations())
    def check(mutation):
        _check(run, tmp, _mutate(data, mutation), ".pt")

    check()


def test_fuzz_safetensors(samples, tmp_path_factory, run):
    data = (samples / "tied.safetensors").read_bytes()
    tmp = tmp_path_factory.mktemp("fuzzst")

    @FUZZ
    @given(_mutations())
    def check(mutation):
        _check(run, tmp, _mutate(data, mutation), ".safetensors")

    check()


def test_fuzz_safetensors_header_edits(samples, tmp_path_factory, run):
    raw = (samples / "mlp.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, body = raw[8:8 + n], raw[8 + n:]
    tmp = tmp_path_factory.mktemp("fuzzhdr")

    @FUZZ
    @given(st.integers(0, len(header) - 1), st.binary(min_size=1, max_size=6))
    def check(pos, blob):
        h = header[:pos] + blob + header[pos + len(blob):]
        _check(run, tmp, len(h).to_bytes(8, "little") + h + body, ".safetensors")

    check()


def test_fuzz_legacy_pickle(samples, tmp_path_factory, run):
    import torch

    tmp = tmp_path_factory.mktemp("fuzzlegacy")
    torch.save(torch.load(samples / "mlp.pt"), tmp / "legacy.pt", _use_new_zipfile_serialization=False)
    data = (tmp / "legacy.pt").read_bytes()

    @FUZZ
    @given(_mutations())
    def check(mutation):
        _check(run, tmp, _mutate(data, mutation), ".pt")

    check()


# --- structure-aware: container records and header fields, against torch's and safetensors' own reading -------


def _same_reading(run, tmp, path, oracle) -> None:
    """paramtool reads ``path`` as ``oracle()`` does (names, dtypes, shapes, bytes), or fails with one clean
    error line; it never reads a file the library refuses."""
    import torch

    out = tmp / "out.pt"
    out.unlink(missing_ok=True)
    r = run("convert", path, "-o", out)
    assert r.exit_code in (0, 1), r.stderr
    if r.exit_code == 1:
        assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
        assert "internal error" not in r.stderr, r.stderr
        return
    try:
        expected = oracle()
    except Exception as e:  # noqa: BLE001 (the library's refusal, whatever its type)
        raise AssertionError(f"paramtool read a file the library refuses ({str(e)[:160]})") from None
    got = torch.load(out, weights_only=True)
    for name, t in expected.items():
        assert name in got, name
        g = got[name]
        assert (g.dtype, g.shape) == (t.dtype, t.shape), name
        assert torch.equal(g.reshape(-1).contiguous().view(torch.uint8), t.reshape(-1).contiguous().view(torch.uint8)), name


def _zip_cases():
    from corpus3 import num, text

    keys = st.sampled_from([text("0"), num(0), text("1"), num(1), text("0 ")])
    storages = st.sampled_from(["FloatStorage", "IntStorage", "HalfStorage", "DoubleStorage", "ByteStorage"])
    dims = st.lists(st.integers(-1, 4), max_size=2)
    tensor = st.tuples(keys, storages, st.integers(0, 6), st.integers(-1, 4), dims, dims)
    extras = st.lists(st.sampled_from([("DATA/0", b"\0" * 8), ("Data/1", b"\1" * 8), ("BYTEORDER", b"big"),
                                       ("data/1", b"\2" * 16), ("data/0 ", b"\3" * 8)]), max_size=2, unique=True)
    return st.tuples(st.lists(tensor, min_size=1, max_size=2),
                     st.sampled_from([b"little", b"big", b"", b"LITTLE", None]),
                     st.one_of(st.none(), st.binary(max_size=24)), extras, st.sampled_from([0, 8, 12]))


SIZES = {"FloatStorage": 4, "IntStorage": 4, "HalfStorage": 2, "DoubleStorage": 8, "ByteStorage": 1}


def test_fuzz_torch_zip_records(tmp_path_factory, run):
    """Zip record tables and storage records (names in any case, duplicates, byte orders, storage keys '0'
    and 0, compression methods, shapes and strides) read as torch reads them, or refused in one line."""
    import zipfile

    import torch
    from corpus3 import state_dict, tensor, torch_zip

    tmp = tmp_path_factory.mktemp("fuzzrecords")

    @FUZZ
    @given(_zip_cases())
    def check(case):
        tensors, byteorder, data, extras, method = case
        if data is None:  # the first storage's exact bytes (most files torch reads have them)
            _, kind, numel = tensors[0][:3]
            data = bytes(range(256))[:numel * SIZES[kind]].ljust(numel * SIZES[kind], b"\x07")
        pkl = state_dict(**{f"t{i}": tensor(k, n, tuple(shape), tuple(stride), storage=s, offset=o)
                            for i, (k, s, n, o, shape, stride) in enumerate(tensors) if len(shape) == len(stride)}
                         or {"t": tensor(b"X\x01\x00\x00\x000", 0, (0,), (1,))})
        records = ([("byteorder", byteorder)] if byteorder is not None else []) + [("data/0", data)] + list(extras)
        path = tmp / "f.pt"
        path.write_bytes(torch_zip(pkl, records, methods={"data/0": method}))
        assert method in (0, 8, 12) and zipfile.ZIP_BZIP2 == 12
        _same_reading(run, tmp, path, lambda: torch.load(path, weights_only=True))

    check()


def _header_cases():
    counts = st.one_of(st.integers(-2, 4), st.sampled_from([1 << 40, 1 << 64, 10 ** 30]))
    entry = st.tuples(st.sampled_from(["a", "b", "a"]), st.sampled_from(["F32", "F16", "I64", "BOOL", "X9"]),
                      st.lists(counts, max_size=2), st.booleans())
    view = st.tuples(st.sampled_from(["v", "b", "a"]), st.sampled_from(["a", "b", "z"]), st.integers(-1, 5),
                     st.lists(counts, max_size=2), st.lists(st.integers(-1, 3), max_size=2))
    return st.tuples(st.lists(entry, min_size=1, max_size=3), st.lists(view, max_size=2), st.integers(-4, 4))


def test_fuzz_safetensors_header_fields(tmp_path_factory, run):
    """Header fields (names given twice, dtypes, negative, huge and fractional counts, offsets, data that
    does not end where the tensors do) and ``paramtool.ties`` views read as safetensors reads the file."""
    import json

    from corpus3 import safetensors as build
    from safetensors.torch import load_file

    tmp = tmp_path_factory.mktemp("fuzzfields")
    sizes = {"F32": 4, "F16": 2, "I64": 8, "BOOL": 1, "X9": 1}

    @FUZZ
    @given(_header_cases())
    def check(case):
        entries, views, slack = case
        parts, start = [], 0
        for name, dtype, shape, honest in entries:
            n = 1
            for d in shape:
                n *= max(d, 0)
            end = start + (n * sizes[dtype] if honest and n < 1 << 20 else 5)
            parts.append(f'"{name}":' + json.dumps({"dtype": dtype, "shape": shape, "data_offsets": [start, end]}))
            start = end
        if views:
            ties = {n: {"of": of, "offset": o, "shape": sh, "stride": sd} for n, of, o, sh, sd in views}
            parts.insert(0, '"__metadata__":' + json.dumps({"paramtool.ties": json.dumps(ties)}))
        path = tmp / "f.safetensors"
        path.write_bytes(build("{" + ",".join(parts) + "}", bytes(range(256)) * 0 + b"\x01" * max(start + slack, 0)))
        _same_reading(run, tmp, path, lambda: load_file(str(path)))

    check()

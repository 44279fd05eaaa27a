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

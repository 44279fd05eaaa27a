"""Hostile and broken input: nothing runs, nothing is written, every failure is one `error:` line."""
from __future__ import annotations

import json
import os
import struct

import pytest
import torch

from conftest import rewrite_zip
from hostile import containers, payloads

COMMANDS = {
    "inspect": ["inspect", "{f}"],
    "ties": ["ties", "{f}"],
    "show": ["show", "{f}", "ok.weight"],
    "stats": ["stats", "{f}"],
    "init": ["init", "{f}", "--scheme", "zeros", "-o", "{out}"],
    "convert": ["convert", "{f}", "{out}"],
    "diff": ["diff", "{f}", "{other}"],
}


def _valid_zip(tmp_path) -> bytes:
    torch.save({"a": torch.ones(2)}, tmp_path / "valid.pt")
    return (tmp_path / "valid.pt").read_bytes()


@pytest.mark.parametrize("payload", sorted(payloads("M")))
def test_malicious_pickles_refused_by_every_command(tmp_path, run, payload):
    marker = tmp_path / "MARKER"
    body, refused = payloads(str(marker))[payload]
    other = tmp_path / "other.pt"
    torch.save({"ok.weight": torch.zeros(1)}, other)
    for kind, data in containers(body, _valid_zip(tmp_path)).items():
        f = tmp_path / f"{kind}.pt"
        f.write_bytes(data)
        for command, template in COMMANDS.items():
            out = tmp_path / "out.pt"
            args = [a.format(f=f, out=out, other=other) for a in template]
            r = run(*args)
            case = f"{payload} in {kind} via {command}"
            assert r.exit_code == (2 if command == "diff" else 1), case
            assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1, case
            assert refused in r.stderr, f"{case}: {r.stderr}"
            assert "Traceback" not in r.stderr and r.stdout == "", case
            assert not out.exists(), case
    assert not marker.exists()


def _safetensors(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


BROKEN = {
    "empty": b"",
    "random-bytes": bytes((i * 97 + 13) % 256 for i in range(4096)),
    "text": b"hello, I am not a checkpoint\n",
    "st-header-beyond-file": _safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4,
                                          length=10_000),
    "st-header-over-100MB": struct.pack("<Q", 200 * 2**20) + b"{" + b" " * 64,
    "st-invalid-json": _safetensors(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]', b"\0" * 64),
    "st-non-utf8-name": _safetensors(b'{"\xff\xfe": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4),
    "st-offsets-out-of-range": _safetensors({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
    "st-overlapping-offsets": _safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
    "st-shape-size-mismatch": _safetensors({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
    "st-unknown-dtype": _safetensors({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16),
    "st-absurd-shape": _safetensors({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}, b"\0" * 4),
    "st-bad-metadata": _safetensors({"__metadata__": {"x": 1}}, b""),
    "st-ties-out-of-range": _safetensors({"__metadata__": {"paramtool.ties": json.dumps(
        {"v": {"of": "a", "offset": 3, "shape": [4], "stride": [1]}})},
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_safetensors_and_junk(tmp_path, run, case):
    f = tmp_path / ("x.safetensors" if case.startswith("st-") else "x.pt")
    f.write_bytes(BROKEN[case])
    for command in ("inspect", "stats", "init"):
        args = [a.format(f=f, out=tmp_path / "out.safetensors", other=f) for a in COMMANDS[command]]
        r = run(*args)
        assert r.exit_code == 1, f"{case} via {command}: {r.stderr}"
        assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1, f"{case}: {r.stderr!r}"
        assert "internal error" not in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert str(f.name) in r.stderr or "standard input" in r.stderr or str(f) in r.stderr, r.stderr
        assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("fmt", ["pt", "legacy", "safetensors"])
def test_truncated_at_many_points(samples, tmp_path, run, fmt):
    src = samples / ("rgnet.safetensors" if fmt == "safetensors" else "rgnet.pt")
    if fmt == "legacy":
        torch.save(torch.load(src), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
        src = tmp_path / "legacy.pt"
    data = src.read_bytes()
    for cut in sorted({1, 7, 8, 9, 20, 100, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 1}):
        f = tmp_path / f"cut{cut}{src.suffix}"
        f.write_bytes(data[:cut])
        for command in ("inspect", "stats"):
            r = run(command, f)
            assert r.exit_code == 1, f"cut at {cut} via {command}: {r.stdout[:200]}"
            assert r.stderr.startswith("error:") and "internal error" not in r.stderr, f"cut {cut}: {r.stderr}"


def test_control_characters_in_safetensors_names(tmp_path, run):
    from safetensors.torch import save_file

    save_file({"evil\x1b]0;pwned\x07.weight": torch.zeros(2), "ok\r\n.bias": torch.ones(1)}, str(tmp_path / "e.safetensors"))
    for command in ("inspect", "ties", "stats"):
        out = run(command, tmp_path / "e.safetensors").stdout
        assert "\x1b" not in out and "\x07" not in out and "\r" not in out, command
    assert "\\x1b]0;pwned\\x07" in run("inspect", tmp_path / "e.safetensors").stdout


def test_directory_and_index_errors(tmp_path, run):
    (tmp_path / "d").mkdir()
    r = run("inspect", tmp_path / "d")
    assert r.exit_code == 1 and "index" in r.stderr
    (tmp_path / "d" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "missing.safetensors"}}))
    r = run("inspect", tmp_path / "d")
    assert r.exit_code == 1 and "missing.safetensors" in r.stderr
    (tmp_path / "d" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    r = run("inspect", tmp_path / "d")
    assert r.exit_code == 1 and "outside" in r.stderr
    (tmp_path / "d" / "model.safetensors.index.json").write_text("{not json")
    r = run("inspect", tmp_path / "d")
    assert r.exit_code == 1 and r.stderr.startswith("error:")


def test_zip_with_missing_storage_record(tmp_path, run):
    torch.save({"a": torch.ones(4)}, tmp_path / "a.pt")
    rewrite_zip(tmp_path / "a.pt", tmp_path / "m.pt", lambda name, data: None if name.endswith("/data/0") else data)
    r = run("inspect", tmp_path / "m.pt")
    assert r.exit_code == 1 and "missing" in r.stderr and "m.pt" in r.stderr


def test_stdin_garbage_and_empty(run):
    for data in (b"", b"garbage"):
        r = run("inspect", "-", input=data)
        assert r.exit_code == 1 and r.stderr.startswith("error:"), r.stderr

"""Errors that name the problem: truncation with sizes, other formats by magic, text and empty files; a closed
standard input (issue 26)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file


@pytest.fixture
def files(tmp_path):
    torch.save({"w": torch.randn(200, 100)}, tmp_path / "m.pt")
    save_file({"w": torch.randn(200, 100)}, tmp_path / "m.safetensors")
    return tmp_path


def _cut(src, dst, n):
    dst.write_bytes(src.read_bytes()[:n])
    return dst


def _error(run, path):
    r = run("inspect", path)
    assert r.exit_code == 1 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    return r.stderr


def test_truncated_files_say_so_with_sizes(files, run):
    st = files / "m.safetensors"
    cut = _cut(st, files / "h.safetensors", 40)  # inside the header
    n = int.from_bytes(st.read_bytes()[:8], "little")
    assert _error(run, cut) == (f"error: {cut}: truncated: a safetensors file whose header needs {n} bytes, but "
                                f"only 32 follow its length (an interrupted download or copy?)\n")
    cut = _cut(st, files / "d.safetensors", 50_000)  # inside the data
    assert f"truncated: the header's tensors need 80000 data bytes, the file holds {50_000 - 8 - n}" in _error(run, cut)
    cut = _cut(files / "m.pt", files / "c.pt", 30_000)
    assert "truncated: a zip file (as torch.save writes) without its closing directory, 30000 bytes" in _error(run, cut)
    assert "truncated" in run("stats", cut).stderr  # every command reads through the same sniffing


def test_other_formats_named(tmp_path, run):
    (tmp_path / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(24))
    np.save(tmp_path / "a.npy", np.zeros(3))
    np.savez(tmp_path / "a.npz", x=np.zeros(3))
    (tmp_path / "k.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07\x12\x07pytorch\x1a\x032.0")
    (tmp_path / "model.ckpt.data-00000-of-00001").write_bytes(bytes(64))
    (tmp_path / "lfs.bin").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 12\n")
    r = run("inspect", tmp_path / "m.gguf", "--json")  # an empty but valid GGUF file: a format paramtool reads
    assert r.exit_code == 0 and r.json()["format"] == "gguf" and r.json()["tensors"] == []
    (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(5))
    assert _error(run, tmp_path / "cut.gguf").startswith("error:")
    expect = {"a.npy": "a numpy .npy array file", "a.npz": "a numpy .npz archive",
              "k.h5": "an HDF5 file", "m.onnx": "an ONNX model", "model.ckpt.data-00000-of-00001": "a TensorFlow",
              "lfs.bin": "a Git LFS pointer"}
    for name, what in expect.items():
        assert f"error: {tmp_path / name}: {what}" in _error(run, tmp_path / name), name


def test_text_and_empty_files(tmp_path, run):
    (tmp_path / "t.pt").write_text("hello world, not weights\n")
    (tmp_path / "p.bin").write_text("<!DOCTYPE html>\n<html><body>404</body></html>\n")
    (tmp_path / "j.pt").write_text('{"a": 1}\n')
    (tmp_path / "e.pt").write_bytes(b"")
    assert _error(run, tmp_path / "t.pt").endswith(": a text file, not a checkpoint\n")
    assert _error(run, tmp_path / "p.bin").endswith(": an HTML page, not a checkpoint (a failed download?)\n")
    assert _error(run, tmp_path / "j.pt").endswith(": a JSON text file, not a checkpoint\n")
    assert _error(run, tmp_path / "e.pt").endswith(": empty file (0 bytes)\n")


def test_protocol0_pickle_is_not_taken_for_text(tmp_path, run):
    torch.save({"w": torch.ones(2)}, tmp_path / "p0.pt", _use_new_zipfile_serialization=False, pickle_protocol=0)
    assert (tmp_path / "p0.pt").read_bytes()[:1] == b"L"  # the magic number, as text
    r = run("inspect", tmp_path / "p0.pt", "--json")
    assert "text file" not in r.stderr  # handed to the pickle reader, not diagnosed as text


def test_closed_stdin(files):
    env = dict(os.environ)
    for args in (["inspect"], ["inspect", "-"], ["init", "--scheme", "zeros", "-o", str(files / "o.pt")]):
        cmd = " ".join([sys.executable, "-m", "paramtool"] + args) + " <&-"
        r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env)
        assert r.returncode == 1 and r.stderr == "error: standard input is closed\n", (args, r.stderr)

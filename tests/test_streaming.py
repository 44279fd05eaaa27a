"""Same-format writes are streamed: untouched bytes are copied verbatim, a storage overwritten whole is
never read, and values are read one storage at a time."""
from __future__ import annotations

import json
import zipfile

import torch

import paramtool.formats.storage as stream


def records(path):
    with zipfile.ZipFile(path) as z:
        return {i.filename.split("/", 1)[1]: z.read(i) for i in z.infolist()}


def test_pt_untouched_records_bit_exact(samples, tmp_path, run):
    r = run("init", samples / "train.pt", "--scheme", "zeros", "--layer", "2", "-o", tmp_path / "o.pt")
    assert r.exit_code == 0, r.stderr
    a, b = records(samples / "train.pt"), records(tmp_path / "o.pt")
    assert a["data.pkl"] == b["data.pkl"]  # the container, optimizer state and epoch: byte for byte
    changed = [k for k in a if k.startswith("data/") and a[k] != b[k]]
    assert len(changed) == 1  # only 2.weight's storage
    assert torch.load(tmp_path / "o.pt", weights_only=True)["model"]["2.weight"].abs().sum() == 0


def test_safetensors_header_and_other_bytes_kept(samples, tmp_path, run):
    src = samples / "rgnet.safetensors"
    run("init", src, "--scheme", "ones", "--layer", "1", "-o", tmp_path / "o.safetensors")
    a, b = src.read_bytes(), (tmp_path / "o.safetensors").read_bytes()
    n, m = int.from_bytes(a[:8], "little"), int.from_bytes(b[:8], "little")
    header = json.loads(a[8 : 8 + n])
    assert "format" not in header.get("__metadata__", {})  # the one header change: "format": "pt" is added
    meta = {**header.get("__metadata__", {}), "format": "pt"}
    assert json.loads(b[8 : 8 + m]) == {**header, "__metadata__": meta}
    a, b = a[8 + n :], b[8 + m :]  # the data sections
    start, end = header["1.weight"]["data_offsets"]
    assert len(a) == len(b) and a[:start] == b[:start] and a[end:] == b[end:] and a[start:end] != b[start:end]
    # a header that already names its format is copied verbatim
    run("init", tmp_path / "o.safetensors", "--scheme", "zeros", "--layer", "1", "-o", tmp_path / "p.safetensors")
    assert (tmp_path / "o.safetensors").read_bytes()[: 8 + m] == (tmp_path / "p.safetensors").read_bytes()[: 8 + m]


def test_whole_overwrite_reads_nothing(samples, tmp_path, run, monkeypatch):
    reads = []
    original = stream.StorageFile.read_storage

    def spy(self, key):
        reads.append(key)
        return original(self, key)

    monkeypatch.setattr(stream.StorageFile, "read_storage", spy)
    assert run("init", samples / "mlp.pt", "--scheme", "xavier", "-o", tmp_path / "o.pt").exit_code == 0
    assert reads == []
    assert run("set", samples / "mlp.pt", "0.weight[0, 0] = 1", "-o", tmp_path / "p.pt").exit_code == 0
    assert len(reads) == 1  # a partial edit reads the one storage it changes


def test_tied_storage_written_once_and_stays_tied(samples, tmp_path, run):
    run("init", samples / "tied.pt", "--scheme", "constant", "--value", "2", "--layer", "4", "-o", tmp_path / "o.pt")
    sd = torch.load(tmp_path / "o.pt", weights_only=True)
    assert torch.all(sd["2.weight"] == 2)
    assert sd["2.weight"].untyped_storage().data_ptr() == sd["4.weight"].untyped_storage().data_ptr()
    st = tmp_path / "t.safetensors"
    run("convert", samples / "tied.pt", st)
    run("init", st, "--scheme", "constant", "--value", "5", "--layer", "4", "-o", tmp_path / "o.safetensors")
    doc = run("show", tmp_path / "o.safetensors", "2.weight", "--json").json()
    assert doc["values"][0][0] == 5


def test_bf16_streamed_keeps_dtype(samples, tmp_path, run):
    for name in ("bf16.pt", "bf16.safetensors"):
        out = tmp_path / name
        assert run("set", samples / name, "0.weight[:] += 1", "-o", out).exit_code == 0
        doc = run("inspect", out, "--json").json()
        assert {t["dtype"] for t in doc["tensors"]} == {"bfloat16"}
        assert run("diff", samples / name, out, "--json").json()["changed"][0]["name"] == "0.weight"

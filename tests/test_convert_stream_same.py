"""A streamed ``convert`` writes the very file the loaded path writes (the same pickle, the same storages; the
same safetensors header), or hands over to the loaded path: nothing a checkpoint holds is lost by streaming."""
from __future__ import annotations

import warnings
import zipfile

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from test_sharded import make_sharded

import paramtool.convert_stream as convert_stream

STREAMED = convert_stream.convert_streamed


def _both(run, monkeypatch, tmp_path, src, name, *extra):
    """(streamed output, loaded output, whether the streamed path wrote it)."""
    took = []

    def spy(*a, **k):
        took.append(STREAMED(*a, **k))
        return took[-1]

    monkeypatch.setattr(convert_stream, "convert_streamed", spy)
    streamed = tmp_path / f"streamed{name}"
    r = run("convert", src, "-o", streamed, *extra)
    assert r.exit_code == 0, r.stderr
    monkeypatch.setattr(convert_stream, "convert_streamed", lambda *a, **k: False)
    loaded = tmp_path / f"loaded{name}"
    r = run("convert", src, "-o", loaded, *extra)
    assert r.exit_code == 0, r.stderr
    return streamed, loaded, took == [True]


def _records(path):
    with zipfile.ZipFile(path) as z:
        return {n.split("/", 1)[1]: z.read(n) for n in z.namelist() if not n.endswith("serialization_id")}


def _dcp(path, state):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(path))


def test_safetensors_with_ties_to_pt_is_the_loaded_file(tmp_path, run, monkeypatch):
    base = torch.randn(6, 4)
    save_file({"emb": base, "other": torch.arange(5, dtype=torch.int64)}, tmp_path / "a.safetensors",
              metadata={"head": "emb"})  # a tie recorded the save_model way
    streamed, loaded, was_streamed = _both(run, monkeypatch, tmp_path, tmp_path / "a.safetensors", ".pt")
    assert was_streamed
    assert _records(streamed) == _records(loaded)
    got = torch.load(streamed, weights_only=True)
    assert list(got) == ["other", "emb", "head"] and got["head"].data_ptr() == got["emb"].data_ptr()


def test_nested_dcp_to_pt_keeps_the_nesting(tmp_path, run, monkeypatch):
    state = {"model": {"w": torch.randn(3, 2), "b": torch.randn(2)}, "optim": {"state": {"w": torch.ones(3, 2)}}}
    _dcp(tmp_path / "ck", state)
    streamed, loaded, was_streamed = _both(run, monkeypatch, tmp_path, tmp_path / "ck", ".pt")
    assert was_streamed
    assert _records(streamed) == _records(loaded)
    got = torch.load(streamed, weights_only=True)
    assert torch.equal(got["optim"]["state"]["w"], torch.ones(3, 2)) and torch.equal(got["model"]["w"], state["model"]["w"])


def test_dcp_key_to_pt_is_the_sub_tree(tmp_path, run, monkeypatch):
    state = {"model": {"w": torch.randn(3, 2)}, "optim": {"m": torch.ones(2)}}
    _dcp(tmp_path / "ck", state)
    streamed, loaded, _ = _both(run, monkeypatch, tmp_path, tmp_path / "ck", ".pt", "--key", "model")
    assert _records(streamed) == _records(loaded)
    assert set(torch.load(streamed, weights_only=True)) == {"w"}


def test_dcp_with_values_to_pt_keeps_them(tmp_path, run, monkeypatch):
    """Non-tensor entries are placeholders in a DCP listing: the loaded path writes them."""
    _dcp(tmp_path / "ck", {"model": {"w": torch.randn(2)}, "epoch": 7, "lr": [0.5, 0.25]})
    streamed, loaded, was_streamed = _both(run, monkeypatch, tmp_path, tmp_path / "ck", ".pt")
    assert not was_streamed
    got = torch.load(streamed, weights_only=True)
    assert got["epoch"] == 7 and got["lr"] == [0.5, 0.25]


@pytest.mark.parametrize("kind", ["safetensors", "pt"])
def test_sharded_to_one_file_is_the_loaded_file(tmp_path, run, monkeypatch, kind):
    root = tmp_path / "sh"
    make_sharded(root, kind)
    for ext in (".pt", ".safetensors"):
        streamed, loaded, was_streamed = _both(run, monkeypatch, tmp_path, root, ext)
        assert was_streamed
        if ext == ".pt":
            assert _records(streamed) == _records(loaded)
        else:
            assert streamed.read_bytes() == loaded.read_bytes()


def test_pt_with_ties_to_safetensors_is_the_loaded_file(tmp_path, run, monkeypatch):
    w = torch.randn(4, 3)
    torch.save({"a": w, "b": torch.zeros(2), "tied": w, "row": w[1]}, tmp_path / "a.pt")
    streamed, loaded, was_streamed = _both(run, monkeypatch, tmp_path, tmp_path / "a.pt", ".safetensors")
    assert was_streamed
    assert streamed.read_bytes() == loaded.read_bytes()

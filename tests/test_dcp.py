"""torch.distributed.checkpoint directories: listed without torch, loaded by torch's DCP reader behind an
allowlist, written back in the same layout."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import listing_without_torch


def make_dcp(path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": net.state_dict(), "epoch": 3}, checkpoint_id=str(path))
    return net.state_dict()


def test_inspect_and_show(tmp_path, run):
    sd = make_dcp(tmp_path / "ck")
    doc = run("inspect", tmp_path / "ck", "--json").json()
    assert doc["format"] == "dcp" and [t["name"] for t in doc["tensors"]] == list(sd)
    assert doc["num_params"] == 58
    r = run("show", tmp_path / "ck", "1.bias", "--json")
    assert r.exit_code == 0 and torch.allclose(torch.tensor(r.json()["values"]), sd["1.bias"])


def test_roundtrip_and_init(tmp_path, run):
    sd = make_dcp(tmp_path / "ck")
    r = run("init", tmp_path / "ck", "--scheme", "zeros", "--layer", "1", "-o", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "out" / ".metadata").exists()
    d = run("diff", tmp_path / "ck", tmp_path / "out", "--json").json()
    assert [c["name"] for c in d["changed"]] == ["1.weight"]
    state = {"model": {k: torch.empty_like(v) for k, v in sd.items()}, "epoch": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(tmp_path / "out"))
    assert state["epoch"] == 3 and torch.count_nonzero(state["model"]["1.weight"]) == 0
    assert torch.equal(state["model"]["0.weight"], sd["0.weight"])
    assert run("convert", tmp_path / "out", tmp_path / "one.safetensors", "--drop-extra").exit_code == 0
    assert run("diff", tmp_path / "out", tmp_path / "one.safetensors").exit_code == 0
    assert run("init", tmp_path / "ck", "--scheme", "ones", "--in-place").exit_code == 0
    assert run("stats", tmp_path / "ck", "--json").json()["tensors"][0]["mean"] == 1.0


@pytest.mark.parametrize("command", [["inspect"], ["ties"], ["stats"], ["init", "--scheme", "ones", "-o", "OUT"],
                                     ["convert", "-o", "OUT.pt"]])
def test_malicious_metadata_refused(tmp_path, run, command):
    make_dcp(tmp_path / "ck")
    marker = tmp_path / "MARKER"
    (tmp_path / "ck" / ".metadata").write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    args = [a.replace("OUT", str(tmp_path / "out")) for a in command]
    r = run(args[0], tmp_path / "ck", *args[1:])
    assert r.exit_code == 1 and "os.system" in r.stderr and r.stderr.startswith("error:")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_listing_imports_no_torch(tmp_path):
    make_dcp(tmp_path / "ck")
    p = listing_without_torch(tmp_path / "ck")
    assert p.returncode == 0, p.stderr

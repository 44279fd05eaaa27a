"""`paramtool inspect` and `show`: names, order, counts, formats, nested checkpoints, output discipline."""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import listing_without_torch, rewrite_zip
from safetensors import safe_open

SAMPLES = ["mlp.pt", "mlp.safetensors", "rgnet.pt", "rgnet.safetensors", "tied.pt", "tied.safetensors",
           "bf16.pt", "bf16.safetensors"]
PARAMS = {"mlp": 49, "rgnet": 309, "tied": 121, "bf16": 49}


def expected_listing(path):
    """What torch.load (or safe_open) gives: (name, shape, dtype) in order (for safetensors: the header's)."""
    if str(path).endswith(".safetensors"):
        raw = path.read_bytes()
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        with safe_open(str(path), "pt") as f:
            out = [(n, list(f.get_slice(n).get_shape()), None) for n in header if n != "__metadata__"]
            meta = f.metadata() or {}
            ts = {n: f.get_tensor(n) for n in f.keys()}
        # tied names recorded by save_model are restored, after the stored ones (metadata order is random)
        for dropped, kept in sorted(meta.items()):
            if kept in ts:
                out.append((dropped, list(ts[kept].shape), None))
        return [(n, s, str(ts[n if n in ts else meta[n]].dtype).removeprefix("torch.")) for n, s, _ in out]
    sd = torch.load(path, weights_only=True)
    return [(n, list(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in sd.items()]


@pytest.mark.parametrize("name", SAMPLES)
def test_inspect_json_matches_torch(samples, run, name):
    r = run("inspect", samples / name, "--json")
    assert r.exit_code == 0, r.stderr
    doc = r.json()
    got = [(t["name"], t["shape"], t["dtype"]) for t in doc["tensors"]]
    assert got == expected_listing(samples / name)
    assert doc["num_params"] == PARAMS[name.split(".")[0]]
    assert doc["num_tensors"] == len(got)
    assert doc["format"] == ("safetensors" if name.endswith(".safetensors") else "pt")
    assert set(doc) >= {"source", "format", "tensors", "num_tensors", "num_params", "nbytes"}


def test_inspect_tied_counts_once_and_marks(samples, run):
    doc = run("inspect", samples / "tied.pt", "--json").json()
    tied = {t["name"]: t["tied_to"] for t in doc["tensors"]}
    assert tied["4.weight"] == "2.weight" and tied["4.bias"] == "2.bias"
    assert tied["2.weight"] is None and tied["0.weight"] is None
    unique_bytes = sum(t["nbytes"] for t in doc["tensors"] if t["tied_to"] is None)
    assert doc["nbytes"] == unique_bytes


def test_inspect_training_checkpoint(samples, run):
    doc = run("inspect", samples / "train.pt", "--json").json()
    assert [t["name"] for t in doc["tensors"]] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert doc["num_params"] == 49
    assert doc["extras"]["epoch"] == "3"
    assert "optimizer" in doc["extras"]
    opt = run("inspect", samples / "train.pt", "--key", "optimizer", "--json").json()
    assert any(t["name"].endswith("exp_avg") for t in opt["tensors"])


def test_inspect_layer_and_depth(samples, run):
    doc = run("inspect", samples / "rgnet.pt", "--json", "--layer", "[0][1][0]").json()
    assert [t["name"] for t in doc["tensors"]] == ["0.block 1.0.weight", "0.block 1.0.bias"]
    text = run("inspect", samples / "rgnet.pt", "--depth", "1").stdout
    assert "block 0" not in text and "309 params" in text
    bad = run("inspect", samples / "rgnet.pt", "--layer", "7")
    assert bad.exit_code == 1 and bad.stderr.startswith("error:") and "matches nothing" in bad.stderr


GOLDEN_MLP = """\
mlp.pt  pt  4 tensors  49 params  196 B
├── 0  (40 params, float32, 160 B)
│   ├── bias  [8]  float32  8
│   └── weight  [8, 4]  float32  32
└── 2  (9 params, float32, 36 B)
    ├── bias  [1]  float32  1
    └── weight  [1, 8]  float32  8
"""

GOLDEN_TIED_SPEC = """\
nn:let s = Linear(8, 8) in Sequential(Linear(4, 8), ReLU(), s, ReLU(), s)  module  6 tensors  112 params  448 B  (tied storage counted once)
├── 0  Linear(in_features=4, out_features=8, bias=True)  (40 params, float32, 160 B)
│   ├── bias  [8]  float32  8
│   └── weight  [8, 4]  float32  32
├── 1  ReLU()
├── 2  Linear(in_features=8, out_features=8, bias=True)  (72 params, float32, 288 B)
│   ├── bias  [8]  float32  8  (tied)
│   └── weight  [8, 8]  float32  64  (tied)
├── 3  ReLU()
└── 4  Linear(in_features=8, out_features=8, bias=True)  (72 params, float32, 288 B)
    ├── bias  [8]  float32  8  = 2.bias
    └── weight  [8, 8]  float32  64  = 2.weight
"""


def test_inspect_golden_tree(samples, run, monkeypatch):
    monkeypatch.chdir(samples)
    r = run("inspect", "mlp.pt", env={"COLUMNS": "120", "NO_COLOR": "1"})
    assert r.stdout == GOLDEN_MLP


def test_inspect_golden_module_spec(run):
    spec = "nn:let s = Linear(8, 8) in Sequential(Linear(4, 8), ReLU(), s, ReLU(), s)"
    r = run("inspect", spec, env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert r.exit_code == 0, r.stderr
    assert r.stdout == GOLDEN_TIED_SPEC


def test_inspect_stdin(samples, run):
    data = (samples / "mlp.safetensors").read_bytes()
    r = run("inspect", "-", "--json", input=data)
    assert r.exit_code == 0, r.stderr
    assert r.json()["num_params"] == 49 and r.json()["source"] == "-"


def test_show_values(samples, run):
    sd = torch.load(samples / "mlp.pt", weights_only=True)
    r = run("show", samples / "mlp.pt", "2.bias")
    assert r.exit_code == 0
    assert r.stdout.strip() == repr(sd["2.bias"])
    doc = run("show", samples / "mlp.safetensors", "0.weight", "--json").json()
    assert doc["shape"] == [8, 4] and doc["dtype"] == "float32"
    assert torch.equal(torch.tensor(doc["values"]), sd["0.weight"])
    bf = run("show", samples / "bf16.pt", "0.bias", "--json").json()
    assert bf["dtype"] == "bfloat16" and len(bf["values"]) == 8
    missing = run("show", samples / "mlp.pt", "0.wieght")
    assert missing.exit_code == 1 and "did you mean '0.weight'" in missing.stderr


def test_show_elides_large(tmp_path, run):
    torch.save({"big": torch.zeros(100, 100)}, tmp_path / "big.pt")
    r = run("show", tmp_path / "big.pt", "big")
    assert "..." in r.stdout and len(r.stdout.splitlines()) < 20


def test_whole_pickled_module_loads(tmp_path, run):
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU()), tmp_path / "m.pt")
    doc = run("inspect", tmp_path / "m.pt", "--json").json()
    assert [t["name"] for t in doc["tensors"]] == ["0.weight", "0.bias"]
    r = run("show", tmp_path / "m.pt", "0.bias", "--json")
    assert r.exit_code == 0 and len(r.json()["values"]) == 3


def test_gpu_saved_location_loads_on_cpu(tmp_path, run):
    # a checkpoint written on a GPU machine records location "cuda:0"; rewrite the record to prove we map to CPU
    torch.save({"w": torch.ones(2)}, tmp_path / "a.pt")

    def to_gpu(name, data):
        if name.endswith("data.pkl"):
            data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            assert b"cuda:0" in data
        return data

    rewrite_zip(tmp_path / "a.pt", tmp_path / "gpu.pt", to_gpu)
    r = run("show", tmp_path / "gpu.pt", "w", "--json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["values"] == [1.0, 1.0]


def test_names_are_escaped(tmp_path, run):
    torch.save(collections.OrderedDict({"evil\x1b[31m.weight": torch.zeros(1)}), tmp_path / "e.pt")
    r = run("inspect", tmp_path / "e.pt")
    assert "\x1b" not in r.stdout and "\\x1b[31m" in r.stdout
    doc = run("inspect", tmp_path / "e.pt", "--json").json()
    assert doc["tensors"][0]["name"] == "evil\x1b[31m.weight"  # JSON carries the real name, escaped by JSON


def test_errors_are_one_line(tmp_path, run):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    for args in (["inspect", tmp_path / "junk.pt"], ["inspect", tmp_path / "missing.pt"],
                 ["show", tmp_path / "junk.pt", "x"]):
        r = run(*args)
        assert r.exit_code == 1
        assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1 and r.stdout == ""
    usage = run("inspect", "--depth", "notanumber", tmp_path / "junk.pt")
    assert usage.exit_code == 2 and usage.stderr.startswith("error:")


def test_malicious_pickle_refused(tmp_path, run):
    marker = tmp_path / "MARKER"
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    (tmp_path / "evil.pt").write_bytes(payload)
    for cmd in (["inspect"], ["show"], ["ties"]):
        args = cmd + [tmp_path / "evil.pt"] + (["x"] if cmd == ["show"] else [])
        r = run(*args)
        assert r.exit_code == 1 and "os.system" in r.stderr, r.stderr
    assert not marker.exists()


@pytest.mark.parametrize("name", ["rgnet.pt", "rgnet.safetensors", "tied.safetensors", "legacy.pt", "train.pt"])
def test_listing_does_not_import_torch(samples, name):
    if name == "legacy.pt":
        torch.save(torch.load(samples / "tied.pt"), samples / name, _use_new_zipfile_serialization=False)
    for cmd in ("inspect", "ties"):
        p = listing_without_torch(samples / name, cmd)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)


def test_listing_reads_no_tensor_bytes(samples, tmp_path, run):
    # garbage in every tensor byte: listing must not notice
    src = samples / "rgnet.safetensors"
    raw = bytearray(src.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    for i in range(8 + n, len(raw)):
        raw[i] = 0xFF
    (tmp_path / "g.safetensors").write_bytes(bytes(raw))
    a = run("inspect", src, "--json").json()
    b = run("inspect", tmp_path / "g.safetensors", "--json").json()
    assert a["tensors"] == b["tensors"]


def test_closed_pipe_is_quiet(samples):
    env = dict(os.environ, COLUMNS="80")
    p = subprocess.run(
        f"{sys.executable} -m paramtool inspect {samples / 'rgnet.pt'} | head -c 10",
        shell=True, capture_output=True, env=env,
    )
    assert p.stderr == b""


def test_every_command_has_help_with_example(run):
    from paramtool.cli import app

    import typer.main

    group = typer.main.get_command(app)
    for name in group.commands:
        r = run(name, "--help")
        assert r.exit_code == 0
        assert "Example" in r.stdout, name


def test_every_command_is_in_the_readme():
    import pathlib

    import typer.main

    from paramtool.cli import app

    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [name for name in typer.main.get_command(app).commands if f"| `paramtool {name} " not in readme]
    assert not missing, f"commands missing from the README's command table: {missing}"


def test_training_checkpoint_shapes(tmp_path, run):
    net = torch.nn.Sequential(torch.nn.Linear(2, 3))
    sd = net.state_dict()
    lightning = {"epoch": 1, "global_step": 10, "state_dict": {f"model.{k}": v for k, v in sd.items()},
                 "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3, 2)}}, "param_groups": []}],
                 "lr_schedulers": []}
    torch.save(lightning, tmp_path / "l.ckpt")
    names = [t["name"] for t in run("inspect", tmp_path / "l.ckpt", "--json").json()["tensors"]]
    assert names == ["model.0.weight", "model.0.bias"]  # the state dict's own keys; optimizer state not listed
    ema = {"model": sd, "ema": {k: v.clone() for k, v in sd.items()}, "step": 5}
    torch.save(ema, tmp_path / "e.pt")
    names = [t["name"] for t in run("inspect", tmp_path / "e.pt", "--json").json()["tensors"]]
    assert names == ["model.0.weight", "model.0.bias", "ema.0.weight", "ema.0.bias"]  # prefixes tell them apart
    names = [t["name"] for t in run("inspect", tmp_path / "e.pt", "--key", "ema", "--json").json()["tensors"]]
    assert names == ["0.weight", "0.bias"]


def test_legacy_format_read_and_written(samples, tmp_path, run):
    torch.save(torch.load(samples / "mlp.pt"), tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    doc = run("inspect", tmp_path / "old.pt", "--json").json()
    assert doc["format"] == "pt-legacy" and doc["num_params"] == 49
    r = run("init", tmp_path / "old.pt", "--scheme", "ones", "--layer", "0", "-o", tmp_path / "new.pt")
    assert r.exit_code == 0, r.stderr
    out = torch.load(tmp_path / "new.pt", weights_only=True)
    assert torch.all(out["0.weight"] == 1) and torch.equal(out["2.weight"], torch.load(samples / "mlp.pt")["2.weight"])

"""Issue 10: checkpoints holding ordinary Python objects are read without running anything.

Real library files (a checkpoint laid out as timm's CheckpointSaver writes it, a Lightning checkpoint written by
``Trainer.fit``, omegaconf configs, numpy scalars, pathlib paths, a dataclass): every command works, nothing the
file names is imported or called (an audit hook in a fresh interpreter records what happens), pt -> pt output is
byte-identical outside the changed storages and loads with ``torch.load(weights_only=False)``. Then the
differential cases where two readers could disagree about a file.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import pickle
import pickletools
import subprocess
import sys
import tarfile
import warnings
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from conftest import listing_without_torch
from inert_helpers import TrainConfig, lightning_module_class
from safetensors import safe_open

TESTS = pathlib.Path(__file__).resolve().parent


def _timm(path: pathlib.Path) -> None:
    """The dict timm's CheckpointSaver writes (timm itself is not installable here): the same keys and types."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    args = argparse.Namespace(model="resnet50", lr=0.1, epochs=3, batch_size=32, output=pathlib.PosixPath("/out"))
    torch.save({"epoch": 3, "arch": "resnet50", "state_dict": model.state_dict(), "optimizer": opt.state_dict(),
                "version": 2, "args": args, "metric": np.float64(0.75)}, path)


def _misc(path: pathlib.Path) -> None:
    """numpy scalars and arrays' dtypes, pathlib paths, a dataclass, a torch dtype and device beside tensors."""
    torch.manual_seed(1)
    torch.save({"model": {"w": torch.randn(3, 4), "b": torch.zeros(3)},
                "config": TrainConfig(lr=0.01, name="exp"),
                "paths": [pathlib.PurePosixPath("a/b.txt"), pathlib.Path("/data/train")],
                "best": np.float32(1.5), "step": np.int64(7), "flag": np.bool_(True), "curve": np.arange(3.0),
                "dtype": torch.bfloat16, "device": torch.device("cpu")}, path)


def _lightning(path: pathlib.Path) -> None:
    import lightning as L
    from lightning.fabric.utilities.data import AttributeDict
    from omegaconf import OmegaConf

    torch.manual_seed(2)
    cfg = OmegaConf.create({"model": {"hidden": 8, "act": "relu"}, "data": {"batch": 4}})
    module = lightning_module_class()(cfg, AttributeDict(seed=3, tags=["a", "b"]), lr=0.05)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randn(16, 2)),
                                       batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, accelerator="cpu", default_root_dir=str(path.parent))
        trainer.fit(module, data)
        trainer.save_checkpoint(path)


MAKERS = {"timm": (_timm, "arch"), "misc": (_misc, "config"), "lightning": (_lightning, "hyper_parameters")}
NAMED_MODULES = {"timm": {"argparse"}, "misc": {"inert_helpers"},
                 "lightning": {"omegaconf", "lightning", "lightning_fabric", "inert_helpers"}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("inert")
    for kind, (make, _) in MAKERS.items():
        make(out / f"{kind}.pt")
    return out


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_torch_refuses_weights_only_paramtool_reads(files, run, kind):
    path = files / f"{kind}.pt"
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    doc = run("inspect", path, "--json").json()
    assert doc["weights_only_loadable"] is False and doc["globals"]
    assert doc["num_tensors"] > 0
    text = run("inspect", path).stdout
    assert "globals:" in text and doc["globals"][0] in text
    p = listing_without_torch(path)
    assert p.returncode == 0, p.stderr


def test_plain_state_dict_is_weights_only_loadable(tmp_path, run):
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "sd.pt")
    doc = run("inspect", tmp_path / "sd.pt", "--json").json()
    assert doc["globals"] == [] and doc["weights_only_loadable"] is True
    torch.save(torch.nn.Linear(2, 2), tmp_path / "m.pt")  # a whole module needs its classes allowlisted
    doc = run("inspect", tmp_path / "m.pt", "--json").json()
    assert doc["globals"] == ["torch.nn.modules.linear.Linear"] and doc["weights_only_loadable"] is False
    save_file({"w": torch.zeros(2)}, tmp_path / "w.safetensors")  # no pickle: the contract's keys all the same
    for args in (["inspect", tmp_path / "w.safetensors", "--json"], ["inspect", "nn:Linear(2, 2)", "--json"]):
        doc = run(*args).json()
        assert doc["globals"] == [] and doc["weights_only_loadable"] is True


def test_static_allowlist_matches_installed_torch():
    from paramtool.formats.weights_only import WEIGHTS_ONLY_GLOBALS, current

    assert set(current()) == WEIGHTS_ONLY_GLOBALS


def test_objects_are_shown_by_name_and_fields(files, run):
    extras = run("inspect", files / "timm.pt", "--json").json()["extras"]
    assert extras["args"].startswith("argparse.Namespace(model='resnet50', lr=0.1, epochs=3")
    assert "output=pathlib.PosixPath('/out')" in extras["args"]
    assert extras["metric"] == "numpy.float64(0.75)"
    extras = run("inspect", files / "misc.pt", "--json").json()["extras"]
    assert extras["config"].startswith("inert_helpers.TrainConfig(lr=0.01, name='exp'")
    assert extras["best"] == "numpy.float32(1.5)" and extras["step"] == "numpy.int64(7)"
    assert extras["curve"] == "numpy.ndarray(shape=(3,), dtype='f8')" and extras["flag"] == "numpy.bool_(True)"
    assert extras["dtype"] == "torch.bfloat16"
    doc = run("inspect", files / "lightning.pt", "--json").json()
    assert doc["extras"]["hyper_parameters"] == "dict (3 entries)"
    assert {"omegaconf.dictconfig.DictConfig", "lightning.fabric.utilities.data.AttributeDict"} <= set(doc["globals"])
    from paramtool.formats.torchfile import read_zip

    hp = read_zip(str(files / "lightning.pt")).root["hyper_parameters"]
    assert repr(hp["cfg"]) == "omegaconf.DictConfig({'data': {'batch': 4}, 'model': {'act': 'relu', 'hidden': 8}})"
    assert repr(hp["extra"]) == "lightning.fabric.utilities.data.AttributeDict({'seed': 3, 'tags': ['a', 'b']})"


AUDIT = r'''
import sys, os, json
import paramtool.cli, torch, safetensors.torch, numpy  # the tool's own imports happen before the hook
from paramtool.cli import main
events = []
ALLOWED_ROOTS = [os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, os.environ["WORK"], "/proc", "/sys",
                 "/dev", "/etc", "/usr", os.path.dirname(os.path.dirname(paramtool.cli.__file__)))]
FORBIDDEN = {"pickle.find_class", "os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn",
             "os.fork", "os.forkpty", "webbrowser.open", "socket.connect", "socket.getaddrinfo"}

def hook(event, args):
    if event in FORBIDDEN:
        events.append([event, str(args)[:200]])
    elif event == "import" and args[0].split(".")[0] in NAMED:
        events.append([event, args[0]])
    elif event == "open" and isinstance(args[0], (str, bytes)):
        p = os.path.realpath(os.fsdecode(args[0]))
        if not any(p == r or p.startswith(r + os.sep) for r in ALLOWED_ROOTS):
            events.append([event, p])
    elif event in ("exec", "compile"):  # code made from a string (not a file) that mentions the file's modules
        where = args[1] if event == "compile" else getattr(args[0], "co_filename", "")
        text = str(args[0]) if event == "compile" else str(getattr(args[0], "co_names", ""))
        if not os.path.exists(str(where)) and any(m in text for m in NAMED):
            events.append([event, str(where), text[:200]])

NAMED = set(json.loads(sys.argv[1]))
BEFORE = set(sys.modules)
commands = json.loads(sys.argv[2])
sys.addaudithook(hook)
codes = []
for argv in commands:
    sys.argv = ["paramtool"] + argv
    try:
        main()
        codes.append(0)
    except SystemExit as e:
        codes.append(e.code or 0)
print(json.dumps({"events": events, "codes": codes, "loaded": sorted(m for m in set(sys.modules) - BEFORE if m.split(".")[0] in NAMED)}))
'''


def _commands(path: pathlib.Path, out: pathlib.Path, name: str) -> list[list[str]]:
    p = str(path)
    return [["inspect", p], ["inspect", p, "--json"], ["show", p, name], ["stats", p], ["ties", p],
            ["diff", p, p], ["init", p, "--scheme", "zeros", "--layer", name, "--param", "all", "-o", str(out / "init.pt")],
            ["set", p, f"{name}[...] = 1", "-o", str(out / "set.pt")],
            ["init", p, "--scheme", "ones", "--untie", "--param", "all", "-o", str(out / "untie.pt")],
            ["convert", p, "-o", str(out / "conv.pt")],
            ["convert", p, "--drop-extra", "-o", str(out / "conv.safetensors")]]


def _first_param(run, path) -> str:
    return run("inspect", path, "--json").json()["tensors"][0]["name"]


def _records(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {i.filename.split("/", 1)[1]: z.read(i) for i in z.infolist()}


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_every_command_works_and_nothing_from_the_file_runs(files, run, tmp_path, kind):
    path = files / f"{kind}.pt"
    name = _first_param(run, path)
    env = dict(os.environ, WORK=str(tmp_path), PYTHONPATH=os.pathsep.join(
        [str(pathlib.Path(__file__).resolve().parents[1] / "src")] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    # the checkpoint lives outside tmp_path: copy it in, so any read outside the work dir is an escape
    work = tmp_path / "in.pt"
    work.write_bytes(path.read_bytes())
    commands = _commands(work, tmp_path, name)
    p = subprocess.run([sys.executable, "-c", AUDIT, json.dumps(sorted(NAMED_MODULES[kind])), json.dumps(commands)],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["codes"] == [0] * len(commands), (report["codes"], p.stderr[-2000:])
    assert report["events"] == [] and report["loaded"] == [], report

    original = torch.load(work, weights_only=False)  # this test trusts the file: it wrote it
    for out in ("init.pt", "set.pt", "untie.pt", "conv.pt"):
        again = torch.load(tmp_path / out, weights_only=False)
        key = MAKERS[kind][1]
        assert type(again[key]) is type(original[key]) and repr(again[key]) == repr(original[key]), out
    # set: a streamed patch; every record but the changed storage's is byte for byte the input's
    before, after = _records(work), _records(tmp_path / "set.pt")
    changed = {k for k in before if before[k] != after.get(k)} - {"version", ".data/serialization_id"}
    assert changed and all(k.startswith("data/") for k in changed) and len(changed) == 1
    assert before["data.pkl"] == after["data.pkl"] and set(before) == set(after)
    with safe_open(str(tmp_path / "conv.safetensors"), "pt") as f:
        keys = set(f.keys())
    listed = {t["name"] for t in run("inspect", work, "--json").json()["tensors"]}
    assert keys == listed
    r = run("convert", work, "-o", tmp_path / "refused.safetensors")
    assert r.exit_code == 1 and "--drop-extra" in r.stderr


def test_lightning_hyperparameters_survive_untie_rewrite(files, run, tmp_path):
    from omegaconf import DictConfig

    r = run("init", files / "lightning.pt", "--scheme", "zeros", "--untie", "-o", tmp_path / "o.ckpt")
    assert r.exit_code == 0, r.stderr
    ck = torch.load(tmp_path / "o.ckpt", weights_only=False)
    hp = ck["hyper_parameters"]
    assert isinstance(hp["cfg"], DictConfig) and hp["cfg"].model.hidden == 8 and hp["extra"].seed == 3
    assert ck["global_step"] == 2 and torch.count_nonzero(ck["state_dict"]["layer.weight"]) == 0


# ---------------------------------------------------------------------------------------------------------------
# The differential cases: what two readers could read differently is refused, or read the way torch reads it.


def _zip_of(path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def _write_zip(path, records) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in records:
            z.writestr(name, data)


def _evil_pickle(marker) -> bytes:
    cmd = f"touch {marker}".encode()
    return b"\x80\x02cos\nsystem\nX" + len(cmd).to_bytes(4, "little") + cmd + b"\x85R."


@pytest.mark.parametrize("command", [["inspect"], ["stats"], ["convert", "-o", "OUT.pt"]])
def test_zip_record_name_with_nul_is_ambiguous(tmp_path, run, command):
    marker = tmp_path / "MARKER"
    torch.save({"a": torch.ones(2)}, tmp_path / "ok.pt")
    records = _zip_of(tmp_path / "ok.pt")
    prefix = records[0][0].split("/")[0]
    records.append((f"{prefix}/data.pklZx", _evil_pickle(marker)))
    _write_zip(tmp_path / "z.pt", records)
    data = (tmp_path / "z.pt").read_bytes().replace(b"data.pklZx", b"data.pkl\x00x")
    (tmp_path / "nul.pt").write_bytes(data)
    args = [a.replace("OUT", str(tmp_path / "out")) for a in command]
    r = run(args[0], tmp_path / "nul.pt", *args[1:])
    assert r.exit_code == 1 and "ambiguous" in r.stderr and "NUL" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and not marker.exists() and not (tmp_path / "out.pt").exists()


def test_duplicate_record_and_two_prefixes_are_ambiguous(tmp_path, run):
    torch.save({"a": torch.ones(2)}, tmp_path / "ok.pt")
    records = _zip_of(tmp_path / "ok.pt")
    pkl = next(r for r in records if r[0].endswith("/data.pkl"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name it is asked to write
        _write_zip(tmp_path / "dup.pt", records + [pkl])
    r = run("inspect", tmp_path / "dup.pt")
    assert r.exit_code == 1 and "ambiguous" in r.stderr and "two records" in r.stderr
    _write_zip(tmp_path / "two.pt", records + [("other/data.pkl", pkl[1])])
    r = run("inspect", tmp_path / "two.pt")
    assert r.exit_code == 1 and "ambiguous" in r.stderr and "two prefixes" in r.stderr


def test_archive_prefix_comes_from_the_first_record(tmp_path, run):
    torch.save({"a": torch.ones(2)}, tmp_path / "ok.pt")
    records = [("good/" + n.split("/", 1)[1], d) for n, d in _zip_of(tmp_path / "ok.pt")]
    _write_zip(tmp_path / "evil.pt", [("evil/version", b"3\n")] + records)
    r = run("inspect", tmp_path / "evil.pt")
    assert r.exit_code == 1 and "ambiguous" in r.stderr and "evil/version" in r.stderr
    # the same records without the stray first one are a fine checkpoint under any prefix
    _write_zip(tmp_path / "fine.pt", records)
    assert run("show", tmp_path / "fine.pt", "a").exit_code == 0


def _make_dcp(path, extra=None):
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    state = {"model": torch.nn.Linear(3, 2).state_dict(), "epoch": 3}
    state.update(extra or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(path))
    return state


def _rewrite_dcp_paths(ck, new_path) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(ck)).read_metadata()  # our own test file: torch may unpickle it
    for index, info in list(md.storage_data.items()):
        md.storage_data[index] = type(info)(new_path(info.relative_path), info.offset, info.length,
                                            info.transform_descriptors)
    with open(ck / ".metadata", "wb") as f:
        pickle.dump(md, f)


@pytest.mark.parametrize("command", [["inspect"], ["show", "NAME"], ["stats"], ["convert", "-o", "OUT.safetensors"]])
def test_dcp_relative_path_escape_refused(tmp_path, run, command):
    ck, outside = tmp_path / "ck", tmp_path / "home"
    _make_dcp(ck)
    outside.mkdir()
    for f in ck.glob("*.distcp"):
        (outside / f.name).write_bytes(f.read_bytes())
    _rewrite_dcp_paths(ck, lambda rel: f"../home/{rel}")
    args = [a.replace("OUT", str(tmp_path / "out")).replace("NAME", "weight") for a in command]
    r = run(args[0], ck, *args[1:])
    assert r.exit_code == 1 and "outside the checkpoint directory" in r.stderr, r.stderr
    assert r.stdout == "" and not (tmp_path / "out.safetensors").exists()


def test_dcp_symlink_escape_refused(tmp_path, run):
    ck, outside = tmp_path / "ck", tmp_path / "home"
    _make_dcp(ck)
    outside.mkdir()
    for f in ck.glob("*.distcp"):
        (outside / f.name).write_bytes(f.read_bytes())
    (ck / "link").symlink_to(outside)
    _rewrite_dcp_paths(ck, lambda rel: f"link/{rel}")
    r = run("stats", ck)
    assert r.exit_code == 1 and "symlink" in r.stderr, r.stderr


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_dcp_pickled_records_read_by_the_inert_unpickler(tmp_path, run):
    ck = tmp_path / "ck"
    _make_dcp(ck, {"args": argparse.Namespace(lr=0.5, name="x")})
    r = run("stats", ck)
    assert r.exit_code == 0, r.stderr
    assert run("convert", ck, "-o", tmp_path / "one.pt").exit_code == 0
    whole = torch.load(tmp_path / "one.pt", weights_only=False)  # our own file: the Namespace is written back
    assert whole["model"].keys() >= {"weight", "bias"} and whole["args"] == argparse.Namespace(lr=0.5, name="x")
    r = run("init", ck, "--scheme", "zeros", "-o", tmp_path / "ck2")
    assert r.exit_code == 0, r.stderr
    import torch.distributed.checkpoint as dcp

    state = {"model": {"weight": torch.empty(2, 3), "bias": torch.empty(2)}, "epoch": 0, "args": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(tmp_path / "ck2"))  # torch's own reader (our own test file)
    assert state["args"] == argparse.Namespace(lr=0.5, name="x") and state["epoch"] == 3
    assert torch.count_nonzero(state["model"]["weight"]) == 0
    marker = tmp_path / "MARKER"
    bad = tmp_path / "bad"
    _make_dcp(bad, {"hook": _Evil(marker)})
    assert not marker.exists()
    for command in (["stats"], ["show", "weight"], ["convert", "-o", str(tmp_path / "b.pt")]):
        r = run(command[0], bad, *command[1:])
        assert r.exit_code == 1 and ".system'" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not marker.exists()


def _tar_pickle_polyglot(legacy: bytes) -> bytes:
    """A legacy torch file whose first pickle (the magic number) also forms a valid tar header."""
    first_len = next(pos for op, _, pos in pickletools.genops(legacy) if op.name == "STOP") + 1
    head = b"\x80\x02\x8a\x0a" + legacy[4:14]  # PROTO 2, LONG1 magic number (as torch writes it)
    block = bytearray(512)
    info = tarfile.TarInfo("x")
    info.size = 0
    tar_header = info.tobuf(tarfile.USTAR_FORMAT)[:512]
    # keep bytes 0..18 for the pickle, then a BINSTRING holding the rest of the tar header, POP, STOP
    start = len(head) + 5
    block[:] = tar_header
    block[: len(head)] = head
    block[len(head)] = ord("T")
    body_len = 512 - start
    block[len(head) + 1: start] = body_len.to_bytes(4, "little")
    # fix the checksum for the bytes the pickle now occupies
    block[148:156] = b" " * 8
    chk = sum(block)
    block[148:156] = f"{chk:06o}\0 ".encode()
    first = bytes(block) + b"0."
    return first + legacy[first_len:]


def test_tar_and_legacy_pickle_polyglot_is_ambiguous(tmp_path, run):
    torch.save({"a": torch.ones(2)}, tmp_path / "l.pt", _use_new_zipfile_serialization=False)
    data = _tar_pickle_polyglot((tmp_path / "l.pt").read_bytes())
    (tmp_path / "poly.pt").write_bytes(data)
    with tarfile.open(tmp_path / "poly.pt", "r:") as t:  # it really is a tar archive ...
        assert t.next() is not None
    from paramtool.formats.torchfile import _read_legacy

    assert _read_legacy(str(tmp_path / "poly.pt")).root["a"].shape == (2,)  # ... and a legacy torch file
    for command in ("inspect", "stats"):
        r = run(command, tmp_path / "poly.pt")
        assert r.exit_code == 1 and "ambiguous" in r.stderr and "tar" in r.stderr, r.stderr


def test_module_state_dict_hooks_are_never_called(tmp_path, run):
    import collections

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    net[1].weight = net[0].weight  # a tie, so that --untie has work to do
    net._state_dict_hooks[0] = collections.OrderedDict  # an allowlisted class as a "hook"
    torch.save(net, tmp_path / "h.pt")
    r = run("init", tmp_path / "h.pt", "--scheme", "zeros", "--untie", "-o", tmp_path / "o.pt")
    assert r.exit_code == 0, r.stderr
    back = torch.load(tmp_path / "o.pt", weights_only=False)
    assert back._state_dict_hooks[0] is collections.OrderedDict  # written back as it was, never called
    assert back[0].weight.data_ptr() != back[1].weight.data_ptr()
    assert torch.count_nonzero(back[0].weight) == 0


@pytest.mark.parametrize("command", [["show", "0.weight"], ["stats"], ["init", "--scheme", "ones", "-o", "OUT.pt"],
                                     ["convert", "-o", "OUT.pt"], ["convert", "-o", "OUT.safetensors"]])
def test_legacy_whole_module_file(tmp_path, run, command):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    torch.save(net, tmp_path / "m.pt", _use_new_zipfile_serialization=False)
    args = [a.replace("OUT", str(tmp_path / "out")) for a in command]
    r = run(args[0], tmp_path / "m.pt", *args[1:])
    assert r.exit_code == 0, r.stderr
    if command[0] == "show":
        assert "tensor" in r.stdout or "[" in r.stdout
    if command[0] == "init":
        back = torch.load(tmp_path / "out.pt", weights_only=False)
        assert isinstance(back, torch.nn.Sequential) and torch.all(back[0].weight == 1)
        assert torch.equal(back[2].bias, net[2].bias)
    if args[-1].endswith(".safetensors"):
        with safe_open(args[-1], "pt") as f:
            assert set(f.keys()) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_ties_and_requires_grad_survive_loading(tmp_path):
    from paramtool import sources

    emb = torch.nn.Parameter(torch.randn(5, 3))
    sd = {"a": emb, "b": emb, "view": emb.data[1:3], "g": torch.ones(2, requires_grad=True), "n": torch.zeros(2)}
    for legacy in (False, True):
        torch.save(sd, tmp_path / "t.pt", _use_new_zipfile_serialization=not legacy)
        ck = sources.load(sources.resolve(str(tmp_path / "t.pt")))
        root = ck.root
        assert isinstance(root["a"], torch.nn.Parameter) and root["a"] is root["b"]
        assert root["view"].untyped_storage().data_ptr() == root["a"].untyped_storage().data_ptr()
        assert torch.equal(root["view"], emb.data[1:3]) and root["view"].storage_offset() == 3
        assert root["g"].requires_grad and not isinstance(root["g"], torch.nn.Parameter)
        assert not root["n"].requires_grad


def test_refused_names_and_inert_names():
    from paramtool.formats.unpickle import refused

    for name in ("os.system", "posix.system", "nt.system", "subprocess.Popen", "builtins.eval", "builtins.exec",
                 "builtins.getattr", "builtins.__import__", "builtins.open", "runpy._run_code",
                 "importlib.import_module", "pickle.loads", "_pickle.loads", "marshal.loads", "sys.modules",
                 "shutil.rmtree", "socket.socket", "webbrowser.open", "ctypes.CDLL", "code.InteractiveInterpreter",
                 "pty.spawn", "torch.load", "torch.hub.load", "torch.jit.load", "torch._C._import_ir_module",
                 "numpy.testing._private.utils.runstring", "torch.nn.modules.linear.os", "operator.attrgetter",
                 "torch.storage._load_from_bytes", "functools.partial"):
        assert refused(name), name
    for name in ("argparse.Namespace", "omegaconf.dictconfig.DictConfig", "pathlib.PosixPath", "numpy.dtype",
                 "numpy._core.multiarray.scalar", "collections.OrderedDict", "builtins.set",
                 "torch._utils._rebuild_tensor_v2", "torch.FloatStorage", "torch.serialization._get_layout",
                 "lightning.fabric.utilities.data.AttributeDict", "inert_helpers.TrainConfig", "types.SimpleNamespace"):
        assert not refused(name), name


def test_refusal_message_says_the_file_is_built_to_run_code(tmp_path, run):
    (tmp_path / "e.pt").write_bytes(_evil_pickle(tmp_path / "M"))
    r = run("inspect", tmp_path / "e.pt")
    assert r.exit_code == 1 and "'os.system'" in r.stderr and "built to run code" in r.stderr
    assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1


def test_inert_unpickler_never_uses_find_class_or_imports(tmp_path):
    code = (
        "import sys, pickle\n"
        "calls = []\n"
        "sys.addaudithook(lambda e, a: calls.append((e, a)) if e in ('pickle.find_class', 'import') else None)\n"
        "from paramtool.formats.unpickle import unpickle\n"
        "data = sys.stdin.buffer.read()\n"
        "assert 'inert_helpers' not in sys.modules and 'argparse' not in sys.modules\n"
        "before = set(sys.modules)\n"
        "calls.clear()\n"
        "obj, names = unpickle(data)\n"
        "assert 'inert_helpers' not in sys.modules and 'argparse' not in sys.modules, set(sys.modules) - before\n"
        "assert set(sys.modules) == before, set(sys.modules) - before\n"
        "assert calls == [], calls\n"
        "print(sorted(names))\n"
        "print(repr(obj))\n"
    )
    data = pickle.dumps({"cfg": TrainConfig(), "ns": argparse.Namespace(a=1)}, protocol=4)
    p = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True)
    assert p.returncode == 0, p.stderr.decode()
    assert b"'argparse.Namespace'" in p.stdout and b"'inert_helpers.TrainConfig'" in p.stdout  # named, not imported
    assert b"inert_helpers.TrainConfig(lr=0.1, name='run-1', layers=(4, 8))" in p.stdout
    assert b"argparse.Namespace(a=1)" in p.stdout


def test_inert_objects_round_trip_through_the_writer(tmp_path):
    from paramtool.formats import pt
    from paramtool.formats.torchfile import read_zip

    original = {"w": torch.ones(2), "cfg": TrainConfig(lr=0.3), "ns": argparse.Namespace(x=[1, 2]),
                "p": pathlib.PurePosixPath("a/b"), "n": np.int32(5)}
    torch.save(original, tmp_path / "a.pt")
    listing = read_zip(str(tmp_path / "a.pt"))
    pt.save(pt.load(str(tmp_path / "a.pt"), listing), str(tmp_path / "b.pt"))
    back = torch.load(tmp_path / "b.pt", weights_only=False)
    assert back["cfg"] == original["cfg"] and back["ns"] == original["ns"] and back["p"] == original["p"]
    assert back["n"] == 5 and back["n"].dtype == np.int32 and torch.equal(back["w"], original["w"])
    written = read_zip(str(tmp_path / "b.pt")).globals  # each object written back as the GLOBAL it was read as
    assert written == listing.globals and {"inert_helpers.TrainConfig", "argparse.Namespace"} <= written


def test_real_module_from_a_pickled_module_runs_none_of_its_hooks(tmp_path):
    import collections

    from paramtool import sources
    from paramtool.formats.pt import real_module

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    x = torch.randn(2, 3)
    expected = net(x)
    net._state_dict_hooks[0] = collections.OrderedDict  # would raise a TypeError if state_dict() called it
    net[0]._forward_hooks[0] = collections.OrderedDict
    for legacy in (False, True):
        torch.save(net, tmp_path / "m.pt", _use_new_zipfile_serialization=not legacy)
        module = real_module(sources.load(sources.resolve(str(tmp_path / "m.pt"))).root)
        assert isinstance(module, torch.nn.Sequential) and isinstance(module[0], torch.nn.Linear)
        assert torch.allclose(module(x), expected)
        assert list(module.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
        assert not module._state_dict_hooks and not module[0]._forward_hooks


def test_tensors_inside_a_dict_subclass_are_listed_and_edited(tmp_path, run):
    from inert_helpers import AttrDict

    torch.manual_seed(3)
    ck = AttrDict(state_dict=AttrDict({"fc.weight": torch.randn(2, 3), "fc.bias": torch.randn(2)}), epoch=4)
    torch.save(ck, tmp_path / "a.pt")
    doc = run("inspect", tmp_path / "a.pt", "--json").json()
    assert [t["name"] for t in doc["tensors"]] == ["fc.weight", "fc.bias"]
    assert "inert_helpers.AttrDict" in doc["globals"]
    for extra in ([], ["--untie"]):
        r = run("init", tmp_path / "a.pt", "--scheme", "zeros", "--layer", "fc", *extra, "-o", tmp_path / "o.pt")
        assert r.exit_code == 0, r.stderr
        back = torch.load(tmp_path / "o.pt", weights_only=False)
        assert type(back) is AttrDict and type(back.state_dict) is AttrDict and back.epoch == 4
        assert torch.count_nonzero(back.state_dict["fc.weight"]) == 0
        assert torch.equal(back.state_dict["fc.bias"], ck.state_dict["fc.bias"])
    r = run("convert", tmp_path / "a.pt", "-o", tmp_path / "a.safetensors")
    assert r.exit_code == 1 and "epoch" in r.stderr
    assert run("convert", tmp_path / "a.pt", "--drop-extra", "-o", tmp_path / "a.safetensors").exit_code == 0


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.tuples(inner, inner) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    | st.frozensets(st.integers(), max_size=4) | st.sets(st.text(max_size=4), max_size=4),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None)
@given(obj=_plain, protocol=st.integers(0, 5))
def test_plain_values_read_as_pickle_reads_them(obj, protocol):
    from paramtool.formats.unpickle import unpickle

    data = pickle.dumps(obj, protocol=protocol)
    assert unpickle(data)[0] == pickle.loads(data)


def test_torchscript_archive_and_stray_pickle_records(tmp_path, run):
    marker = tmp_path / "MARKER"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated: exactly the files paramtool must still refuse
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "ts.pt"))
    r = run("inspect", tmp_path / "ts.pt", "--json")  # read inertly (tests/test_torchscript.py)
    assert r.exit_code == 0 and r.json()["format"] == "torchscript"
    assert [t["name"] for t in r.json()["tensors"]] == ["weight", "bias"]
    records = _zip_of(tmp_path / "ts.pt")  # a code-running name in any pickle of an archive is refused by name
    _write_zip(tmp_path / "ts_stray.pt", records + [(records[0][0].split("/")[0] + "/extra.pkl", _evil_pickle(marker))])
    r = run("inspect", tmp_path / "ts_stray.pt")
    assert r.exit_code == 1 and "'os.system'" in r.stderr and "extra.pkl" in r.stderr, r.stderr
    torch.save({"a": torch.ones(2)}, tmp_path / "ok.pt")
    records = _zip_of(tmp_path / "ok.pt")
    prefix = records[0][0].split("/")[0]
    _write_zip(tmp_path / "stray.pt", records + [(f"{prefix}/extra.pkl", _evil_pickle(marker))])
    r = run("stats", tmp_path / "stray.pt")
    assert r.exit_code == 1 and "'os.system'" in r.stderr, r.stderr
    assert "extra.pkl" in r.stderr and not marker.exists()


def test_legacy_storage_count_must_match_the_pickle(tmp_path, run):
    torch.save({"a": torch.arange(4.0)}, tmp_path / "l.pt", _use_new_zipfile_serialization=False)
    data = bytearray((tmp_path / "l.pt").read_bytes())
    at = len(data) - 16 - 8  # the 8-byte element count before the 4 float32 values
    assert int.from_bytes(data[at:at + 8], "little") == 4
    data[at:at + 8] = (2).to_bytes(8, "little")
    (tmp_path / "bad.pt").write_bytes(bytes(data))
    r = run("show", tmp_path / "bad.pt", "a")
    assert r.exit_code == 1 and "ambiguous" in r.stderr and "4 by the pickle" in r.stderr
    assert run("show", tmp_path / "l.pt", "a").exit_code == 0

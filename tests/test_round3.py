"""Hostile input, round 3 (issue 22): the crafted corpus of ``corpus3.py`` read under a time and memory budget,
paths through symlinks, and names that must not drive the terminal.

Each corpus file is read by ``paramtool stats --json`` (every value read) and ``inspect --json`` in a child
process whose CPU time and peak memory this process measures (``os.wait4``), against the same commands on an
honest file of the same kind: a small file must never cost more than a large honest one. The outcome is torch's
(or safetensors') own reading of the file, or one ``error:`` line.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import corpus3

SRC = str(pathlib.Path(__file__).resolve().parents[1] / "src")
CPU_SLACK = 10.0  # seconds of CPU beyond the honest run: generous (shared 2-core machines), never wall-clock
RSS_SLACK = 96 << 10  # KiB beyond the honest run's peak


# A small process spawns the command and reports its usage: a child forked from this (torch-sized) test process
# would start with this process's peak RSS already counted (Linux keeps it across exec).
_SPAWN = """
import json, os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump([os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime, usage.ru_maxrss], f)
"""


def measured(*args, env: dict | None = None) -> tuple[int, str, str, float, int]:
    """Run ``paramtool ARGS`` in a child; (exit status, stdout, stderr, CPU seconds, peak RSS KiB) of that
    child alone, as the kernel accounted them (``wait4``)."""
    import tempfile

    environ = {**os.environ, "PYTHONPATH": SRC, **(env or {})}
    with tempfile.NamedTemporaryFile("r", suffix=".json") as report:
        done = subprocess.run([sys.executable, "-c", _SPAWN, report.name, sys.executable, "-m", "paramtool",
                               *map(str, args)], stdin=subprocess.DEVNULL, capture_output=True, env=environ)
        assert done.returncode == 0, done.stderr
        code, cpu, rss = json.load(report)
    return code, done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace"), cpu, rss


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> dict[str, tuple[float, int]]:
    """CPU and peak RSS of ``stats --json`` and ``inspect --json`` on honest files, per suffix."""
    d = tmp_path_factory.mktemp("honest")
    torch.save({"w": torch.randn(256, 256)}, d / "honest.pt")
    torch.save({"w": torch.randn(256, 256)}, d / "honest-legacy.pt", _use_new_zipfile_serialization=False)
    save_file({"a": torch.randn(256, 256)}, str(d / "honest.safetensors"))
    out = {}
    for name in ("honest.pt", "honest-legacy.pt", "honest.safetensors"):
        for command in ("stats", "inspect"):
            code, _, err, cpu, rss = measured(command, d / name, "--json")
            assert code == 0, err
            out[_kind(name), command] = (cpu, rss)
    return out


def _kind(name: str) -> str:
    """What an honest file of this kind costs to read: a legacy file, a zip with a deflated record and the
    values of a recorded view are read with torch (no byte ranges); a zip and a safetensors file by byte
    range, without torch."""
    return "legacy" if any(w in name for w in ("legacy", "deflate", "expanded")) else pathlib.Path(name).suffix


def torch_reading(path: pathlib.Path) -> dict:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("name", list(corpus3.CASES))
def test_crafted_corpus(tmp_path, baseline, name):
    build, want = corpus3.CASES[name]
    path = tmp_path / name
    path.write_bytes(build())
    for command in ("stats", "inspect"):
        code, out, err, cpu, rss = measured(command, path, "--json")
        honest_cpu, honest_rss = baseline[_kind(name), command]
        assert cpu <= honest_cpu + CPU_SLACK, (command, cpu, honest_cpu)
        assert rss <= honest_rss + RSS_SLACK, (command, rss, honest_rss)
        if want != "torch":
            assert code == 1, (command, out[:300], err)
            lines = err.splitlines()
            assert len(lines) == 1 and lines[0].startswith("error:") and "internal error" not in err, err
            assert want in err, err
            continue
        assert code == 0, (command, err)
        expected = torch_reading(path)
        doc = json.loads(out)
        if command == "inspect":
            shown = {t["name"]: t for t in doc["tensors"] if t["name"] in expected}
            assert set(shown) == set(expected)
            for n, t in expected.items():
                assert shown[n]["dtype"] == str(t.dtype).removeprefix("torch.") and shown[n]["shape"] == list(t.shape)
            assert doc["weights_only_loadable"] is True and doc["globals"] == []
        else:
            stats = {t["name"]: t for t in doc["tensors"]}
            for n, t in expected.items():
                v = t.double()
                assert stats[n]["min"] == v.min().item() and stats[n]["max"] == v.max().item(), n
                assert stats[n]["mean"] == pytest.approx(v.mean().item(), rel=1e-12), n


def test_storages_0_and_str_0_are_two_storages(tmp_path, run):
    """torch reads storage keys ``'0'`` and ``0`` as two storages of one record: b is int32, and not a tie."""
    path = tmp_path / "keys.pt"
    path.write_bytes(corpus3.CASES["storage-keys-0-and-'0'.pt"][0]())
    r = run("inspect", path, "--json")
    assert r.exit_code == 0, r.stderr
    tensors = {t["name"]: t for t in json.loads(r.stdout)["tensors"]}
    assert tensors["b"]["dtype"] == "int32" and tensors["b"]["tied_to"] is None
    r = run("show", path, "b", "--json")
    assert json.loads(r.stdout)["values"] == torch.load(path, weights_only=True)["b"].tolist()


def test_the_pickle_torch_would_load_gives_the_verdict(tmp_path, run):
    """A second ``DATA.PKL`` naming os.system is what torch's reader may take: never reported clean."""
    path = tmp_path / "two.pt"
    path.write_bytes(corpus3.CASES["data.pkl-case-dup.pt"][0]())
    r = run("inspect", path, "--json")
    assert r.exit_code == 1 and '"weights_only_loadable": true' not in r.stdout


# --- paths through symlinks ----------------------------------------------------------------------------------


def _sharded(d: pathlib.Path) -> pathlib.Path:
    d.mkdir()
    save_file({"a": torch.ones(2)}, str(d / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file({"b": torch.ones(2)}, str(d / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 16}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                                            "b": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


def test_recovery_never_deletes_through_a_symlink(tmp_path, run):
    """An index naming ``lnk/victim.txt`` for removal (the old key, and a journal that even knows the victim's
    identity), ``lnk`` a symlink out: nothing outside is touched."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("keep me")
    d = _sharded(tmp_path / "ckpt")
    (d / "lnk").symlink_to(outside)
    st = os.lstat(victim)
    doc = json.loads((d / "model.safetensors.index.json").read_text())
    doc["paramtool.unlink"] = ["lnk/victim.txt"]
    doc["paramtool.journal"] = {"unlink": {"lnk/victim.txt": [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]},
                                "created": {"lnk/victim.txt": [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]}}
    (d / "model.safetensors.index.json").write_text(json.dumps(doc))
    r = run("init", d, "--scheme", "zeros", "--in-place")
    assert victim.read_text() == "keep me"
    assert r.exit_code in (0, 1), r.stderr
    if r.exit_code == 0:
        assert torch.equal(load_file(str(d / "model-00001-of-00002.safetensors"))["a"], torch.zeros(2))


def test_weights_linked_out_of_a_model_directory_are_not_read(tmp_path, run):
    secret = tmp_path / "elsewhere.safetensors"
    save_file({"w": torch.ones(2)}, str(secret))
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors").symlink_to(secret)
    r = run("inspect", d)
    assert r.exit_code == 1 and "symlink" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr


@pytest.mark.parametrize("sidecar", ["config.json", ".metadata"])
def test_sidecars_linked_out_are_not_read(tmp_path, run, sidecar):
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    d = tmp_path / "model"
    d.mkdir()
    save_file({"w": torch.ones(2)}, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / sidecar).symlink_to(outside)
    r = run("inspect", d)
    assert r.exit_code == 1 and "symlink" in r.stderr, r.stderr


def test_hugging_face_snapshot_reads_through_links_but_never_writes_through_them(tmp_path, run):
    """models--org--name/snapshots/REV/model.safetensors -> ../../blobs/HASH: read; --in-place refused."""
    repo = tmp_path / "models--org--name"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    save_file({"w": torch.ones(2)}, str(blobs / "f00d"), metadata={"format": "pt"})
    (snap / "model.safetensors").symlink_to("../../blobs/f00d")
    (blobs / "c0de").write_text('{"model_type": "x"}')
    (snap / "config.json").symlink_to("../../blobs/c0de")
    before = (blobs / "f00d").read_bytes()
    r = run("inspect", snap, "--json")
    assert r.exit_code == 0, r.stderr
    assert [t["name"] for t in json.loads(r.stdout)["tensors"]] == ["w"]
    r = run("set", snap, "w = 0", "--in-place")
    assert r.exit_code == 1 and "symlink" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert (blobs / "f00d").read_bytes() == before and (snap / "model.safetensors").is_symlink()
    out = tmp_path / "out"
    r = run("set", snap, "w = 0", "-o", out)
    assert r.exit_code == 0, r.stderr
    assert (blobs / "f00d").read_bytes() == before


# --- names never drive the terminal -------------------------------------------------------------------------

HOSTILE_NAMES = [
    "[bold red]x[/bold red][link=https://evil.example]y[/link]",
    "ansi\x1b[31mred\x1b[0m",
    "osc8\x1b]8;;https://evil.example\x07click\x1b]8;;\x07",
    "bidi\u202etxt.exe",
    "isolate\u2066x\u2069",
    "c1\x9b31m",
]
RAW = ["ansi\x1b", "red\x1b[0m", "\x1b]8", "\x07", "\u202e", "\u2066", "\x9b"]  # (rich's own colours are allowed)


def test_hostile_names_are_escaped_by_every_renderer(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    tensors = {n: torch.full((2,), float(i)) for i, n in enumerate(HOSTILE_NAMES)}
    meta = {"format": "pt", "[link=https://evil.example]k[/link]": "\x1b]8;;https://evil.example\x07v"}
    save_file(tensors, str(a), metadata=meta)
    tensors[HOSTILE_NAMES[0]] = torch.full((2,), 9.0)
    del tensors[HOSTILE_NAMES[-1]]
    save_file(tensors, str(b), metadata=meta)
    env = {"FORCE_COLOR": "1", "TERM": "xterm-256color", "COLUMNS": "300"}
    runs = [("inspect", a), ("stats", a), ("ties", a, "--values"), ("diff", a, b),
            ("inspect", a, "--json"), ("stats", a, "--json"), ("diff", a, b, "--json"),
            ("show", a, "missing\x1b]8;;https://evil.example\x07"), ("show", a, HOSTILE_NAMES[0][:-2])]
    for args in runs:
        code, out, err, _, _ = measured(*args, env=env)
        assert code in (0, 1), (args, err)
        for raw in RAW:
            assert raw not in out and raw not in err, (args[0], raw, out[:400], err[:400])
        assert "\x1b]" not in out + err  # no OSC sequence at all: no hyperlinks, no titles
    _, out, _, _, _ = measured("stats", a, env=env)
    assert "[bold red]x[/bold red][link=https://evil.example]y[/link]" in out
    _, out, _, _, _ = measured("inspect", a, "--json")
    names = [t["name"] for t in json.loads(out)["tensors"]]
    assert sorted(names) == sorted(HOSTILE_NAMES)  # escaped on the wire, the same names once parsed


def test_dcp_entry_of_3000_huge_dimensions_is_refused_at_once(tmp_path):
    """A DCP ``.metadata`` whose entry states 3,000 dimensions of 2^62 (the size is multiplied as checked)."""
    import pickle
    import warnings

    import torch.distributed.checkpoint as dcp

    ck = tmp_path / "ck"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(2)}, checkpoint_id=str(ck))
    md = pickle.loads((ck / ".metadata").read_bytes())  # the test's own file, written by torch just now
    md.state_dict_metadata["w"].size = torch.Size([1 << 62] * 3000)
    (ck / ".metadata").write_bytes(pickle.dumps(md))
    code, out, err, cpu, _ = measured("inspect", ck, "--json")
    assert code == 1 and "more elements than torch can hold" in err and len(err.splitlines()) == 1, err
    assert cpu < CPU_SLACK


@pytest.mark.parametrize("linked", ["model-00002-of-00002.safetensors", "model.safetensors.index.json"])
def test_shard_or_index_linked_out_of_the_directory_is_not_read(tmp_path, run, linked):
    d = _sharded(tmp_path / "ckpt")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (d / linked).rename(outside / linked)
    (d / linked).symlink_to(outside / linked)
    r = run("inspect", d, "--json")
    assert r.exit_code == 1 and "symlink" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr


def test_hostile_keys_of_a_training_checkpoint_are_escaped(tmp_path):
    """Keys of nested entries and non-tensor values, not only tensor names."""
    path = tmp_path / "train.pt"
    torch.save({"model": {HOSTILE_NAMES[0]: torch.ones(2), HOSTILE_NAMES[2]: torch.zeros(2)},
                "epoch": 3, HOSTILE_NAMES[3]: HOSTILE_NAMES[1], "args": {HOSTILE_NAMES[4]: 1}}, path)
    env = {"FORCE_COLOR": "1", "TERM": "xterm-256color", "COLUMNS": "300"}
    for args in [("inspect", path), ("inspect", path, "--key", "args"), ("stats", path), ("ties", path),
                 ("inspect", path, "--json")]:
        code, out, err, _, _ = measured(*args, env=env)
        assert code in (0, 1), (args, err)
        for raw in RAW:
            assert raw not in out and raw not in err, (args, raw, out[:400], err[:400])
        assert "\x1b]" not in out + err

"""SIGKILL at every filesystem step of a write: the checkpoint is always all-old or all-new.

``PARAMTOOL_FAULT_AT=N`` makes paramtool kill itself (SIGKILL, no cleanup possible) just before its N-th
filesystem step (create, fsync, rename, exchange, link, unlink, remove). A clean run reports how many steps a
write takes (``PARAMTOOL_FAULT_COUNT``); the test then kills a fresh copy at each step 1..N in turn and reads
what is left with the libraries themselves (torch.load, safetensors, the index as transformers reads it, DCP).

Why a non-atomic implementation fails here:
- writing the target directly (no temporary + rename): a kill at the step after the file is created leaves it
  empty or partial, which torch.load / safetensors cannot read, or which holds neither state;
- sharded in place with one rename per shard: a kill between two shard renames leaves ``new, old`` shards,
  whose tensors match neither the old nor the new state (two shards change);
- a DCP directory swapped with two renames: a kill between them leaves no checkpoint directory at all;
- a temporary that the next write does not remove: the check after the next write finds it.
``seen == {"old", "new"}`` proves the kills landed on both sides of the commit point.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import warnings

import pytest
import torch
from fault_runner import Runner
from safetensors.torch import load_file, save_file

NAMES = ["a.weight", "b.weight", "c.weight"]
EDITS = ["a.weight[:] = 7", "c.weight[:] = 7"]  # in a sharded checkpoint: the first and the last shard


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    r = Runner(str(tmp_path_factory.mktemp("runner")))
    yield r
    r.close()


def build(kind: str, root) -> str:
    """The checkpoint to edit, under ``root``; returns its path."""
    g = torch.Generator().manual_seed(0)
    sd = {n: torch.randn(16, 16, generator=g) for n in NAMES}
    root.mkdir()
    if kind == "pt":
        torch.save({"model": sd, "epoch": 3}, root / "model.pt")
        return str(root / "model.pt")
    if kind == "safetensors":
        save_file(sd, str(root / "model.safetensors"), metadata={"format": "pt"})
        return str(root / "model.safetensors")
    ckpt = root / "ckpt"
    if kind == "sharded":
        ckpt.mkdir()
        weight_map = {}
        for i, name in enumerate(NAMES):
            shard = f"model-{i + 1:05d}-of-00003.safetensors"
            save_file({name: sd[name]}, str(ckpt / shard), metadata={"format": "pt"})
            weight_map[name] = shard
        index = {"metadata": {"total_size": 3 * 16 * 16 * 4}, "weight_map": weight_map}
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (ckpt / "config.json").write_text('{"model_type": "test"}\n')
        return str(ckpt)
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=str(ckpt))
    return str(ckpt)


def read_state(kind: str, path: str) -> dict:
    """The tensors as the libraries themselves read them (a reader that knows nothing of paramtool)."""
    if kind == "pt":
        return torch.load(path, weights_only=True)["model"]
    if kind == "safetensors":
        return load_file(path)
    if kind == "sharded":
        with open(os.path.join(path, "model.safetensors.index.json")) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: load_file(os.path.join(path, shard))[name] for name, shard in weight_map.items()}
    import torch.distributed.checkpoint as dcp

    state = {n: torch.empty(16, 16) for n in NAMES}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=path)
    return state


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def temporaries(root) -> list[str]:
    return [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files if ".paramtool-tmp" in n]


def listing(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, _, files in os.walk(root) for n in files)


@pytest.mark.parametrize("kind", ["pt", "safetensors", "sharded", "dcp"])
def test_sigkill_at_every_step_leaves_old_or_new(tmp_path, runner, kind):
    pristine_target = build(kind, tmp_path / "pristine")
    work = tmp_path / "work"
    target = pristine_target.replace(str(tmp_path / "pristine"), str(work))
    command = ["set", target, *EDITS, "--in-place"]

    def fresh() -> None:
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(tmp_path / "pristine", work)

    old = read_state(kind, pristine_target)
    fresh()
    count = tmp_path / "count"
    r = runner.run(*command, env={"PARAMTOOL_FAULT_COUNT": str(count)})
    assert r.exit == 0, r.stderr
    new = read_state(kind, target)
    assert not same(new, old) and torch.all(new["a.weight"] == 7) and torch.equal(new["b.weight"], old["b.weight"])
    clean_listing = listing(work)
    steps = int(count.read_text())
    assert steps >= {"pt": 3, "safetensors": 3, "sharded": 12, "dcp": 4}[kind]

    seen = set()
    for k in range(1, steps + 1):
        fresh()
        r = runner.run(*command, env={"PARAMTOOL_FAULT_AT": str(k)})
        assert r.signal == signal.SIGKILL, f"step {k}: not killed ({r.exit}, {r.stderr})"
        state = read_state(kind, target)  # readable at all: never half-written, never missing
        if same(state, old):
            seen.add("old")
        elif same(state, new):
            seen.add("new")
        else:
            pytest.fail(f"killed at step {k} of {steps}: the checkpoint is neither all-old nor all-new")
        # the next write into the directory removes what the killed one left, and completes
        r = runner.run(*command)
        assert r.exit == 0, f"step {k}: {r.stderr}"
        assert same(read_state(kind, target), new)
        assert temporaries(work) == [], f"step {k}"
        assert listing(work) == clean_listing, f"step {k}"
    assert seen == {"old", "new"}


SURGERY = {
    "rename": ["rename", "{ckpt}", "s/^b\\./bee./", "--in-place"],  # the index's names change
    "drop": ["drop", "{ckpt}", "--layer", "b.weight", "--in-place"],  # the middle shard disappears
}
NOOP = ["rename", "{ckpt}", "s/^nothing-matches//", "--in-place"]  # rewrites every shard, changes nothing


@pytest.mark.parametrize("command", sorted(SURGERY))
def test_sigkill_during_sharded_surgery_in_place_leaves_old_or_new(tmp_path, runner, command):
    """Surgery changes the index itself (names, shards, total_size): a kill at any step leaves the old
    checkpoint or the new one, index included, and the next write removes what the kill left (the dropped
    shard too) and ends in the same files as a clean run."""
    build("sharded", tmp_path / "pristine")
    work = tmp_path / "work"
    target = str(work / "ckpt")
    argv = [a.format(ckpt=target) for a in SURGERY[command]]
    noop = [a.format(ckpt=target) for a in NOOP]
    index_path = os.path.join(target, "model.safetensors.index.json")

    def fresh() -> None:
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(tmp_path / "pristine", work)

    def index() -> dict:
        with open(index_path) as f:
            return json.load(f)

    fresh()
    old, old_index = read_state("sharded", target), index()
    count = tmp_path / "count"
    r = runner.run(*argv, env={"PARAMTOOL_FAULT_COUNT": str(count)})
    assert r.exit == 0, r.stderr
    new, new_index = read_state("sharded", target), index()
    assert not same(new, old)
    if command == "rename":
        assert "bee.weight" in new and torch.equal(new["bee.weight"], old["b.weight"])
    else:
        assert sorted(new) == ["a.weight", "c.weight"]
        assert new_index["metadata"]["total_size"] == 2 * 16 * 16 * 4
    clean_listing = listing(work)
    assert ("model-00002-of-00003.safetensors" in " ".join(clean_listing)) == (command == "rename")
    steps = int(count.read_text())
    assert steps >= 10

    seen = set()
    for k in range(1, steps + 1):
        fresh()
        r = runner.run(*argv, env={"PARAMTOOL_FAULT_AT": str(k)})
        assert r.signal == signal.SIGKILL, f"step {k}: not killed ({r.exit}, {r.stderr})"
        state = read_state("sharded", target)
        if same(state, old):
            seen.add("old")
            assert index() == old_index, f"step {k}"
            r = runner.run(*argv)  # the write again, from the old checkpoint
        elif same(state, new):
            seen.add("new")
            r = runner.run(*noop)  # any next write into the directory finishes what the kill left
        else:
            pytest.fail(f"killed at step {k} of {steps}: the checkpoint is neither all-old nor all-new")
        assert r.exit == 0, f"step {k}: {r.stderr}"
        assert same(read_state("sharded", target), new)
        assert index() == new_index, f"step {k}"
        assert temporaries(work) == [], f"step {k}"
        assert listing(work) == clean_listing, f"step {k}"
    assert seen == {"old", "new"}

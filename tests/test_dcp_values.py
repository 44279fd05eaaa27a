"""DCP checkpoints' values read one entry at a time: ``stats``, ``diff``, ``show`` and ``ties --values`` give what
torch's own ``dcp.load`` gives, exactly what the whole-checkpoint load gave, and never hold the whole checkpoint."""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from paramtool import sources


class SplitRows(DefaultSavePlanner):
    """Every 2-D tensor of three rows or more saved as three row chunks, as FSDP ranks save their shards: a
    tensor split over several items, written by one process."""

    def create_local_plan(self):
        plan = super().create_local_plan()
        items = []
        for item in plan.items:
            data = item.tensor_data
            if item.type != WriteItemType.TENSOR or len(data.size) != 2 or data.size[0] < 3:
                items.append(item)
                continue
            rows = data.size[0]
            cuts = [0, rows // 3, rows // 2, rows]
            for a, b in zip(cuts, cuts[1:]):
                offsets, sizes = torch.Size([a, 0]), torch.Size([b - a, data.size[1]])
                chunk = ChunkStorageMetadata(offsets=offsets, sizes=sizes)
                items.append(WriteItem(index=MetadataIndex(item.index.fqn, offsets), type=WriteItemType.SHARD,
                                       tensor_data=TensorWriteData(chunk, data.properties, data.size)))
        self.plan = dataclasses.replace(plan, items=items)
        return self.plan

    def resolve_data(self, write_item):
        if write_item.type != WriteItemType.SHARD:
            return super().resolve_data(write_item)
        chunk = write_item.tensor_data.chunk
        return self.state_dict[write_item.index.fqn].narrow(0, chunk.offsets[0], chunk.sizes[0]).contiguous()


def save_dcp(state, path, planner=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... assuming a single process"
        dcp.save(state, checkpoint_id=str(path), planner=planner)


def load_dcp(path, like):
    """What torch reads back: ``dcp.load`` into a state shaped like ``like``."""
    state = _empty_like(like)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(path))
    return state


def _empty_like(obj):
    if isinstance(obj, torch.Tensor):
        return torch.full_like(obj, float("nan")) if obj.is_floating_point() else torch.zeros_like(obj)
    if isinstance(obj, dict):
        return {k: _empty_like(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_empty_like(v) for v in obj]
    return obj


def training_state(seed=0):
    """A training checkpoint: a model, AdamW's moments after one step, non-tensor entries (step, epoch,
    hyper-parameters, param_groups), a tensor with NaN and Inf, two tensors with equal bytes."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 5))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(3, 6)).sum().backward()
    opt.step()
    model = {k: v.detach().clone() for k, v in net.state_dict().items()}
    model["odd"] = torch.tensor([1.0, float("nan"), -float("inf"), 0.0, 2.5])
    model["copy"] = model["2.bias"].clone()  # equal bytes: a value tie
    model["steps"] = torch.arange(7, dtype=torch.int64)
    return {"model": model, "optimizer": opt.state_dict(), "step": 17, "epoch": 2,
            "hparams": {"lr": 1e-3, "name": "run-1"}}


@pytest.fixture
def loaded_path(monkeypatch):
    """Run the value commands the way they ran before: the whole checkpoint loaded first."""

    def use() -> None:
        monkeypatch.setattr(sources, "load_lazy", sources.load)

    return use


def outputs(run, *commands):
    return [(r.exit_code, r.stdout, r.stderr) for r in (run(*c) for c in commands)]


def _torch_stats(t):
    x = t.double().reshape(-1)
    return {"numel": x.numel(), "mean": x.mean().item(), "std": x.std().item() if x.numel() > 1 else math.nan,
            "min": x.min().item(), "max": x.max().item(), "norm": x.norm().item()}


def _number(v):
    return math.nan if v is None else float(v)  # JSON spells NaN and Inf as strings


def _close(a, b):
    a, b = _number(a), _number(b)
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-12)


def test_stats_are_torchs_numbers(tmp_path, run):
    state = training_state()
    save_dcp(state, tmp_path / "ck", SplitRows())
    chunks = FileSystemReader(str(tmp_path / "ck")).read_metadata().state_dict_metadata["model.0.weight"].chunks
    assert len(chunks) == 3  # a tensor split over three items
    ref = load_dcp(tmp_path / "ck", state)
    doc = run("stats", tmp_path / "ck", "--json").json()
    assert [t["name"] for t in doc["tensors"]] == list(ref["model"])
    for row in doc["tensors"]:
        want = _torch_stats(ref["model"][row["name"]])
        for field, value in want.items():
            assert _close(row[field], value), (row["name"], field, row[field], value)
    odd = next(t for t in doc["tensors"] if t["name"] == "odd")
    assert (odd["nan"], odd["inf"]) == (1, 1)
    moments = run("stats", tmp_path / "ck", "--key", "optimizer.state.0", "--json").json()["tensors"]
    by_name = {t["name"]: t for t in moments}
    assert set(by_name) == {"step", "exp_avg", "exp_avg_sq"}
    assert _close(by_name["exp_avg"]["norm"], ref["optimizer"]["state"][0]["exp_avg"].double().norm().item())


def test_show_is_torchs_tensor(tmp_path, run):
    state = training_state()
    save_dcp(state, tmp_path / "ck", SplitRows())
    ref = load_dcp(tmp_path / "ck", state)
    for name in ("0.weight", "2.weight", "2.bias", "steps"):
        r = run("show", tmp_path / "ck", name, "--json")
        assert r.exit_code == 0, r.stderr
        assert torch.equal(torch.tensor(r.json()["values"], dtype=ref["model"][name].dtype), ref["model"][name])
    r = run("show", tmp_path / "ck", "0.weight")
    torch.set_printoptions(profile="default")
    assert r.stdout == str(ref["model"]["0.weight"]) + "\n"


def test_same_output_as_the_whole_load(tmp_path, run, loaded_path):
    """Every value command gives byte for byte what it gave when the checkpoint was loaded whole."""
    state = training_state()
    save_dcp(state, tmp_path / "a", SplitRows())
    other = training_state()
    other["model"]["0.weight"][5, 3] += 0.5  # one changed element, in the second chunk
    del other["model"]["steps"]
    other["model"]["added"] = torch.ones(3)
    save_dcp(other, tmp_path / "b")
    save_file({k: v.contiguous() for k, v in state["model"].items()}, tmp_path / "a.safetensors")
    a, b, st = tmp_path / "a", tmp_path / "b", tmp_path / "a.safetensors"
    commands = [
        ("stats", a, "--json"), ("stats", a), ("stats", a, "--hist", "--bins", "5"), ("stats", a, "--layer", "0"),
        ("stats", a, "--key", "optimizer", "--json"), ("stats", a, "--key", "hparams", "--json"),
        ("show", a, "0.weight"), ("show", a, "odd", "--json"), ("show", a, "--key", "optimizer.state.1", "exp_avg"),
        ("show", a, "nothing"),
        ("diff", a, b, "--json"), ("diff", a, b), ("diff", a, b, "--atol", "0.1", "--json"),
        ("diff", a, st, "--json"), ("diff", st, a), ("diff", a, a, "--json"),
        ("ties", a, "--values", "--json"), ("ties", a, "--values"),
    ]
    streamed = outputs(run, *commands)
    loaded_path()
    loaded = outputs(run, *commands)
    for command, got, want in zip(commands, streamed, loaded):
        assert got == want, command
    assert '"copy"' in streamed[commands.index(("ties", a, "--values", "--json"))][1]  # the value tie is found
    assert streamed[commands.index(("diff", a, b, "--json"))][0] == 1
    assert streamed[commands.index(("show", a, "nothing"))][0] == 1


def test_hidden_tensors_and_key_into_values(tmp_path, run, loaded_path):
    """A tuple of tensors is one non-tensor DCP item (torch pickles it whole): its tensors are listed as the
    whole load listed them; ``--key`` resolves inside non-tensor entries the same way."""
    state = {"model": {"w": torch.randn(4, 3), "pair": (torch.ones(2), 5)}, "ints": [1, 2, 3], "step": 3,
             "mixed": [torch.zeros(2), 4]}
    save_dcp(state, tmp_path / "ck")
    commands = [("stats", tmp_path / "ck", "--json"), ("stats", tmp_path / "ck", "--key", "model.pair", "--json"),
                ("stats", tmp_path / "ck", "--key", "ints", "--json"), ("show", tmp_path / "ck", "model.pair.0"),
                ("stats", tmp_path / "ck", "--key", "mixed", "--json"), ("ties", tmp_path / "ck", "--values")]
    streamed = outputs(run, *commands)
    assert [t["name"] for t in run(*commands[0]).json()["tensors"]] == ["model.w", "model.pair.0", "mixed.0"]
    loaded_path()
    assert streamed == outputs(run, *commands)


def test_only_the_asked_entry_is_read(tmp_path, run, loaded_path):
    """``show`` reads one entry: another entry's damaged bytes do not matter (the whole load had to read
    them, and failed)."""
    save_dcp({"a": torch.arange(6.0), "b": torch.ones(1000)}, tmp_path / "ck")
    md = FileSystemReader(str(tmp_path / "ck")).read_metadata()
    info = next(v for k, v in md.storage_data.items() if k.fqn == "b")
    with open(tmp_path / "ck" / info.relative_path, "r+b") as f:
        f.seek(info.offset)
        f.write(b"\0" * info.length)  # no longer a zip
    r = run("show", tmp_path / "ck", "a", "--json")
    assert r.exit_code == 0 and r.json()["values"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    bad = run("stats", tmp_path / "ck", "--json")
    assert bad.exit_code == 1 and bad.stderr.startswith("error: ") and "'b'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    loaded_path()
    assert run("show", tmp_path / "ck", "a", "--json").exit_code == 1


def test_convert_reads_the_same_entries(tmp_path, run):
    """``convert`` streams through the same reader: a chunked tensor comes out as torch reads it."""
    state = {"w": torch.randn(9, 4), "b": torch.randn(4)}
    save_dcp(state, tmp_path / "ck", SplitRows())
    assert run("convert", tmp_path / "ck", tmp_path / "out.safetensors").exit_code == 0
    from safetensors.torch import load_file

    out = load_file(tmp_path / "out.safetensors")
    ref = load_dcp(tmp_path / "ck", state)
    assert out.keys() == ref.keys() and all(torch.equal(out[k], ref[k]) for k in ref)


PEAK = (
    "import resource, subprocess, sys\n"
    "r = subprocess.run([sys.executable, '-m', 'paramtool'] + sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "assert r.returncode == 0, r.returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
)


def _peak_rss(*args) -> int:
    """Peak RSS in bytes of ``paramtool ARGS``, run as the child of a fresh interpreter."""
    r = subprocess.run([sys.executable, "-c", PEAK, *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "PARAMTOOL_DEBUG": "1"})
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def test_stats_memory_stays_near_one_entry(tmp_path):
    """16 entries of 32 MiB (512 MiB): ``stats`` grows by far less than the checkpoint over the same command
    on a tiny checkpoint (the whole load grew by more than the checkpoint)."""
    mib = 1 << 20
    base = torch.arange(8 * mib, dtype=torch.float32)  # 32 MiB, saved under 16 names (16 items)
    save_dcp({f"layer{i}.weight": base for i in range(16)}, tmp_path / "big")
    save_dcp({"layer0.weight": torch.ones(4)}, tmp_path / "tiny")
    size = sum(f.stat().st_size for f in (tmp_path / "big").iterdir())
    assert size >= 512 * mib
    baseline = _peak_rss("stats", tmp_path / "tiny", "--json")
    peak = _peak_rss("stats", tmp_path / "big", "--json")
    assert peak - baseline < 0.4 * size, (peak - baseline) / mib

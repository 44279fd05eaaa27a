"""FSDP2 checkpoints as their users get them: ``get_state_dict(model, optim)`` saved with
``torch.distributed.checkpoint`` from 2 ranks (CPU, gloo, ``torchrun``), then edited by paramtool and loaded
back by 2 ranks into a fresh FSDP2 model and optimizer."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")

SCRIPT = textwrap.dedent('''
    import sys
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_state_dict)
    from torch.distributed.fsdp import fully_shard

    mode, directory, out = sys.argv[1], sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    if mode == "save":
        torch.manual_seed(1 + dist.get_rank())
        model(torch.randn(3, 4)).sum().backward()
        optim.step()
        msd, osd = get_state_dict(model, optim)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=directory)
    else:
        msd, osd = get_state_dict(model, optim)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=directory)
        set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(model, optim, options=full)
    if dist.get_rank() == 0:
        torch.save({"model": msd, "optim": osd}, out)
    dist.barrier()  # no rank tears gloo down while another still works (an intermittent C++ terminate)
    dist.destroy_process_group()
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, *args) -> None:
    """Run ``script`` on 2 CPU ranks; retried on a fresh port (a port taken between pick and bind, or gloo's
    intermittent abort on this 2-core machine): the test is about what paramtool wrote, not gloo."""
    for attempt in range(3):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               str(script), *map(str, args)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if p.returncode == 0:
            return
    raise AssertionError(f"torchrun failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    """A 2-rank FSDP2 DCP checkpoint (model + Adam state), and the full state the ranks saved it from."""
    base = tmp_path_factory.mktemp("fsdp")
    script = base / "fsdp.py"
    script.write_text(SCRIPT)
    torchrun(script, "save", base / "ck", base / "reference.pt")
    return script, base / "ck", torch.load(base / "reference.pt", weights_only=True)


@pytest.fixture
def ck(fsdp, tmp_path):
    """This test's own copy of the checkpoint."""
    shutil.copytree(fsdp[1], tmp_path / "ck")
    return tmp_path / "ck"


def single_load(directory, reference):
    """The whole DCP checkpoint read back by torch itself, in one process, shaped like ``reference``."""
    state = {"model": {k: torch.empty_like(v) for k, v in reference["model"].items()},
             "optim": {"state": {k: {m: torch.empty_like(t) for m, t in s.items()}
                                 for k, s in reference["optim"]["state"].items()},
                       "param_groups": [{k: None for k in g} for g in reference["optim"]["param_groups"]]}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(directory))
    return state


def assert_optim_equal(got, want):
    assert set(got["state"]) == set(want["state"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    for fqn, moments in want["state"].items():
        assert set(got["state"][fqn]) == {"step", "exp_avg", "exp_avg_sq"}
        for m, t in moments.items():
            assert torch.equal(got["state"][fqn][m], t), (fqn, m)
    assert got["param_groups"] == want["param_groups"]


def test_init_and_set_keep_optimizer_and_nesting(fsdp, ck, run, tmp_path):
    _, _, ref = fsdp
    r = run("set", ck, "0.bias = 1", "--in-place")
    assert r.exit_code == 0, r.stderr
    assert "optimizer state in 'optim'" in r.stderr and "0.bias" in r.stderr and "stale" in r.stderr
    r = run("init", ck, "--scheme", "zeros", "--layer", "2", "-o", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    for directory in (ck, tmp_path / "out"):
        got = single_load(directory, ref)
        assert_optim_equal(got["optim"], ref["optim"])
        assert torch.equal(got["model"]["0.bias"], torch.ones(8))
        assert torch.equal(got["model"]["0.weight"], ref["model"]["0.weight"])
    got = single_load(tmp_path / "out", ref)
    assert torch.count_nonzero(got["model"]["2.weight"]) == 0 and torch.equal(got["model"]["2.bias"], ref["model"]["2.bias"])
    doc = run("inspect", tmp_path / "out", "--key", "optim", "--json").json()
    assert doc["num_tensors"] == 12
    assert run("inspect", tmp_path / "out", "--key", "optim.param_groups", "--json").json()["values"][0]["lr"] == 1e-3


def test_two_ranks_load_the_edited_checkpoint(fsdp, ck, run, tmp_path):
    script, _, ref = fsdp
    r = run("set", ck, "2.weight[0, 0] = 42", "0.bias[:] += 0.5", "-o", tmp_path / "edited")
    assert r.exit_code == 0, r.stderr
    torchrun(script, "load", tmp_path / "edited", tmp_path / "loaded.pt")
    loaded = torch.load(tmp_path / "loaded.pt", weights_only=True)
    want = {k: v.clone() for k, v in ref["model"].items()}
    want["2.weight"][0, 0] = 42
    want["0.bias"] += 0.5
    assert set(loaded["model"]) == set(want)
    for name, t in want.items():
        assert torch.equal(loaded["model"][name], t), name
    assert_optim_equal(loaded["optim"], ref["optim"])


def test_convert_to_one_pt_keeps_everything(fsdp, ck, run, tmp_path):
    _, _, ref = fsdp
    r = run("convert", ck, "-o", tmp_path / "full.pt")
    assert r.exit_code == 0, r.stderr
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    assert set(full) == {"model", "optim"}
    for name, t in ref["model"].items():
        assert torch.equal(full["model"][name], t)
    assert sum(1 for s in full["optim"]["state"].values() for _ in s) == 12
    assert_optim_equal(full["optim"], ref["optim"])
    assert run("diff", ck, tmp_path / "full.pt").exit_code == 0
    # --key model: the model's own state dict, as load_state_dict takes it
    assert run("convert", ck, "--key", "model", "-o", tmp_path / "model.pt").exit_code == 0
    sd = torch.load(tmp_path / "model.pt", weights_only=True)
    assert list(sd) == list(ref["model"]) and all(torch.equal(sd[k], v) for k, v in ref["model"].items())
    assert run("convert", ck, "--key", "model", "-o", tmp_path / "model_dcp").exit_code == 0  # a DCP of the sub-tree
    doc = run("inspect", tmp_path / "model_dcp", "--json").json()
    assert [t["name"] for t in doc["tensors"]] == list(ref["model"]) and "optim" not in doc.get("extras", {})
    # safetensors cannot hold the optimizer's non-tensor entries: never dropped silently
    r = run("convert", ck, "-o", tmp_path / "m.safetensors")
    assert r.exit_code == 1 and "--drop-extra" in r.stderr and "optim" in r.stderr
    assert not (tmp_path / "m.safetensors").exists()
    assert run("convert", ck, "--drop-extra", "-o", tmp_path / "m.safetensors").exit_code == 0
    assert run("diff", tmp_path / "model.pt", tmp_path / "m.safetensors").exit_code == 0


def test_truncated_dcp_is_one_error_line(ck, run, tmp_path):
    for data in ck.glob("*.distcp"):
        data.write_bytes(data.read_bytes()[:-64])  # truncated data files: paramtool's DCP reader refuses them
    for args in (["init", "--scheme", "ones", "-o", tmp_path / "out"], ["stats"], ["convert", "-o", tmp_path / "f.pt"]):
        r = run(args[0], ck, *args[1:])
        assert r.exit_code == 1, (args, r.stderr)
        lines = r.stderr.splitlines()
        assert [line for line in lines if not line.startswith("warning:")] == lines[-1:], r.stderr
        assert lines[-1].startswith("error:") and "truncated" in lines[-1] and ".distcp" in lines[-1], r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "f.pt").exists()


def test_any_base_exception_is_one_error_line(tmp_path, run):
    """torch raises BaseException subclasses (CheckpointException); whatever raises one, the CLI prints one line."""
    (tmp_path / "factory.py").write_text(
        "class Boom(BaseException):\n    pass\n\ndef make():\n    raise Boom('line one\\nline two')\n")
    r = run("inspect", f"{tmp_path / 'factory.py'}:make")
    assert r.exit_code == 1 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
    assert "Boom" in r.stderr and "line one" in r.stderr

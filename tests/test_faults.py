"""Nothing is lost under any fault: disk full, injected write errors, interrupts, closed pipes, device targets,
owners, modes and directory errors. (SIGKILL at every step is tests/test_kill.py.)"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import signal
import stat
import subprocess
import sys
import time
import warnings

import pytest
import torch
from fault_runner import Runner
from safetensors.torch import save_file
from test_kill import NAMES, build, read_state, same, temporaries


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    r = Runner(str(tmp_path_factory.mktemp("runner")))
    yield r
    r.close()


def snapshot(root) -> dict[str, str]:
    """Every file under ``root`` (or the file itself) by content hash: "byte-identical" made checkable."""
    root = pathlib.Path(root)
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(stderr: str, *words: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr and "terminate called" not in stderr
    for w in words:
        assert w in lines[0], stderr


# --- disk full, on a real small filesystem -------------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs; skipped where this process may not mount one."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); ENOSPC is injected below")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def big_state(n: int = 6) -> dict:
    """About 1.5 MiB: fits once on the 2 MiB filesystem, never twice."""
    g = torch.Generator().manual_seed(1)
    return {f"l{i}.weight": torch.randn(256, 256, generator=g) for i in range(n)}


def make_on(fs, kind: str) -> str:
    sd = big_state()
    if kind in ("pt", "train"):
        path = fs / "model.pt"
        torch.save(sd if kind == "pt" else {"model": sd, "epoch": 3, "optimizer": {"lr": 0.1}}, path)
        return str(path)
    if kind == "safetensors":
        save_file(sd, str(fs / "model.safetensors"), metadata={"format": "pt"})
        return str(fs / "model.safetensors")
    ckpt = fs / "ckpt"
    if kind == "sharded":
        ckpt.mkdir()
        names, weight_map = list(sd), {}
        for i in range(3):
            shard = f"model-{i + 1:05d}-of-00003.safetensors"
            save_file({n: sd[n] for n in names[2 * i:2 * i + 2]}, str(ckpt / shard), metadata={"format": "pt"})
            weight_map.update({n: shard for n in names[2 * i:2 * i + 2]})
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        return str(ckpt)
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=str(ckpt))
    return str(ckpt)


@pytest.mark.parametrize("kind", ["pt", "train", "safetensors", "sharded", "dcp"])
@pytest.mark.parametrize("command", ["init", "set"])
def test_disk_full_in_place(small_fs, runner, kind, command):
    target = make_on(small_fs, kind)
    before = snapshot(target)
    edit = ["--scheme", "normal", "--seed", "1"] if command == "init" else [f"l{i}.weight[:] = 1" for i in range(6)]
    r = runner.run(command, target, *edit, "--in-place")
    assert r.exit == 1
    one_error_line(r.stderr, "No space left on device", os.path.basename(target))
    assert snapshot(target) == before
    assert temporaries(small_fs) == []


@pytest.mark.parametrize("kind,out", [("pt", "new.pt"), ("pt", "new.safetensors"), ("safetensors", "new.pt"),
                                      ("sharded", "outdir"), ("dcp", "outdir")])
def test_disk_full_new_output(small_fs, runner, kind, out):
    source = make_on(small_fs, kind)
    before = snapshot(small_fs)
    r = runner.run("convert", source, small_fs / out)
    assert r.exit == 1
    one_error_line(r.stderr, "No space left on device")
    assert snapshot(small_fs) == before and not (small_fs / out).exists()
    assert temporaries(small_fs) == []


def test_disk_full_existing_output_kept(small_fs, runner, tmp_path):
    source = tmp_path / "src.pt"
    torch.save(big_state(), source)
    target = small_fs / "old.pt"
    torch.save(big_state(4), target)  # 1 MiB: room for the old file, not for a new one beside it
    before = snapshot(target)
    r = runner.run("init", source, "--scheme", "zeros", "-o", target)
    assert r.exit == 1
    one_error_line(r.stderr, "No space left on device", "old.pt")
    assert snapshot(target) == before and temporaries(small_fs) == []


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_disk_full_tmpdir_for_stdout(small_fs, runner, tmp_path, fmt):
    source = tmp_path / "src.pt"
    torch.save(big_state(), source)
    (small_fs / "filler").write_bytes(b"\0" * (1 << 20))
    r = runner.run("convert", source, "--format", fmt, env={"TMPDIR": str(small_fs)})
    assert r.exit == 1 and r.stdout == b""
    one_error_line(r.stderr, "No space left on device")
    assert temporaries(small_fs) == []


# --- injected write errors at every step ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["pt", "safetensors", "sharded", "dcp"])
def test_enospc_at_every_step(tmp_path, runner, kind):
    """ENOSPC at each filesystem step: before the commit, one error line and the target byte for byte as it
    was; at a step after the commit (cleanup), success and the new checkpoint. Never a temporary left behind
    by a failed write."""
    pristine = build(kind, tmp_path / "pristine")
    target = str(tmp_path / "work" / os.path.relpath(pristine, tmp_path / "pristine"))
    command = ["set", target, "a.weight[:] = 7", "c.weight[:] = 7", "--in-place"]

    def fresh() -> None:
        subprocess.run(["rm", "-rf", str(tmp_path / "work")], check=True)
        subprocess.run(["cp", "-a", str(tmp_path / "pristine"), str(tmp_path / "work")], check=True)

    fresh()
    count = tmp_path / "count"
    assert runner.run(*command, env={"PARAMTOOL_FAULT_COUNT": str(count)}).exit == 0
    new = read_state(kind, target)
    original = snapshot(pristine)
    failures = 0
    for k in range(1, int(count.read_text()) + 1):
        fresh()
        r = runner.run(*command, env={"PARAMTOOL_FAULT_AT": str(k), "PARAMTOOL_FAULT": "enospc"})
        if r.exit == 1:
            failures += 1
            one_error_line(r.stderr, "No space left on device")
            assert snapshot(target) == original, f"step {k}"
            assert temporaries(tmp_path / "work") == [], f"step {k}"
        else:
            assert r.exit == 0, f"step {k}: {r.stderr}"
            assert same(read_state(kind, target), new), f"step {k}"
    assert failures >= 3


# --- interrupts ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,sig", [("pt", "int"), ("sharded", "term"), ("dcp", "int")])
def test_interrupt_during_write(tmp_path, runner, kind, sig):
    """SIGINT / SIGTERM arriving at each step: one ``error: interrupted`` line and 130 / 143 with the target
    untouched and no temporary; or, inside the commit, held until it is done (the checkpoint is new)."""
    pristine = build(kind, tmp_path / "pristine")
    target = str(tmp_path / "work" / os.path.relpath(pristine, tmp_path / "pristine"))
    command = ["set", target, "a.weight[:] = 7", "c.weight[:] = 7", "--in-place"]
    fresh = lambda: (subprocess.run(["rm", "-rf", str(tmp_path / "work")], check=True),  # noqa: E731
                     subprocess.run(["cp", "-a", str(tmp_path / "pristine"), str(tmp_path / "work")], check=True))
    fresh()
    count = tmp_path / "count"
    assert runner.run(*command, env={"PARAMTOOL_FAULT_COUNT": str(count)}).exit == 0
    new = read_state(kind, target)
    code = {"int": 130, "term": 143}[sig]
    interrupted = 0
    for k in range(1, int(count.read_text()) + 1):
        fresh()
        r = runner.run(*command, env={"PARAMTOOL_FAULT_AT": str(k), "PARAMTOOL_FAULT": sig})
        assert r.exit == code, f"step {k}: {r}"
        assert r.stderr == "error: interrupted\n"
        assert temporaries(tmp_path / "work") == [], f"step {k}"
        state = read_state(kind, target)
        if snapshot(target) == snapshot(pristine):
            interrupted += 1
        else:
            assert same(state, new), f"step {k}: interrupted inside the commit, yet not all-new"
    assert interrupted >= 2


def test_sigterm_from_outside_removes_temporary(tmp_path):
    """A real SIGTERM from another process while a big file is being written."""
    g = torch.Generator().manual_seed(0)
    target = tmp_path / "big.pt"
    torch.save({f"l{i}": torch.randn(512, 512, generator=g) for i in range(32)}, target)  # 32 MiB
    before = snapshot(target)
    p = subprocess.Popen([sys.executable, "-m", "paramtool", "init", str(target), "--scheme", "normal",
                          "--param", "all", "--untie", "--in-place"], stderr=subprocess.PIPE)
    while p.poll() is None and not temporaries(tmp_path):  # wait for the write to have begun
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate()
    if p.returncode == 0:
        pytest.skip("the write finished before the signal arrived")
    assert p.returncode == 143 and err == b"error: interrupted\n"
    assert snapshot(target) == before and temporaries(tmp_path) == []


# --- closed pipes ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def many_tensors(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "many.pt"
    torch.save({f"layer.{i}.weight": torch.randn(2, 2) for i in range(3000)} | {"big": torch.randn(400, 400)}, path)
    return path


@pytest.mark.parametrize("args", [["inspect", "--json"], ["inspect", "--expand"], ["stats", "--json"],
                                  ["show", "big", "--json"], ["convert", "--format", "safetensors"],
                                  ["set", "big[0, 0] = 1"]])
def test_closed_pipe_exits_141_quietly(many_tensors, runner, tmp_path, args):
    """More output than a pipe holds (64 KiB), and a reader that stops after 10 bytes, as ``| head -c 10``."""
    r = runner.run(args[0], many_tensors, *args[1:], pipe=10, env={"TMPDIR": str(tmp_path)})
    assert len(r.stdout) == 10
    assert r.exit == 141 and r.stderr == ""
    assert temporaries(many_tensors.parent) == [] and os.listdir(tmp_path) == []  # the checkpoint's temporary too


def test_closed_pipe_through_shell(many_tensors):
    r = subprocess.run(["bash", "-c", f'{sys.executable} -m paramtool inspect --json "$0" | head -c 10 >/dev/null; '
                        'echo "${PIPESTATUS[0]}"', str(many_tensors)], capture_output=True, text=True)
    assert r.stdout.strip() == "141" and r.stderr == ""


def test_closed_pipe_from_stdin_to_stdout_leaves_no_temporary(many_tensors, tmp_path):
    """Both temporaries in $TMPDIR (stdin spooled, the checkpoint made for stdout) go when the pipe closes."""
    script = f'{sys.executable} -m paramtool convert - --format safetensors < "$0" | head -c 10 >/dev/null; ' \
             'echo "${PIPESTATUS[0]}"'
    r = subprocess.run(["bash", "-c", script, str(many_tensors)], capture_output=True, text=True,
                       env={**os.environ, "TMPDIR": str(tmp_path)})
    assert r.stdout.strip() == "141" and r.stderr == ""
    assert os.listdir(tmp_path) == []


# --- targets that are not regular files ------------------------------------------------------------------------

def small_checkpoint(path) -> None:
    torch.save({"w": torch.ones(3, 3)}, path)


@pytest.mark.parametrize("target", ["/dev/null", "/dev/stdout", "fifo", "proc-link"])
def test_non_regular_target_is_written_into(tmp_path, runner, target):
    source = tmp_path / "m.pt"
    small_checkpoint(source)
    if target == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)
        reader = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE)
    elif target == "proc-link":
        path = tmp_path / "out"
        os.symlink("/proc/self/fd/1", path)
    else:
        path = pathlib.Path(target)
    kind = os.lstat(path).st_mode
    r = runner.run("init", source, "--scheme", "zeros", "--param", "all", "-o", path, pipe=-1)
    assert r.exit == 0, r.stderr
    assert os.lstat(path).st_mode == kind  # still the device / FIFO / link: never replaced
    data = reader.communicate()[0] if target == "fifo" else r.stdout
    if target != "/dev/null":
        out = tmp_path / "got.pt"
        out.write_bytes(data)
        assert torch.equal(torch.load(out, weights_only=True)["w"], torch.zeros(3, 3))


def test_in_place_through_symlink_keeps_the_link(tmp_path, runner):
    real = tmp_path / "real.pt"
    small_checkpoint(real)
    link = tmp_path / "link.pt"
    os.symlink("real.pt", link)
    r = runner.run("set", link, "w[0, 0] = 5", "--in-place")
    assert r.exit == 0, r.stderr
    assert os.readlink(link) == "real.pt"
    assert torch.load(real, weights_only=True)["w"][0, 0] == 5
    assert temporaries(tmp_path) == []


def test_in_place_through_a_directory_symlink_keeps_the_link(tmp_path, runner):
    real = build("dcp", tmp_path / "real")
    link = tmp_path / "link"
    os.symlink(real, link)
    r = runner.run("set", link, "a.weight[:] = 3", "--in-place")
    assert r.exit == 0, r.stderr
    assert os.readlink(link) == real
    assert torch.all(read_state("dcp", real)["a.weight"] == 3)
    assert temporaries(tmp_path) == []


def test_sharded_in_place_with_symlinked_shards(tmp_path, runner):
    """A Hugging Face cache snapshot (models--org--name/snapshots/REV): the shards are links to the blobs
    beside it, which are left as they were."""
    repo = tmp_path / "models--org--name"
    repo.mkdir()
    ckpt = pathlib.Path(build("sharded", repo / "snapshots"))
    blobs = repo / "blobs"
    blobs.mkdir()
    for shard in ckpt.glob("model-*.safetensors"):
        shard.rename(blobs / shard.name)
        shard.symlink_to(blobs / shard.name)
    before = snapshot(blobs)
    r = runner.run("set", ckpt, "a.weight[:] = 3", "--in-place")
    assert r.exit == 0, r.stderr
    assert torch.all(read_state("sharded", str(ckpt))["a.weight"] == 3)
    assert snapshot(blobs) == before and temporaries(tmp_path) == []


def test_dcp_in_place_keeps_other_files(tmp_path, runner):
    ckpt = pathlib.Path(build("dcp", tmp_path / "c"))
    (ckpt / "notes.txt").write_text("run 12\n")
    (ckpt / "extra").mkdir()
    (ckpt / "extra" / "config.yaml").write_text("lr: 0.1\n")
    r = runner.run("set", ckpt, "a.weight[:] = 3", "--in-place")
    assert r.exit == 0, r.stderr
    assert (ckpt / "notes.txt").read_text() == "run 12\n"
    assert (ckpt / "extra" / "config.yaml").read_text() == "lr: 0.1\n"
    assert torch.all(read_state("dcp", str(ckpt))["a.weight"] == 3)


# --- owner, group, mode ------------------------------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another owner needs root")
@pytest.mark.parametrize("kind", ["pt", "safetensors", "sharded", "dcp"])
def test_in_place_keeps_owner_group_and_mode(tmp_path, runner, kind):
    target = build(kind, tmp_path / "c")
    paths = [pathlib.Path(target)] + (list(pathlib.Path(target).rglob("*")) if os.path.isdir(target) else [])
    for p in paths:
        os.chown(p, 1000, 1001)
        os.chmod(p, 0o750 if p.is_dir() else 0o640)
    r = runner.run("set", target, "a.weight[:] = 7", "--in-place")
    assert r.exit == 0, r.stderr
    for p in [pathlib.Path(target)] + (list(pathlib.Path(target).rglob("*")) if os.path.isdir(target) else []):
        st = os.stat(p)
        assert (st.st_uid, st.st_gid) == (1000, 1001), p
        assert stat.S_IMODE(st.st_mode) == (0o750 if p.is_dir() else 0o640), p


@pytest.mark.parametrize("kind", ["sharded", "dcp"])
def test_new_directories_follow_the_umask(tmp_path, runner, kind):
    source = build(kind, tmp_path / "c")
    r = runner.run("init", source, "--scheme", "zeros", "--param", "all", "-o", tmp_path / "out")
    assert r.exit == 0, r.stderr
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == 0o777 & ~umask
    assert read_state(kind, str(tmp_path / "out")).keys() == set(NAMES)


# --- directory output errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["missing-parent", "is-a-file", "read-only-parent"])
@pytest.mark.parametrize("kind", ["sharded", "dcp"])
def test_directory_output_errors_are_one_line(tmp_path, runner, kind, case):
    source = build(kind, tmp_path / "c")
    if case == "missing-parent":
        out, words = tmp_path / "no" / "such" / "out", ["does not exist"]
    elif case == "is-a-file":
        out, words = tmp_path / "afile", ["not a directory"]
        out.write_text("x")
    else:
        parent = tmp_path / "ro"
        parent.mkdir()
        if os.geteuid() == 0:  # root ignores modes: a read-only bind mount is the read-only parent
            mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(parent), str(parent)], capture_output=True)
            if mounted.returncode != 0:
                pytest.skip("cannot make a read-only directory as root here")
        else:
            parent.chmod(0o555)
        out, words = parent / "out", ["Read-only file system" if os.geteuid() == 0 else "Permission denied"]
    try:
        r = runner.run("init", source, "--scheme", "zeros", "--param", "all", "-o", out)
    finally:
        if case == "read-only-parent" and os.geteuid() == 0:
            subprocess.run(["umount", str(tmp_path / "ro")], check=False)
    assert r.exit == 1
    one_error_line(r.stderr, *words)
    assert temporaries(tmp_path) == []


# --- a full output stream ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["inspect", "--json"], ["convert", "--format", "safetensors"]])
def test_stdout_on_a_full_device(many_tensors, args):
    with open("/dev/full", "wb") as full:
        r = subprocess.run([sys.executable, "-m", "paramtool", args[0], str(many_tensors), *args[1:]], stdout=full,
                           stderr=subprocess.PIPE, text=True)
    assert r.returncode == 1
    one_error_line(r.stderr, "No space left on device")


def test_output_to_a_full_device(tmp_path, runner):
    source = tmp_path / "m.pt"
    small_checkpoint(source)
    r = runner.run("init", source, "--scheme", "zeros", "--param", "all", "-o", "/dev/full")
    assert r.exit == 1
    one_error_line(r.stderr, "cannot write /dev/full: No space left on device")
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)

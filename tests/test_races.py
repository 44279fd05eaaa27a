"""The world moving while paramtool works: inputs truncated, replaced or rewritten during a command, two
writers of one target at once, readers during a commit.

Every run is a real ``python -m paramtool`` process; the other side is this test process (or a second
paramtool process), acting on a real progress signal: the input appearing among the command's open files or
mappings (``/proc/PID/fd``, ``/proc/PID/maps``), or the "waiting" line of a writer blocked on the lock. What
is asserted is what a user may see: exit 0 with a checkpoint that is wholly one version, or exit 1 with one
``error:`` line, and nothing written; never a signal (SIGBUS), never a mixture, never a lost edit.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from fault_runner import Runner
from test_kill import NAMES, build, read_state

CHANGED = "changed while being read"


@pytest.fixture(scope="module")
def runners(tmp_path_factory):
    """Three CLI servers (``fault_runner``): up to three paramtool processes at once, each started in
    milliseconds (torch is imported once per server), each a real process with the CLI's own signal handling."""
    rs = [Runner(str(tmp_path_factory.mktemp(f"runner{i}"))) for i in range(3)]
    yield rs
    for r in rs:
        r.close()


class Running:
    """``runner.run(*argv)`` on a thread of its own: ``pid()`` once the process has started, ``result()``."""

    def __init__(self, runner: Runner, *argv: object) -> None:
        self.pidfile = os.path.join(runner.workdir, "pid")
        self.stderr_path = os.path.join(runner.workdir, "run.stderr")
        if os.path.exists(self.pidfile):
            os.unlink(self.pidfile)
        self.outcome = None
        self.thread = threading.Thread(target=self._run, args=(runner, argv))
        self.thread.start()

    def _run(self, runner: Runner, argv: tuple) -> None:
        self.outcome = runner.run(*argv, pidfile=self.pidfile)

    def pid(self) -> int:
        while not os.path.exists(self.pidfile):
            time.sleep(0.0005)
        with open(self.pidfile) as f:
            return int(f.read())

    def stderr(self) -> str:
        """What the process has written on stderr so far."""
        try:
            with open(self.stderr_path) as f:
                return f.read()
        except FileNotFoundError:  # (not yet created by the child)
            return ""

    def done(self) -> bool:
        return not self.thread.is_alive()

    def result(self):
        self.thread.join(120)
        assert self.outcome is not None
        assert self.outcome.signal is None, f"killed by signal {self.outcome.signal}: {self.outcome.stderr}"
        return self.outcome


def one_error_line(err: str, *words: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], err


def _holds(pid: int, path: str, table: str, count: int) -> bool:
    real = os.path.realpath(path)
    try:
        if table == "maps":
            with open(f"/proc/{pid}/maps") as f:
                return any(line.rstrip().endswith(real) for line in f)
        return sum(os.readlink(f"/proc/{pid}/fd/{fd}") == real for fd in os.listdir(f"/proc/{pid}/fd")) >= count
    except OSError:
        return False


def wait_until(run, path: str, table: str = "fd", timeout: float = 60, count: int = 1) -> bool:
    """Wait until ``run`` (a ``Running`` or a ``subprocess.Popen``) has ``path`` open (``fd``; ``count``
    times: an in-place write holds the target's lock first, then reads it) or mapped (``maps``); False if it
    ended first."""
    pid = run.pid() if isinstance(run, Running) else run.pid
    done = run.done if isinstance(run, Running) else (lambda: run.poll() is not None)
    end = time.monotonic() + timeout
    while time.monotonic() < end and not done():
        if _holds(pid, path, table, count):
            return True
        time.sleep(0.0005)
    return False


def big_safetensors(path, mib: int = 96) -> None:
    n = mib << 18  # float32 values
    save_file({"big": torch.linspace(-1, 1, n), "small": torch.ones(8)}, str(path), metadata={"format": "pt"})


# -- 1. an input truncated while mapped: one error line, never SIGBUS ------------------------------------------

@pytest.mark.parametrize("how", ["truncated", "rewritten"])
@pytest.mark.parametrize("command", ["stats", "diff"])
def test_input_changed_while_mapped_is_one_error_line(tmp_path, command, how):
    """``stats``/``diff --json`` through the console entry point (``launch.py``'s fast path), which reads values
    through mappings; once the process has mapped the file, it is cut to a third (pages past the new end
    fault: SIGBUS) or overwritten in place with other values (the numbers would mix two files)."""
    src, other = tmp_path / "in.safetensors", tmp_path / "other.safetensors"
    hit = 0
    for _ in range(8):
        big_safetensors(src)
        args = ["stats", src, "--json"] if command == "stats" else ["diff", other, src, "--json"]
        if command == "diff":
            shutil.copyfile(src, other)
        proc = subprocess.Popen([sys.executable, "-m", "paramtool", *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        mapped = wait_until(proc, src, "maps")
        if mapped and how == "truncated":
            os.truncate(src, os.path.getsize(src) // 3)
        elif mapped:
            with open(src, "r+b") as f:
                f.seek(os.path.getsize(src) // 2)
                f.write(b"\x7f" * (1 << 20))
        out, err = proc.communicate(timeout=120)
        assert proc.returncode >= 0, f"killed by signal {-proc.returncode}: {err}"  # never SIGBUS
        if mapped and proc.returncode == (1 if command == "stats" else 2) and CHANGED in err:
            one_error_line(err, str(src), how)
            assert out == ""
            hit += 1
            if hit == 2:
                break
        else:  # read whole before the cut: a complete answer
            assert "Traceback" not in err and "error" not in err, err
    assert hit, "the truncation never landed while the file was being read"


# -- 2. an input replaced or rewritten during a write: one version or an error, nothing mixed -----------------

def _state(n: int, value: float) -> dict:
    return {f"layer{i}.weight": torch.full((256, 256), value + i) for i in range(n)}


def _version(sd: dict, old: dict, new: dict, edited: set[str]) -> str | None:
    """Which version the untouched tensors of ``sd`` come from: "old", "new", or None (a mixture)."""
    rest = [k for k in old if k not in edited]
    if all(torch.equal(sd[k], old[k]) for k in rest):
        return "old"
    if all(torch.equal(sd[k], new[k]) for k in rest):
        return "new"
    return None


def _formats(fmt: str):
    if fmt == "pt":
        return (lambda sd, p: torch.save(sd, str(p))), (lambda p: torch.load(str(p), weights_only=True))
    return (lambda sd, p: save_file(sd, str(p), metadata={"format": "pt"})), (lambda p: load_file(str(p)))


@pytest.mark.parametrize("how", ["replace", "rewrite"])
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_input_changed_during_set_gives_one_version_or_an_error(tmp_path, runners, how, fmt):
    """The input is replaced by rename (as careful tools update a file) or overwritten in place once
    ``set -o`` has it open: the output is the edit of one version (the untouched tensors all old or all
    new), or there is one error line and no output."""
    src, out = tmp_path / f"in.{fmt}", tmp_path / f"out.{fmt}"
    save, load = _formats(fmt)
    old, new = _state(48, 0.0), _state(48, 1000.0)
    save(new, tmp_path / f"new.{fmt}")
    new_bytes = (tmp_path / f"new.{fmt}").read_bytes()
    outcomes = set()
    for _ in range(6):
        save(old, src)
        out.unlink(missing_ok=True)
        run = Running(runners[0], "set", src, "layer0.weight[0, 0] = 42", "layer47.weight[:] += 1", "-o", out)
        if wait_until(run, src):
            if how == "replace":
                shutil.copyfile(tmp_path / f"new.{fmt}", tmp_path / "staged")
                os.replace(tmp_path / "staged", src)
            else:
                with open(src, "r+b") as f:
                    f.write(new_bytes)
        r = run.result()
        if r.exit == 0:
            got = load(out)
            which = _version(got, old, new, {"layer0.weight", "layer47.weight"})
            assert which is not None, "an output mixing two versions of the input"
            base = old if which == "old" else new
            assert got["layer0.weight"][0, 0] == 42 and torch.equal(got["layer47.weight"], base["layer47.weight"] + 1)
            outcomes.add(which)
        else:
            one_error_line(r.stderr, CHANGED)
            assert not out.exists(), "an output written from an input that changed"
            assert not [p for p in os.listdir(tmp_path) if ".paramtool-tmp" in p]
            outcomes.add("error")
        if outcomes & {"error", "new"}:
            break
    assert outcomes & {"error", "new"}, "the input never changed while it was read"


@pytest.mark.parametrize("out_name", ["out.safetensors", "out.pt"])
def test_convert_of_an_input_rewritten_in_place(tmp_path, runners, out_name):
    src, out = tmp_path / "in.pt", tmp_path / out_name
    old, new = _state(48, 0.0), _state(48, 1000.0)
    torch.save(new, str(tmp_path / "new.pt"))
    new_bytes = (tmp_path / "new.pt").read_bytes()
    _, load = _formats("pt" if out_name.endswith(".pt") else "safetensors")
    for _ in range(3):
        torch.save(old, str(src))
        out.unlink(missing_ok=True)
        run = Running(runners[0], "convert", src, out)
        if wait_until(run, src):
            with open(src, "r+b") as f:
                f.write(new_bytes)
        r = run.result()
        if r.exit == 0:
            assert _version(load(out), old, new, set()) is not None, "a conversion mixing two versions"
        else:
            one_error_line(r.stderr, CHANGED)
            assert not out.exists()


def test_input_truncated_during_init_in_place(tmp_path, runners):
    """Cut to half once ``init --in-place`` holds it: done before the cut (exit 0), or one error line naming
    the file (a change seen while reading it, or a file already short when it was first read), and the
    temporary removed."""
    src = tmp_path / "in.safetensors"
    old = _state(48, 0.0)
    for _ in range(3):
        save_file(old, str(src), metadata={"format": "pt"})
        run = Running(runners[0], "init", src, "--scheme", "zeros", "--layer", "layer0", "--in-place")
        if wait_until(run, src, count=2):
            os.truncate(src, os.path.getsize(src) // 2)
        r = run.result()
        if r.exit != 0:
            one_error_line(r.stderr, str(src))
        assert not [p for p in os.listdir(tmp_path) if ".paramtool-tmp" in p]


# -- 3. two writers of one target ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["safetensors", "sharded"])
def test_a_second_writer_waits_then_reads_what_the_first_committed(tmp_path, runners, kind):
    """Deterministic: this process holds the target's lock as a paramtool writer would (a sharded
    checkpoint's lock is its directory's), commits a new version while paramtool waits, then lets go.
    paramtool must start from the committed version, not the one that was there when it began waiting."""
    target = build(kind, tmp_path / "ckpt")
    fd = os.open(target, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        run = Running(runners[0], "set", target, "b.weight[:] = 5", "--in-place")
        while not run.done() and "waiting" not in run.stderr():
            time.sleep(0.001)
        assert run.stderr().startswith("waiting for another paramtool writing"), run.stderr()
        # the first writer's commit, made as paramtool makes it: new files renamed over the old ones
        first = tmp_path / ("first" if kind == "sharded" else "first.safetensors")
        r = runners[1].run("set", target, "a.weight[:] = 3", "-o", first)
        assert r.exit == 0, r.stderr
        if kind == "sharded":
            for name in os.listdir(first):
                shutil.copyfile(first / name, tmp_path / "staged")
                os.replace(tmp_path / "staged", os.path.join(target, name))
        else:
            os.replace(first, target)
    finally:
        os.close(fd)  # the lock is released
    r = run.result()
    assert r.exit == 0, r.stderr
    state = read_state(kind, target)
    assert torch.all(state["a.weight"] == 3), "the first writer's edit was lost"
    assert torch.all(state["b.weight"] == 5)


@pytest.mark.parametrize("kind", ["pt", "safetensors", "sharded", "dcp"])
def test_two_writers_at_once_keep_both_edits(tmp_path, runners, kind):
    target = build(kind, tmp_path / "ckpt")
    old = read_state(kind, target)
    # a sharded checkpoint named two ways (its directory, its index): one lock, the directory's
    other = os.path.join(target, "model.safetensors.index.json") if kind == "sharded" else target
    for round_ in range(3):
        a = Running(runners[0], "set", target, f"a.weight[:] = {round_ + 1}", "--in-place")
        b = Running(runners[1], "set", other, f"c.weight[:] = {round_ + 11}", "--in-place")
        for run in (a, b):
            r = run.result()
            assert r.exit == 0, r.stderr
        state = read_state(kind, target)
        assert torch.all(state["a.weight"] == round_ + 1) and torch.all(state["c.weight"] == round_ + 11), \
            "an edit was lost"
        assert torch.equal(state["b.weight"], old["b.weight"])


def test_two_inits_in_place_on_one_safetensors(tmp_path, runners):
    target = build("safetensors", tmp_path / "ckpt")
    for _ in range(3):
        runs = [Running(runners[i], "init", target, "--scheme", "constant", "--value", v, "--layer", layer,
                        "--in-place") for i, (v, layer) in enumerate((("1", "a"), ("2", "c")))]
        for run in runs:
            r = run.result()
            assert r.exit == 0, r.stderr
        state = load_file(target)
        assert torch.all(state["a.weight"] == 1) and torch.all(state["c.weight"] == 2)
        save_file({n: torch.zeros(16, 16) for n in NAMES}, target, metadata={"format": "pt"})


# -- 4. readers during a commit -----------------------------------------------------------------------------

def _values_of(stats_json: bytes) -> set[float]:
    return {round(t["mean"], 3) for t in json.loads(stats_json)["tensors"]}


@pytest.mark.parametrize("kind", ["sharded", "dcp"])
def test_a_reader_during_commits_sees_one_version(tmp_path, runners, kind):
    """A writer sets every tensor to one value per commit, again and again; readers in a loop must see one
    value across all shards (all-old or all-new), or fail with one error line."""
    target = build(kind, tmp_path / "ckpt")
    assert runners[0].run("set", target, *(f"{n}[:] = 1" for n in NAMES), "--in-place").exit == 0
    failures: list[str] = []

    def write() -> None:
        for v in range(2, 14):
            r = runners[0].run("set", target, *(f"{n}[:] = {v}" for n in NAMES), "--in-place")
            if r.exit != 0:
                failures.append(r.stderr)

    writer = threading.Thread(target=write)
    writer.start()
    seen, errors = set(), 0
    try:
        while writer.is_alive():
            reads = [Running(runners[i], "stats", target, "--json") for i in (1, 2)]
            for run in reads:
                r = run.result()
                if r.exit == 0:
                    values = _values_of(r.stdout)
                    assert len(values) == 1, f"a reader saw a mixture: {values}"
                    seen |= values
                else:
                    one_error_line(r.stderr, "changed")
                    errors += 1
    finally:
        writer.join()
    assert not failures, failures
    assert len(seen) >= 3, "the reads never overlapped the commits"


# -- 5. -o naming the input under another name ----------------------------------------------------------------

def test_output_naming_a_hard_link_of_the_input(tmp_path, runners):
    """``-o`` naming the input's file by another name (a hard link) counts as ``--in-place`` (the input's
    lock is taken), and writes the name given: that name gets the new file, the input's name keeps its own."""
    src, link = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"w": torch.zeros(4)}, str(src))
    os.link(src, link)
    before = src.read_bytes()
    r = runners[0].run("set", src, "w[:] = 1", "-o", link)
    assert r.exit == 0, r.stderr
    assert r.stderr.startswith(f"wrote {link} "), r.stderr  # the name the user gave
    assert src.read_bytes() == before and os.stat(src).st_nlink == 1
    assert torch.all(torch.load(str(link), weights_only=True)["w"] == 1)


# -- every command, the input replaced at a random moment --------------------------------------------------------

SWEEP = {  # command line (IN, OUT placeholders) -> how the output's names map back to the input's
    "rename": (["rename", "IN", "s/layer/block/", "-o", "OUT"], lambda n: n.replace("block", "layer")),
    "drop": (["drop", "IN", "--layer", "layer0", "-o", "OUT"], lambda n: n),
    "init": (["init", "IN", "--scheme", "zeros", "--layer", "layer0", "-o", "OUT"], lambda n: n),
    "convert": (["convert", "IN", "OUT"], lambda n: n),
    "convert --dtype": (["convert", "IN", "OUT", "--dtype", "bf16"], lambda n: n),
}


@pytest.mark.parametrize("command", list(SWEEP))
def test_every_writer_with_its_input_replaced_at_random(tmp_path, runners, command):
    """The input is replaced (rename over it) at a random moment after the command opened it: exit 0 with an
    output wholly from one version (layer0 aside, which init and drop change), or one error line, nothing
    written and no temporary left."""
    import random

    argv, back = SWEEP[command]
    src, out = tmp_path / "in.safetensors", tmp_path / ("out.pt" if command == "convert" else "out.safetensors")
    old, new = _state(48, 0.0), _state(48, 1000.0)
    save_file(new, str(tmp_path / "new.safetensors"), metadata={"format": "pt"})
    rng = random.Random(command)
    for _ in range(3):
        save_file(old, str(src), metadata={"format": "pt"})
        out.unlink(missing_ok=True)
        run = Running(runners[0], *[{"IN": src, "OUT": out}.get(a, a) for a in argv])
        if wait_until(run, src):
            time.sleep(rng.uniform(0, 0.05))
            shutil.copyfile(tmp_path / "new.safetensors", tmp_path / "staged")
            os.replace(tmp_path / "staged", src)
        r = run.result()
        if r.exit == 0:
            got = torch.load(str(out), weights_only=True) if out.suffix == ".pt" else load_file(str(out))
            got = {back(n): t.float() for n, t in got.items() if back(n) != "layer0.weight"}
            cast = (lambda t: t.to(torch.bfloat16).float()) if "--dtype" in argv else (lambda t: t)
            versions = [v for v, sd in (("old", old), ("new", new)) if all(torch.equal(got[n], cast(sd[n])) for n in got)]
            assert len(got) == 47 and versions, "an output mixing two versions of the input"
        else:
            one_error_line(r.stderr, CHANGED)
            assert not out.exists()
        assert not [p for p in os.listdir(tmp_path) if ".paramtool-tmp" in p]


@pytest.mark.parametrize("command", ["show", "stats", "inspect"])
def test_every_reader_with_its_input_replaced_at_random(tmp_path, runners, command):
    """Readers through the full CLI: one version's answer (a whole tensor of one value), or one error line."""
    import random

    src = tmp_path / "in.safetensors"
    old, new = _state(48, 0.0), _state(48, 1000.0)
    save_file(new, str(tmp_path / "new.safetensors"), metadata={"format": "pt"})
    rng = random.Random(command)
    argv = {"show": ["show", src, "layer5.weight", "--json"], "stats": ["stats", src, "--json"],
            "inspect": ["inspect", src, "--json"]}[command]
    for _ in range(3):
        save_file(old, str(src), metadata={"format": "pt"})
        run = Running(runners[0], *argv)
        if wait_until(run, src):
            time.sleep(rng.uniform(0, 0.02))
            shutil.copyfile(tmp_path / "new.safetensors", tmp_path / "staged")
            os.replace(tmp_path / "staged", src)
        r = run.result()
        if r.exit != 0:
            one_error_line(r.stderr, CHANGED)
            continue
        doc = json.loads(r.stdout)
        if command == "show":
            assert len({v for row in doc["values"] for v in row}) == 1
        elif command == "stats":
            means = {t["name"]: t["mean"] for t in doc["tensors"]}
            assert means["layer1.weight"] - means["layer0.weight"] == 1
            assert {round(means["layer0.weight"])} <= {0, 1000}

"""Benchmark paramtool against the obvious torch / safetensors scripts, in one run on one machine.

    python benchmarks/bench.py [--sizes 100,1000] [--repeat 3] [--keep]
    python benchmarks/bench.py --only values --size 1G --sharded-size 4G
    python benchmarks/bench.py --only init --sizes 1024 --repeat 5   # init rows and the sparse init
    python benchmarks/bench.py --quick        # small sizes, one run: checks the benchmark itself

What is measured, and why
-------------------------
For each size N (in MB, taken as MiB = 2**20 bytes) a state dict of float32 2-D tensors is generated
(4096 x 4096 matrices, 64 MiB each, the last one shortened to hit the size, each with a small 1-D bias)
and written into a fresh temporary directory twice: ``ckpt_{N}MB.pt`` (``torch.save``, zip format) and
``ckpt_{N}MB.safetensors`` (``safetensors.torch.save_file``). Generation is not timed.

Every command then runs as a separate child process, so start-up (interpreter, imports) is included
on both sides -- that is what a user pays when they run a CLI or a one-off script:

- listing: ``paramtool inspect FILE --json > /dev/null`` against a script printing name, shape and dtype
  via ``torch.load(mmap=True, weights_only=True)`` (.pt), or via ``safe_open`` + ``get_slice`` and,
  as a second row, the "obvious" ``safetensors.torch.load_file`` (.safetensors). Listing should not
  have to read tensor data, so its time ought to be independent of the checkpoint size; the
  "size-independence" lines give inspect time at the largest size / at the smallest.
- init: ``paramtool init FILE --scheme xavier --seed 0 -o OUT`` against a script doing
  ``torch.load(weights_only=True)`` (or ``load_file``), ``xavier_uniform_`` on every tensor with
  dim >= 2, and ``torch.save`` (or ``save_file``) to OUT. The two run alternately (warm-up of each, then
  paramtool, script, paramtool, ...), so a change in load or writeback falls on both; a line per format
  gives paramtool/script against issue 26's target (<= 0.8) and the read floor (``cat`` of the input plus
  ``import torch``, timed in this run). ``--only init`` runs these rows and the sparse init alone.
- sparse init: ``init --layer layers.3`` of one 512 MiB tensor of a sparse 20 GiB safetensors file (all holes):
  time, disk used by the output, and the peak RSS above the same command's on a two-tensor file: one storage
  at most (no second copy of the tensor), target <= 1.05 storages.

Before anything is timed, the paramtool package that runs is byte-compiled (``python -m compileall -q``) and
PYTHONDONTWRITEBYTECODE is unset for the children: an installed package ships its bytecode, while an editable
install run with that variable set (or with stale ``__pycache__``) recompiles its sources at every start.

Each command runs once untimed (a warm-up: the page cache cannot be dropped without root, so both
sides are measured with the file already cached) and then ``--repeat`` times. Reported: the median
wall time and the largest peak RSS, read from ``/usr/bin/time -v`` ("Maximum resident set size") when
it exists, else from ``getrusage(RUSAGE_CHILDREN)`` inside a fresh wrapper process per run. Ratios:
speed = baseline/paramtool (above 1: paramtool is faster), RSS = paramtool/baseline (below 1:
paramtool uses less memory).

Value commands (``--only values``, and after the listing rows by default), each run once with its inputs in the
page cache, beside the obvious script and the read floor (``cat`` of the command's input files, timed in this run,
plus a bare ``python -c 'import torch'``, median of 3 in this run): on one ``--size`` file, ``stats --json``
(safetensors and .pt), ``diff`` of the file with itself and with a copy where every value is + 1e-3 (floor: cat
of both inputs), ``ties --values``, ``convert`` pt -> safetensors and back, ``convert --dtype bf16``; on a
``--sharded-size`` checkpoint of ``--shards`` safetensors shards, the same minus the .pt rows, with ``convert``
(and ``--dtype bf16``) into one file. The obvious scripts: ``safe_open`` + ``get_tensor`` (or
``torch.load(mmap=True)``) + torch ops per tensor; ``load_file``/``torch.load`` (+ ``.to(torch.bfloat16)``) +
``save_file``/``torch.save``. The ``targets`` column and the closing lines say which of the issue's targets each
row meets: speed ratio >= 3, paramtool / floor <= 2, RSS ratio <= 0.3 (and the listing median <= 0.06 s).

A paramtool command that fails is reported with its stderr and its row is
marked FAILED; the script goes on and always exits 0.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(ROOT, ".venv", "bin")
PYTHON = os.path.join(VENV_BIN, "python") if os.path.exists(os.path.join(VENV_BIN, "python")) else sys.executable
# this checkout's paramtool: its venv's script, else its sources run by the current interpreter
if os.path.exists(os.path.join(VENV_BIN, "paramtool")):
    PARAMTOOL: list[str] = [os.path.join(VENV_BIN, "paramtool")]
else:
    PARAMTOOL = [PYTHON, "-m", "paramtool"]
    os.environ["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", "")
TIME_BIN = "/usr/bin/time"
COLS = 4096  # a full matrix is 4096 x 4096 float32 = 64 MiB
MiB = 2**20

# Baseline scripts; the file names come in as sys.argv[1] (input) and sys.argv[2] (output).
LIST_PT = """
import sys, torch
sd = torch.load(sys.argv[1], mmap=True, weights_only=True)
[print(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
"""
LIST_ST_OPEN = """
import sys
from safetensors import safe_open
with safe_open(sys.argv[1], "pt") as f:
    [print(k, f.get_slice(k).get_shape()) for k in f.keys()]
"""
LIST_ST_LOAD = """
import sys
from safetensors.torch import load_file
[print(k, tuple(v.shape), v.dtype) for k, v in load_file(sys.argv[1]).items()]
"""
INIT_PT = """
import sys, torch
torch.manual_seed(0)
sd = torch.load(sys.argv[1], weights_only=True)
for v in sd.values():
    if v.dim() >= 2:
        torch.nn.init.xavier_uniform_(v)
torch.save(sd, sys.argv[2])
"""
INIT_ST = """
import sys, torch
from safetensors.torch import load_file, save_file
torch.manual_seed(0)
sd = load_file(sys.argv[1])
for v in sd.values():
    if v.dim() >= 2:
        torch.nn.init.xavier_uniform_(v)
save_file(sd, sys.argv[2])
"""
# Value commands: the obvious per-tensor scripts. sys.argv[1] is a .safetensors file or a sharded directory.
_ST_ITER = """
import glob, os, sys, torch
from safetensors import safe_open
def tensors(path):
    files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) if os.path.isdir(path) else [path]
    for f in files:
        with safe_open(f, "pt") as h:
            for k in h.keys():
                yield k, h.get_tensor(k)
"""
STATS_SCRIPT = _ST_ITER + """
for k, t in tensors(sys.argv[1]):
    f = t.double()
    print(k, f.mean().item(), f.std().item(), f.min().item(), f.max().item(), (f == 0).double().mean().item(),
          f.norm().item(), int(torch.isnan(f).sum()), int(torch.isinf(f).sum()))
"""
# diff: both sides read with safe_open, tensor by tensor (b's file opened per tensor, so that neither side's
# mapping stays resident for the whole run: a sharded directory's shards one at a time)
DIFF_SCRIPT = _ST_ITER + """
def files(path):
    return sorted(glob.glob(os.path.join(path, "*.safetensors"))) if os.path.isdir(path) else [path]
where = {}
for f in files(sys.argv[2]):
    with safe_open(f, "pt") as h:
        where.update((k, f) for k in h.keys())
seen = set()
for k, x in tensors(sys.argv[1]):
    seen.add(k)
    if k not in where:
        print("removed", k)
        continue
    with safe_open(where[k], "pt") as h:
        y = h.get_tensor(k)
    if x.shape != y.shape or x.dtype != y.dtype:
        print(k, x.shape, x.dtype, y.shape, y.dtype)
    elif not torch.equal(x, y):
        d = (x - y).abs().max().item()
        cosine = torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0).item()
        print(k, d, d / y.abs().max().item(), cosine)
print("added", sorted(where.keys() - seen))
"""
TIES_SCRIPT = _ST_ITER + """
import hashlib
seen = {}
for k, t in tensors(sys.argv[1]):
    seen.setdefault((tuple(t.shape), t.dtype, hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()), []).append(k)
print([v for v in seen.values() if len(v) > 1])
"""
CONVERT_PT_ST = """
import sys, torch
from safetensors.torch import save_file
save_file(torch.load(sys.argv[1], weights_only=True), sys.argv[2])
"""
CONVERT_ST_PT = """
import sys, torch
from safetensors.torch import load_file
torch.save(load_file(sys.argv[1]), sys.argv[2])
"""
CONVERT_SHARDED_ST = _ST_ITER + """
from safetensors.torch import save_file
save_file(dict(tensors(sys.argv[1])), sys.argv[2])
"""
# --dtype bf16: floating tensors cast, the rest kept; a .safetensors file or a sharded directory in, one file out
CONVERT_BF16 = _ST_ITER + """
from safetensors.torch import save_file
save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors(sys.argv[1])}, sys.argv[2])
"""
STATS_PT_SCRIPT = """
import sys, torch
for k, t in torch.load(sys.argv[1], mmap=True, weights_only=True).items():
    f = t.double()
    print(k, f.mean().item(), f.std().item(), f.min().item(), f.max().item(), (f == 0).double().mean().item(),
          f.norm().item(), int(torch.isnan(f).sum()), int(torch.isinf(f).sum()))
"""
TORCH_IMPORT = "import torch"

# Fallback when /usr/bin/time is missing: a fresh process per run, so RUSAGE_CHILDREN covers one child only.
RUSAGE_WRAPPER = """
import resource, subprocess, sys
rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)
print("Maximum resident set size (kbytes): %d" % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
      file=sys.stderr)
sys.exit(rc)
"""


@dataclass
class Result:
    """One command's measurement: median seconds and peak RSS in MiB, or the error that stopped it."""

    seconds: float = 0.0
    rss_mib: float = 0.0
    error: str | None = None


def generate(directory: str, size_mb: int) -> tuple[str, str]:
    """Write ``ckpt_{size_mb}MB.pt`` and ``.safetensors`` holding about ``size_mb`` MiB of float32 tensors."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(size_mb)
    remaining = size_mb * MiB // 4  # float32 elements still to place
    sd: dict[str, torch.Tensor] = {}
    i = 0
    while remaining >= COLS + 1:
        rows = min(COLS, remaining // (COLS + 1))  # a layer is rows x COLS weights + rows biases
        sd[f"layers.{i}.weight"] = torch.randn(rows, COLS, generator=g)
        sd[f"layers.{i}.bias"] = torch.zeros(rows)
        remaining -= rows * (COLS + 1)
        i += 1
    pt = os.path.join(directory, f"ckpt_{size_mb}MB.pt")
    st = os.path.join(directory, f"ckpt_{size_mb}MB.safetensors")
    torch.save(sd, pt)
    save_file(sd, st)
    return pt, st


def run_once(cmd: list[str]) -> tuple[float, float, int, str]:
    """Run ``cmd`` with stdout discarded: (wall seconds, peak RSS MiB, exit status, the command's stderr)."""
    if os.path.exists(TIME_BIN):
        full = [TIME_BIN, "-v", *cmd]
    else:
        full = [PYTHON, "-c", RUSAGE_WRAPPER, *cmd]
    start = time.perf_counter()
    p = subprocess.run(full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    rss_kb, own = 0, []
    for line in p.stderr.splitlines():
        if "Maximum resident set size (kbytes)" in line:
            rss_kb = int(line.rsplit(":", 1)[1])
        elif not line.startswith(("\t", "Command exited with non-zero status", "Command terminated by signal")):
            own.append(line)  # /usr/bin/time -v indents its report with tabs; the rest is the command's own
    return elapsed, rss_kb / 1024, p.returncode, "\n".join(own)


def measure(cmd: list[str], repeat: int, warm: bool = True) -> Result:
    """One untimed warm-up (unless ``warm`` is False), then ``repeat`` runs: median wall time and largest
    peak RSS. ``diff`` exits 1 when its inputs differ: that is not a failure."""
    times: list[float] = []
    peaks: list[float] = []
    skip = 1 if warm else 0
    for i in range(repeat + skip):
        elapsed, rss, rc, err = run_once(cmd)
        if rc != 0 and not (rc == 1 and "diff" in cmd and not err.strip()):
            return Result(error=f"exit status {rc}: {' '.join(cmd)}\n{err[-3000:]}")
        if i >= skip:
            times.append(elapsed)
            peaks.append(rss)
    return Result(statistics.median(times), max(peaks))


def measure_pair(a: list[str], b: list[str], repeat: int) -> tuple[Result, Result]:
    """``measure`` of two commands with their runs alternated (a warm-up of each, then a, b, a, b, ...), so a
    change in the machine's load or the disk's writeback falls on both sides alike."""
    runs: dict[int, list[tuple[float, float]]] = {0: [], 1: []}
    for i in range(repeat + 1):
        for side, cmd in enumerate((a, b)):
            elapsed, rss, rc, err = run_once(cmd)
            if rc != 0:
                failed = Result(error=f"exit status {rc}: {' '.join(cmd)}\n{err[-3000:]}")
                other = measure(b if side == 0 else a, repeat)
                return (failed, other) if side == 0 else (other, failed)
            if i:
                runs[side].append((elapsed, rss))
    a_res, b_res = (Result(statistics.median(t for t, _ in runs[k]), max(m for _, m in runs[k])) for k in (0, 1))
    return a_res, b_res


HEADER = ("size", "format", "operation", "paramtool s", "baseline s", "speed ratio", "paramtool MB", "baseline MB",
          "RSS ratio", "baseline")


def row(size: int, fmt: str, op: str, ours: Result, base: Result, base_name: str) -> tuple[str, ...]:
    """A table row; FAILED where a side failed, ratios only when both succeeded."""
    def t(r: Result) -> str:
        return "FAILED" if r.error else f"{r.seconds:.3f}"

    def m(r: Result) -> str:
        return "FAILED" if r.error else f"{r.rss_mib:.0f}"

    ok = ours.error is None and base.error is None
    speed = f"{base.seconds / ours.seconds:.2f}x" if ok and ours.seconds > 0 else "-"
    rss = f"{ours.rss_mib / base.rss_mib:.2f}" if ok and base.rss_mib > 0 else "-"
    return (f"{size} MB", fmt, op, t(ours), t(base), speed, m(ours), m(base), rss, base_name)


def print_row(cells: tuple[str, ...]) -> None:
    print("| " + " | ".join(cells) + " |", flush=True)


def report_failure(who: str, r: Result) -> None:
    if r.error:
        print(f"\n{who} FAILED, {r.error}\n", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    """``1G``, ``512M``, ``4096`` (MiB) -> MiB."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text.endswith("G"):
        return int(float(text[:-1]) * 1024)
    if text.endswith("M"):
        return int(float(text[:-1]))
    return int(text)


def generate_sharded(directory: str, size_mb: int, shards: int) -> str:
    """A sharded safetensors checkpoint (``model-0000i-of-0000n.safetensors`` + index) of about ``size_mb``."""
    import json

    import torch
    from safetensors.torch import save_file

    root = os.path.join(directory, f"sharded_{size_mb}MB")
    os.makedirs(root)
    g = torch.Generator().manual_seed(size_mb + 1)
    per = size_mb // shards
    weight_map = {}
    layer = 0
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        sd = {}
        remaining = per * MiB // 4
        while remaining >= COLS:
            rows = min(COLS, remaining // COLS)
            sd[f"layers.{layer}.weight"] = torch.randn(rows, COLS, generator=g)
            remaining -= rows * COLS
            layer += 1
        save_file(sd, os.path.join(root, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in sd})
        del sd
    with open(os.path.join(root, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return root


def perturbed_copy(path: str, directory: str) -> str:
    """A copy of ``path`` (a .safetensors file or a sharded directory) under the same tensor names, every value
    + 1e-3: the ``diff (differs)`` input, where every tensor differs slightly (a conversion to verify)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    target = os.path.join(directory, "differs_" + os.path.basename(path.rstrip(os.sep)))
    if os.path.isdir(path):
        os.makedirs(target)
    for f in files_of(path):
        out = os.path.join(target, os.path.basename(f)) if os.path.isdir(path) else target
        if not f.endswith(".safetensors"):
            shutil.copyfile(f, out)  # the index: same names, same shards
            continue
        with safe_open(f, "pt") as h:
            metadata = h.metadata()
            sd = {k: h.get_tensor(k) + 1e-3 for k in h.keys()}
        save_file(sd, out, metadata=metadata)
        del sd
    return target


VALUE_HEADER = ("checkpoint", "command", "paramtool s", "script s", "speed ratio", "floor s", "paramtool / floor",
                "paramtool MB", "script MB", "RSS ratio", "targets")
# the targets: script/paramtool >= 3, paramtool/floor <= 2, paramtool RSS/script RSS <= 0.3
SPEED_TARGET, FLOOR_TARGET, RSS_TARGET = 3.0, 2.0, 0.3


def targets(ours: Result, base: Result, floor: float) -> dict[str, bool | None]:
    """Which targets a row meets: True, False, or None when a side failed."""
    if ours.error is not None:
        return {"speed": None, "floor": None, "rss": None}
    ok = base.error is None
    return {"speed": base.seconds / ours.seconds >= SPEED_TARGET if ok and ours.seconds > 0 else None,
            "floor": ours.seconds / floor <= FLOOR_TARGET if floor > 0 else None,
            "rss": ours.rss_mib / base.rss_mib <= RSS_TARGET if ok and base.rss_mib > 0 else None}


def targets_text(met: dict[str, bool | None]) -> str:
    return ", ".join(f"{k} {'-' if v is None else 'ok' if v else 'MISSED'}" for k, v in met.items())


def value_row(label: str, op: str, ours: Result, base: Result, floor: float) -> tuple[str, ...]:
    """speed = script/paramtool; floor = cat of the inputs + torch import; RSS = paramtool/script."""
    ok = ours.error is None and base.error is None
    t = lambda r: "FAILED" if r.error else f"{r.seconds:.2f}"  # noqa: E731
    m = lambda r: "FAILED" if r.error else f"{r.rss_mib:.0f}"  # noqa: E731
    return (label, op, t(ours), t(base), f"{base.seconds / ours.seconds:.2f}x" if ok else "-", f"{floor:.2f}",
            f"{ours.seconds / floor:.2f}" if ours.error is None else "-", m(ours), m(base),
            f"{ours.rss_mib / base.rss_mib:.2f}" if ok and base.rss_mib else "-",
            targets_text(targets(ours, base, floor)))


def cat_seconds(paths: list[str]) -> float:
    """The read floor: ``cat FILES > /dev/null`` (files already in the page cache)."""
    start = time.perf_counter()
    subprocess.run(["cat", *paths], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def files_of(path: str) -> list[str]:
    return sorted(os.path.join(path, f) for f in os.listdir(path)) if os.path.isdir(path) else [path]


def floor_of(inputs: list[str], torch_import: float) -> float:
    """``cat`` of every input file (once to warm the page cache, then timed) plus torch's import."""
    files = [f for p in inputs for f in files_of(p)]
    cat_seconds(files)
    return cat_seconds(files) + torch_import


def remove(path: str | None) -> None:
    if path and os.path.isdir(path):
        shutil.rmtree(path)
    elif path and os.path.exists(path):
        os.unlink(path)


def value_section(work: str, size_mb: int, sharded_mb: int, shards: int, repeat: int) -> None:
    """stats, diff (equal and differing inputs), ties --values, convert (pt <-> safetensors, sharded -> one file)
    and convert --dtype bf16 beside their obvious scripts and the read floor, at one file of ``size_mb`` and on a
    sharded checkpoint of ``sharded_mb``; then which of the issue's targets each row meets."""
    torch_import = measure([PYTHON, "-c", TORCH_IMPORT], 3).seconds
    print(f"\nvalue commands: one run each after the files are read once (page cache warm); floor = cat of the "
          f"command's inputs + torch import ({torch_import:.2f} s, median of 3 in this run); speed = "
          f"script/paramtool; RSS = paramtool/script; targets: speed >= {SPEED_TARGET:g}x, paramtool / floor <= "
          f"{FLOOR_TARGET:g}, RSS ratio <= {RSS_TARGET:g}.\n")
    print_row(VALUE_HEADER)
    print_row(tuple("---" for _ in VALUE_HEADER))
    pt, st = generate(work, size_mb)
    cases = [(f"{size_mb} MB file", pt, st)]
    if sharded_mb:
        cases.append((f"{sharded_mb} MB sharded ({shards})", None, generate_sharded(work, sharded_mb, shards)))
    summary: list[tuple[str, list[tuple[str, dict[str, bool | None]]]]] = []
    for label, pt_path, st_path in cases:
        differs = perturbed_copy(st_path, work)
        one = os.path.join(work, "out_ours.safetensors"), os.path.join(work, "out_base.safetensors")
        # (command, paramtool argv, script argv, inputs read, outputs to delete)
        rows = [("stats --json", [*PARAMTOOL, "stats", st_path, "--json"], [PYTHON, "-c", STATS_SCRIPT, st_path],
                 [st_path], ()),
                ("diff (equal)", [*PARAMTOOL, "diff", st_path, st_path, "--json"],
                 [PYTHON, "-c", DIFF_SCRIPT, st_path, st_path], [st_path, st_path], ()),
                ("diff (differs)", [*PARAMTOOL, "diff", st_path, differs, "--json"],
                 [PYTHON, "-c", DIFF_SCRIPT, st_path, differs], [st_path, differs], ()),
                ("ties --values", [*PARAMTOOL, "ties", st_path, "--values", "--json"],
                 [PYTHON, "-c", TIES_SCRIPT, st_path], [st_path], ())]
        if pt_path is not None:
            pts = os.path.join(work, "out_ours.pt"), os.path.join(work, "out_base.pt")
            rows += [("stats --json (.pt)", [*PARAMTOOL, "stats", pt_path, "--json"],
                      [PYTHON, "-c", STATS_PT_SCRIPT, pt_path], [pt_path], ()),
                     ("convert pt->safetensors", [*PARAMTOOL, "convert", pt_path, one[0]],
                      [PYTHON, "-c", CONVERT_PT_ST, pt_path, one[1]], [pt_path], one),
                     ("convert safetensors->pt", [*PARAMTOOL, "convert", st_path, pts[0]],
                      [PYTHON, "-c", CONVERT_ST_PT, st_path, pts[1]], [st_path], pts),
                     ("convert --dtype bf16", [*PARAMTOOL, "convert", st_path, one[0], "--dtype", "bf16"],
                      [PYTHON, "-c", CONVERT_BF16, st_path, one[1]], [st_path], one)]
        else:
            rows += [("convert sharded->one file", [*PARAMTOOL, "convert", st_path, "-o", one[0]],
                      [PYTHON, "-c", CONVERT_SHARDED_ST, st_path, one[1]], [st_path], one),
                     ("convert --dtype bf16 (->one file)", [*PARAMTOOL, "convert", st_path, "-o", one[0], "--dtype",
                                                             "bf16"],
                      [PYTHON, "-c", CONVERT_BF16, st_path, one[1]], [st_path], one)]
        met: list[tuple[str, dict[str, bool | None]]] = []
        for op, ours_cmd, base_cmd, inputs, outputs in rows:
            floor = floor_of(inputs, torch_import)
            ours = measure(ours_cmd, repeat, warm=False)
            report_failure(f"paramtool {op} ({label})", ours)
            base = measure(base_cmd, repeat, warm=False)
            report_failure(f"script {op} ({label})", base)
            print_row(value_row(label, op, ours, base, floor))
            met.append((op, targets(ours, base, floor)))
            for f in outputs:  # outputs go as soon as they are measured: disk space
                remove(f)
        summary.append((label, met))
        for f in (pt_path, st_path, differs):
            remove(f)
    print()
    for label, met in summary:
        good = [op for op, m in met if all(m.values())]
        missed = [f"{op} ({', '.join(k for k, v in m.items() if v is not True)})"
                  for op, m in met if not all(m.values())]
        print(f"targets, {label}: all three met by: {', '.join(good) or 'no row'}; missed by: "
              f"{'; '.join(missed) or 'no row'}")


INIT_TARGET = 0.8  # issue 26: init at most 0.8x the load-init-save script's time at 1 GiB


def init_rows(work: str, size: int, files: tuple[str, str], repeat: int, keep: bool,
              floor_import: float) -> list[str]:
    """``init --scheme xavier --seed 0 -o OUT`` on the .pt and the .safetensors file, each beside its
    load-xavier-save script (runs alternated: ``measure_pair``); prints the table rows and returns one line
    per format with the time ratio paramtool/script, the target and the read floor (cat of the input +
    torch's import, timed in this run)."""
    lines = []
    for fmt, path, ext in zip(("pt", "safetensors"), files, (".pt", ".safetensors")):
        out_ours = os.path.join(work, f"init_paramtool_{size}MB{ext}")
        out_base = os.path.join(work, f"init_baseline_{size}MB{ext}")
        name = "torch.load + xavier_ + torch.save" if fmt == "pt" else "load_file + xavier_ + save_file"
        ours, base = measure_pair([*PARAMTOOL, "init", path, "--scheme", "xavier", "--seed", "0", "-o", out_ours],
                                  [PYTHON, "-c", INIT_PT if fmt == "pt" else INIT_ST, path, out_base], repeat)
        report_failure(f"paramtool init ({size} MB {fmt})", ours)
        report_failure(f"baseline {name} ({size} MB {fmt})", base)
        print_row(row(size, fmt, "init xavier", ours, base, name))
        floor = floor_of([path], floor_import)
        if ours.error is None and base.error is None:
            ratio = ours.seconds / base.seconds
            verdict = ("ok" if ratio <= INIT_TARGET else "MISSED") if size >= 1000 else "set for 1 GiB, n/a here"
            lines.append(f"init xavier {size} MB {fmt}: paramtool {ours.seconds:.2f} s / script {base.seconds:.2f} s "
                         f"= {ratio:.2f} (target <= {INIT_TARGET:g}: {verdict}); "
                         f"floor (cat + import torch) {floor:.2f} s, paramtool / floor {ours.seconds / floor:.2f}")
        else:
            lines.append(f"init xavier {size} MB {fmt}: FAILED")
        if not keep:
            for f in (out_ours, out_base):
                remove(f)
    return lines


def peak_rss(cmd: list[str]) -> Result:
    """One run of ``cmd``: its wall time and peak RSS (``run_once``), or the error."""
    elapsed, rss, rc, err = run_once(cmd)
    return Result(error=f"exit status {rc}: {' '.join(cmd)}\n{err[-3000:]}") if rc else Result(elapsed, rss)


def sparse_init(work: str, size_mb: int) -> None:
    """``init --layer layers.3 -o OUT`` on a sparse safetensors file of ``size_mb`` (512 MiB tensors, data all
    holes): the time should follow the 512 MiB changed, not the file; OUT keeps the holes. Beside ``cp``.

    Memory: the peak RSS above what the same command costs on a file of two 64 x 64 tensors (the
    interpreter, torch and paramtool, measured in this run) should be one storage, the 512 MiB tensor being
    generated and written, and no second copy of it (target: at most 1.05 storages)."""
    import json

    import torch
    from safetensors.torch import save_file

    path, out = os.path.join(work, "sparse.safetensors"), os.path.join(work, "sparse_out.safetensors")
    tiny, tiny_out = os.path.join(work, "tiny.safetensors"), os.path.join(work, "tiny_out.safetensors")
    per = 512 * MiB
    n = max(4, size_mb * MiB // per)
    rows = per // 4 // COLS
    header = {f"layers.{i}.weight": {"dtype": "F32", "shape": [rows, COLS], "data_offsets": [i * per, (i + 1) * per]}
              for i in range(n)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + n * per)
    save_file({f"layers.{i}.weight": torch.zeros(64, 64) for i in (3, 4)}, tiny)
    args = ["--scheme", "normal", "--seed", "0", "--layer", "layers.3", "-o"]
    ours = peak_rss([*PARAMTOOL, "init", path, *args, out])
    report_failure("paramtool init on a sparse file", ours)
    used = os.stat(out).st_blocks * 512 / MiB if os.path.exists(out) else 0
    base = min((peak_rss([*PARAMTOOL, "init", tiny, *args, tiny_out]) for _ in range(3)), key=lambda r: r.rss_mib)
    report_failure("paramtool init on a two-tensor file", base)
    cp = measure(["cp", path, os.path.join(work, "sparse_cp.safetensors")], 1, warm=False)
    print(f"\nsparse {n * per // MiB} MB safetensors (all holes), init one 512 MiB tensor: paramtool "
          f"{ours.seconds:.2f} s, {ours.rss_mib:.0f} MB peak RSS; output uses {used:.0f} MB on disk; "
          f"cp of the same file: {cp.seconds:.2f} s")
    if ours.error is None and base.error is None:
        above = ours.rss_mib - base.rss_mib
        print(f"sparse init memory: peak {ours.rss_mib:.0f} MB - {base.rss_mib:.0f} MB (the same init on a file of "
              f"two 64 x 64 tensors) = {above:.0f} MB for a {per // MiB} MB storage = {above * MiB / per:.2f} "
              f"storages (target <= 1.05: {'ok' if above * MiB <= 1.05 * per else 'MISSED'})")
    for f in (path, out, tiny, tiny_out, os.path.join(work, "sparse_cp.safetensors")):
        if os.path.exists(f):
            os.unlink(f)


def listing_check(work: str, size_mb: int, runs: int = 15) -> None:
    """``inspect --json`` on a file of ``size_mb``: median of ``runs`` (target: 0.06 s), beside bare Python."""
    pt, st = generate(work, size_mb)
    for path in (pt, st):
        ours = [run_once([*PARAMTOOL, "inspect", path, "--json"])[0] for _ in range(runs)]
        bare = [run_once([PYTHON, "-c", "pass"])[0] for _ in range(runs)]
        median = statistics.median(ours)
        print(f"listing {os.path.basename(path)} --json: median {median:.3f} s "
              f"(bare python start-up {statistics.median(bare):.3f} s; target 0.06 s: "
              f"{'ok' if median <= 0.06 else 'MISSED'})")
    os.unlink(pt)
    os.unlink(st)


def compile_package() -> str:
    """Byte-compile the paramtool that the benchmark runs, as an installed package ships it: an editable install
    run with PYTHONDONTWRITEBYTECODE=1 (or with stale ``__pycache__``) compiles its sources on every start, about
    20 ms that no user pays. Timed children then run with PYTHONDONTWRITEBYTECODE unset. Returns what was done."""
    where = subprocess.run([PYTHON, "-c", "import os, paramtool; print(os.path.dirname(paramtool.__file__))"],
                           capture_output=True, text=True)
    if where.returncode != 0:
        return f"bytecode: paramtool not importable by {PYTHON}: {where.stderr.strip()[-300:]}"
    package = where.stdout.strip()
    done = subprocess.run([PYTHON, "-m", "compileall", "-q", package], capture_output=True, text=True)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    if done.returncode != 0:
        return f"bytecode: compileall -q {package} failed: {(done.stdout + done.stderr).strip()[-300:]}"
    return (f"bytecode: compiled {package} (python -m compileall -q), as an installed package has it; "
            f"PYTHONDONTWRITEBYTECODE unset for the timed processes.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--sizes", default="100,1000", help="checkpoint sizes in MB (MiB), comma-separated")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per command (after one warm-up)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory and its files")
    parser.add_argument("--size", default="1G", help="value commands: the single-file checkpoint size (1G, 256M)")
    parser.add_argument("--sharded-size", default="4G", help="value commands: the sharded checkpoint size (0: none)")
    parser.add_argument("--shards", type=int, default=4, help="shards of the sharded checkpoint")
    parser.add_argument("--only", choices=("all", "listing", "values", "init"), default="all",
                        help="listing/init rows only, value-command rows only, init rows and the sparse init "
                             "only, or all")
    parser.add_argument("--sparse-size", default="20G", help="init on a sparse file of this size (0: skip)")
    parser.add_argument("--quick", action="store_true", help="small sizes, one run: check the benchmark itself")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.size, args.sharded_size, args.repeat, args.sparse_size = "100", "128M", "256M", 1, "2G"
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    repeat = max(1, args.repeat)
    import torch

    print(f"paramtool benchmark, {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"platform: {platform.platform()}; cpus: {os.cpu_count()}; python {platform.python_version()}; "
          f"torch {torch.__version__}")
    rss_source = "/usr/bin/time -v" if os.path.exists(TIME_BIN) else "getrusage(RUSAGE_CHILDREN) in a wrapper"
    print(f"time: median of {repeat} runs of a separate process; peak RSS: largest of them ({rss_source}).")
    print("page cache: not dropped (needs root); one untimed warm-up run per command, so files are cached "
          "for both sides.")
    print(compile_package())
    print("speed ratio = baseline/paramtool (>1: paramtool faster); RSS ratio = paramtool/baseline (<1: paramtool "
          "smaller). MB = MiB.\n")
    if args.only != "values":
        print_row(HEADER)
        print_row(tuple("---" for _ in HEADER))

    work = tempfile.mkdtemp(prefix="paramtool-bench-")
    inspect_times: dict[str, dict[int, float]] = {"pt": {}, "safetensors": {}}
    if args.only == "values":
        sizes = []
    torch_import = measure([PYTHON, "-c", TORCH_IMPORT], 3).seconds if sizes else 0.0
    init_lines: list[str] = []
    try:
        for size in sizes:
            pt, st = generate(work, size)
            for fmt, path in (("pt", pt), ("safetensors", st)) if args.only != "init" else ():
                # listing
                ours = measure([*PARAMTOOL, "inspect", path, "--json"], repeat)
                report_failure(f"paramtool inspect ({size} MB {fmt})", ours)
                if ours.error is None:
                    inspect_times[fmt][size] = ours.seconds
                baselines = ([("torch.load(mmap) + print", LIST_PT)] if fmt == "pt" else
                             [("safe_open + print", LIST_ST_OPEN), ("load_file + print", LIST_ST_LOAD)])
                for name, script in baselines:
                    base = measure([PYTHON, "-c", script, path], repeat)
                    report_failure(f"baseline {name} ({size} MB {fmt})", base)
                    print_row(row(size, fmt, "inspect", ours, base, name))
            init_lines += init_rows(work, size, (pt, st), repeat, args.keep, torch_import)
            if not args.keep:
                os.unlink(pt)
                os.unlink(st)
        print()
        if init_lines:
            print(f"init (paramtool and script runs alternated; torch import {torch_import:.2f} s, median of 3 in "
                  "this run):")
            print("\n".join(init_lines) + "\n")
        lo, hi = (sizes[0], sizes[-1]) if sizes else (0, 0)
        for fmt, times in inspect_times.items() if sizes and args.only != "init" else ():
            if lo in times and hi in times:
                print(f"size-independence ({fmt}): inspect time at largest / smallest size "
                      f"({hi} MB / {lo} MB) = {times[hi] / times[lo]:.2f}")
            else:
                print(f"size-independence ({fmt}): n/a (paramtool inspect failed)")
        if args.only in ("all", "values"):
            listing_check(work, parse_size(args.size))
            value_section(work, parse_size(args.size), parse_size(args.sharded_size), args.shards, 1)
        if args.only in ("all", "values", "init") and parse_size(args.sparse_size):
            sparse_init(work, parse_size(args.sparse_size))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time paramtool's commands from two source trees in one run, their runs alternated: before/after a change.

    git -C . archive e358d52 src | tar -x -C /tmp/old
    python benchmarks/compare_trees.py --old /tmp/old/src [--new src] [--size-mb 1024] [--repeat 5] [--only inspect,stats]
    python benchmarks/compare_trees.py --old /tmp/old/src --quick     # small, one run: checks the script itself

A float32 state dict of ``--size-mb`` MiB (bench.py's ``generate``: 64 MiB matrices plus biases) is written as
``.pt`` and ``.safetensors``, plus a copy of the safetensors whose every value is + 1e-3 (``diff (differs)``)
and, for ``merge``, three sources of ``--merge-mb`` (one generated, two perturbed copies). Both trees are byte-compiled first (as installed packages
ship them). Each row's command then runs with ``PYTHONPATH`` set to OLD, then NEW, then OLD, ... (one untimed
warm-up of each, then ``--repeat`` timed runs of each), so a change in the machine's load falls on both sides.
Reported per side: the median wall time, the median user+sys CPU time of the child (``os.wait4``'s rusage) and
the largest peak RSS (``/usr/bin/time -v``); ratios are new/old (below 1: the new tree is faster or smaller). On a shared machine the
CPU column is the steadier one: wall time also counts waiting for the cores and the disk's writeback.

Rows: listing (``inspect --json``) of both formats, ``stats --json`` (both), ``diff`` (equal, differs),
``show``, ``ties --values``, ``convert`` pt -> safetensors, safetensors -> pt and ``--dtype bf16``, ``rename``
and ``drop`` into a new file, ``init --scheme xavier`` (both formats) and a three-source ``merge``. A row where
a side fails is reported with that side's stderr.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (generate, perturbed_copy, PYTHON)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = bench.PYTHON


def run(cmd: list[str], src: str) -> tuple[float, float, float, int, str]:
    """One run of ``cmd`` with ``src`` first on PYTHONPATH: wall s, user+sys s, peak RSS MiB, status, stderr."""
    env = dict(os.environ, PYTHONPATH=src)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    with tempfile.TemporaryFile() as err:
        full = [bench.TIME_BIN, "-v", *cmd] if os.path.exists(bench.TIME_BIN) else cmd
        start = time.perf_counter()
        p = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - start
        p.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read().decode(errors="replace")
    # the child's own peak: /usr/bin/time's report (ru_maxrss of a fork of this process counts torch's pages
    # from before the exec)
    rss_kb, own = usage.ru_maxrss, []
    for line in text.splitlines():
        if "Maximum resident set size (kbytes)" in line:
            rss_kb = int(line.rsplit(":", 1)[1])
        elif not line.startswith(("\t", "Command exited with non-zero status")):
            own.append(line)
    return wall, usage.ru_utime + usage.ru_stime, rss_kb / 1024, p.returncode, "\n".join(own)


def compare(cmd: list[str], srcs: tuple[str, str], repeat: int, outputs: list[str]) -> list[dict]:
    """Warm-up of each side, then ``repeat`` alternated timed runs; per side the medians, or the error."""
    samples: list[list[tuple[float, float, float]]] = [[], []]
    errors: list[str | None] = [None, None]
    for i in range(repeat + 1):
        for side, src in enumerate(srcs):
            if errors[side]:
                continue
            wall, cpu, rss, rc, err = run(cmd, src)
            for f in outputs:  # each run writes afresh (no in-place patch of a previous output)
                remove(f)
            if rc not in (0, 1) or (rc == 1 and ("diff" not in cmd or err.strip())):
                errors[side] = f"exit {rc}: {err.strip()[-800:]}"
            elif i:
                samples[side].append((wall, cpu, rss))
    result = []
    for side in (0, 1):
        s = samples[side]
        result.append({"error": errors[side]} if errors[side] or not s else
                      {"wall": statistics.median(w for w, _, _ in s), "cpu": statistics.median(c for _, c, _ in s),
                       "rss": max(r for _, _, r in s), "walls": [w for w, _, _ in s]})
    return result


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.unlink(path)


def compile_tree(src: str) -> None:
    subprocess.run([PYTHON, "-m", "compileall", "-q", os.path.join(src, "paramtool")], check=True,
                   stdout=subprocess.DEVNULL)


def rows(work: str, pt: str, st: str, differs: str, merge_sources: list[str]) -> list[tuple[str, list[str], list[str]]]:
    """(label, command after ``python -m paramtool``, outputs to delete after each run)."""
    o_st, o_pt = os.path.join(work, "out.safetensors"), os.path.join(work, "out.pt")
    return [
        ("inspect --json (pt)", ["inspect", pt, "--json"], []),
        ("inspect --json (safetensors)", ["inspect", st, "--json"], []),
        ("stats --json (safetensors)", ["stats", st, "--json"], []),
        ("stats --json (pt)", ["stats", pt, "--json"], []),
        ("diff (equal)", ["diff", st, st, "--json"], []),
        ("diff (differs)", ["diff", st, differs, "--json"], []),
        ("show (safetensors)", ["show", st, "layers.0.weight"], []),
        ("show (pt)", ["show", pt, "layers.0.weight"], []),
        ("ties --values", ["ties", st, "--values", "--json"], []),
        ("convert pt->safetensors", ["convert", pt, o_st], [o_st]),
        ("convert safetensors->pt", ["convert", st, o_pt], [o_pt]),
        ("convert --dtype bf16", ["convert", st, o_st, "--dtype", "bf16"], [o_st]),
        ("rename (safetensors)", ["rename", st, "s/^layers/blocks/", "-o", o_st], [o_st]),
        ("rename (pt)", ["rename", pt, "s/^layers/blocks/", "-o", o_pt], [o_pt]),
        ("drop (safetensors)", ["drop", st, "--layer", "layers.0.weight", "-o", o_st], [o_st]),
        ("drop (pt)", ["drop", pt, "--layer", "layers.0.weight", "-o", o_pt], [o_pt]),
        ("init xavier (safetensors)", ["init", st, "--scheme", "xavier", "--seed", "0", "-o", o_st], [o_st]),
        ("init xavier (pt)", ["init", pt, "--scheme", "xavier", "--seed", "0", "-o", o_pt], [o_pt]),
        ("merge 3 sources (safetensors)", ["merge", *merge_sources, "-o", o_st], [o_st]),
    ]


def cell(r: dict, key: str, fmt: str) -> str:
    return "FAILED" if r.get("error") else fmt.format(r[key])


def ratio(old: dict, new: dict, key: str) -> str:
    if old.get("error") or new.get("error") or not old[key]:
        return "-"
    return f"{new[key] / old[key]:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--old", required=True, help="the old tree's src directory (holding paramtool/)")
    parser.add_argument("--new", default=os.path.join(ROOT, "src"), help="the new tree's src directory")
    parser.add_argument("--size-mb", type=int, default=1024, help="checkpoint size in MiB")
    parser.add_argument("--merge-mb", type=int, default=256, help="size of each merge source in MiB")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per side and row (after one warm-up)")
    parser.add_argument("--only", default="", help="comma-separated substrings of row labels to run")
    parser.add_argument("--quick", action="store_true", help="64 MiB, merge 16 MiB, one run")
    args = parser.parse_args()
    if args.quick:
        args.size_mb, args.merge_mb, args.repeat = 64, 16, 1
    srcs = (os.path.abspath(args.old), os.path.abspath(args.new))
    for src in srcs:
        compile_tree(src)
    load = os.getloadavg()
    print(f"paramtool old vs new, {datetime.datetime.now().isoformat(timespec='seconds')}; load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; cpus {os.cpu_count()}")
    print(f"old: {srcs[0]}\nnew: {srcs[1]}")
    print(f"{args.size_mb} MiB float32 checkpoint; runs alternated old/new, one warm-up each, then {args.repeat} each; "
          "wall and CPU (user+sys) are medians, RSS the largest; ratio = new/old.\n")
    header = ("command", "old wall s", "new wall s", "wall new/old", "old CPU s", "new CPU s", "CPU new/old",
              "old MB", "new MB")
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" for _ in header) + " |", flush=True)
    work = tempfile.mkdtemp(prefix="paramtool-compare-")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # killed: the finally below still removes the files
    try:
        pt, st = bench.generate(work, args.size_mb)
        differs = bench.perturbed_copy(st, work)
        merge_dir = os.path.join(work, "merge")
        os.makedirs(merge_dir)
        merge_pt, first = bench.generate(merge_dir, args.merge_mb)
        os.unlink(merge_pt)
        second = bench.perturbed_copy(first, merge_dir)  # same names, values + 1e-3, then + 2e-3
        merge_sources = [first, second, bench.perturbed_copy(second, merge_dir)]
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        failures = []
        for label, command, outputs in rows(work, pt, st, differs, merge_sources):
            if wanted and not any(w in label for w in wanted):
                continue
            old, new = compare([PYTHON, "-m", "paramtool", *command], srcs, args.repeat, outputs)
            print("| " + " | ".join((label, cell(old, "wall", "{:.3f}"), cell(new, "wall", "{:.3f}"),
                                      ratio(old, new, "wall"), cell(old, "cpu", "{:.3f}"), cell(new, "cpu", "{:.3f}"),
                                      ratio(old, new, "cpu"), cell(old, "rss", "{:.0f}"),
                                      cell(new, "rss", "{:.0f}"))) + " |", flush=True)
            failures += [f"{label} ({side}): {r['error']}" for side, r in zip(("old", "new"), (old, new))
                         if r.get("error")]
        load = os.getloadavg()
        print(f"\nload average at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
        for f in failures:
            print(f"FAILED {f}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

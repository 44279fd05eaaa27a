"""paramtool against the obvious torch/safetensors scripts, measured in the same run.

    python benchmarks/bench.py [--sizes 100,1000] [--repeat 3] [--keep]

For each size it writes a checkpoint of float32 matrices (plus small biases) as a torch zip file and as
safetensors in a temporary directory, then times separate processes and reads their peak RSS (the
child's ``ru_maxrss``, as ``/usr/bin/time -v`` reports it):

- listing: ``paramtool inspect FILE --json`` vs ``torch.load(FILE, mmap=True, weights_only=True)`` + print
  (and, for safetensors, ``safetensors.torch.load_file`` + print, and ``safe_open`` + print);
- init: ``paramtool init FILE --scheme xavier -o OUT`` vs ``torch.load`` + ``nn.init.xavier_uniform_`` on every
  matrix + ``torch.save`` (``load_file``/``save_file`` for safetensors).

Each command runs once untimed (to warm the page cache the same way for both sides), then ``--repeat`` times;
the median time and the largest peak RSS are reported, with ratios baseline/paramtool for time (above 1:
paramtool is faster) and paramtool/baseline for memory (below 1: paramtool uses less).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PARAMTOOL = [sys.executable, "-m", "paramtool"]
MATRIX = 2048  # 2048 x 2048 float32 = 16 MiB per matrix

LIST_PT = """
import sys, torch
sd = torch.load(sys.argv[1], mmap=True, weights_only=True)
for k, v in sd.items():
    print(k, tuple(v.shape), v.dtype)
"""
LIST_ST_LOAD = """
import sys
from safetensors.torch import load_file
for k, v in load_file(sys.argv[1]).items():
    print(k, tuple(v.shape), v.dtype)
"""
LIST_ST_OPEN = """
import sys
from safetensors import safe_open
with safe_open(sys.argv[1], "pt") as f:
    for k in f.keys():
        print(k, f.get_slice(k).get_shape(), f.get_slice(k).get_dtype())
"""
INIT_PT = """
import sys, torch
sd = torch.load(sys.argv[1], weights_only=True)
g = torch.Generator().manual_seed(0)
for v in sd.values():
    if v.dim() >= 2:
        torch.nn.init.xavier_uniform_(v, generator=g)
torch.save(sd, sys.argv[2])
"""
INIT_ST = """
import sys, torch
from safetensors.torch import load_file, save_file
sd = load_file(sys.argv[1])
g = torch.Generator().manual_seed(0)
for v in sd.values():
    if v.dim() >= 2:
        torch.nn.init.xavier_uniform_(v, generator=g)
save_file(sd, sys.argv[2])
"""


def generate(directory: str, size_mb: int) -> tuple[str, str]:
    import torch
    from safetensors.torch import save_file

    n = max(1, round(size_mb * 2**20 / (MATRIX * MATRIX * 4)))
    g = torch.Generator().manual_seed(size_mb)
    sd = {}
    for i in range(n):
        sd[f"layers.{i}.weight"] = torch.randn(MATRIX, MATRIX, generator=g)
        sd[f"layers.{i}.bias"] = torch.zeros(MATRIX)
    pt, st = os.path.join(directory, f"ckpt_{size_mb}MB.pt"), os.path.join(directory, f"ckpt_{size_mb}MB.safetensors")
    torch.save(sd, pt)
    save_file(sd, st)
    return pt, st


def measure(cmd: list[str], repeat: int) -> tuple[float, float] | None:
    """(median seconds, max peak RSS in MiB) over ``repeat`` runs after one warm-up; None if it failed."""
    timer = ["/usr/bin/time", "-v"] if os.path.exists("/usr/bin/time") else []
    times, peaks = [], []
    for i in range(repeat + 1):
        start = time.perf_counter()
        p = subprocess.run(timer + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        elapsed = time.perf_counter() - start
        if p.returncode != 0:
            sys.stderr.write(f"FAILED: {' '.join(cmd)}\n{p.stderr[-2000:]}\n")
            return None
        if i == 0:
            continue  # warm-up
        times.append(elapsed)
        if timer:
            line = next(ln for ln in p.stderr.splitlines() if "Maximum resident set size" in ln)
            peaks.append(int(line.split(":")[1]) / 1024)
        else:
            peaks.append(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    return statistics.median(times), max(peaks)


def row(size: int, fmt: str, op: str, ours: tuple | None, base: tuple | None, base_name: str) -> str:
    if ours is None or base is None:
        return f"| {size} MB | {fmt} | {op} | FAILED | | | | | | {base_name} |"
    return (f"| {size} MB | {fmt} | {op} | {ours[0]:.3f} | {base[0]:.3f} | **{base[0] / ours[0]:.1f}×** | "
            f"{ours[1]:.0f} | {base[1]:.0f} | **{ours[1] / base[1]:.2f}** | {base_name} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000", help="checkpoint sizes in MB, comma-separated")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    import torch

    print(f"paramtool benchmark, {datetime.date.today()} — {platform.platform()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, torch {torch.__version__}")
    print("time: median of %d runs after a warm-up; RSS: peak resident set of the process\n" % args.repeat)
    print("| size | format | operation | paramtool s | baseline s | speed-up | paramtool MiB | baseline MiB | "
          "RSS ratio | baseline |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    work = tempfile.mkdtemp(prefix="paramtool-bench-")
    listing: dict[str, list[float]] = {"pt": [], "safetensors": []}
    try:
        for size in sizes:
            pt, st = generate(work, size)
            py = [sys.executable, "-c"]
            for fmt, path in (("pt", pt), ("safetensors", st)):
                ours = measure(PARAMTOOL + ["inspect", path, "--json"], args.repeat)
                if ours:
                    listing[fmt].append(ours[0])
                baselines = [("torch.load(mmap=True) + print", LIST_PT)] if fmt == "pt" else [
                    ("load_file + print", LIST_ST_LOAD), ("safe_open + print", LIST_ST_OPEN)]
                for name, script in baselines:
                    print(row(size, fmt, "inspect --json", ours, measure(py + [script, path], args.repeat), name),
                          flush=True)
                out = os.path.join(work, "out" + os.path.splitext(path)[1])
                ours = measure(PARAMTOOL + ["init", path, "--scheme", "xavier", "--seed", "0", "-o", out], args.repeat)
                base = measure(py + [INIT_PT if fmt == "pt" else INIT_ST, path, out], args.repeat)
                name = "torch.load + xavier_uniform_ + torch.save" if fmt == "pt" else "load_file + xavier + save_file"
                print(row(size, fmt, "init --scheme xavier", ours, base, name), flush=True)
            os.unlink(pt)
            os.unlink(st)
        print()
        for fmt, times in listing.items():
            if len(times) > 1:
                print(f"size-independence ({fmt}): inspect time at {sizes[-1]} MB / at {sizes[0]} MB = "
                      f"{times[-1] / times[0]:.2f}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

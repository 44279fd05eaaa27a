"""Peak memory and time of ``paramtool merge`` against the obvious load-everything script.

    python benchmarks/bench_merge.py [--size-mb 512] [--sources 3] [--keep]

SOURCES float32 state dicts of SIZE MiB each (64 MiB matrices, different values, same names) are written as
``.safetensors`` and ``.pt`` into a temporary directory. Each command then runs in a fresh process: paramtool's
``merge`` (equal weights, the average), and the script a user writes by hand, which loads every source whole
(``load_file`` / ``torch.load``), averages in float32 and saves. Reported: wall seconds and peak RSS (``ru_maxrss``
of the child), and the ratio paramtool / script. paramtool holds about one tensor per source at a time; the
script holds every source. Not a test: memory is a property of the machine, so it is measured here.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

BASELINE = {
    "safetensors": "import sys, torch; from safetensors.torch import load_file, save_file\n"
                   "sds = [load_file(p) for p in sys.argv[2:]]\n"
                   "save_file({k: sum(sd[k] for sd in sds) / len(sds) for k in sds[0]}, sys.argv[1])",
    "pt": "import sys, torch\n"
          "sds = [torch.load(p, weights_only=True) for p in sys.argv[2:]]\n"
          "torch.save({k: sum(sd[k] for sd in sds) / len(sds) for k in sds[0]}, sys.argv[1])",
}
PEAK = ("import resource,subprocess,sys; r=subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")


def peak(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of ``cmd`` run in a fresh process."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PEAK, *cmd], capture_output=True, text=True, check=True)
    return time.perf_counter() - start, int(out.stdout.strip().splitlines()[-1]) / 1024


def make(directory: str, size_mb: int, count: int) -> dict[str, list[str]]:
    import torch
    from safetensors.torch import save_file

    paths: dict[str, list[str]] = {"safetensors": [], "pt": []}
    for s in range(count):
        g = torch.Generator().manual_seed(s)
        sd, left, i = {}, size_mb * 2**20 // 4, 0
        while left > 0:
            n = min(left, 4096 * 4096)
            sd[f"layers.{i}.weight"] = torch.randn(max(n // 4096, 1), min(n, 4096), generator=g)
            left -= sd[f"layers.{i}.weight"].numel()
            i += 1
        for fmt in paths:
            path = os.path.join(directory, f"src{s}.{fmt}")
            save_file(sd, path) if fmt == "safetensors" else torch.save(sd, path)
            paths[fmt].append(path)
        del sd
    return paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=512)
    ap.add_argument("--sources", type=int, default=3)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    directory = tempfile.mkdtemp(prefix="bench-merge-")
    env_src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    os.environ["PYTHONPATH"] = env_src + os.pathsep + os.environ.get("PYTHONPATH", "")
    try:
        paths = make(directory, args.size_mb, args.sources)
        print(f"merge of {args.sources} x {args.size_mb} MiB (float32, equal weights)")
        for fmt, inputs in paths.items():
            ours = peak([sys.executable, "-m", "paramtool", "merge", *inputs, "-o", os.path.join(directory, "ours." + fmt)])
            base = peak([sys.executable, "-c", BASELINE[fmt], os.path.join(directory, "base." + fmt), *inputs])
            print(f"{fmt:12} paramtool {ours[0]:6.1f} s {ours[1]:7.0f} MiB   script {base[0]:6.1f} s {base[1]:7.0f} MiB"
                  f"   RSS ratio {ours[1] / base[1]:.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()

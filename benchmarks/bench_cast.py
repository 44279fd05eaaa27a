"""Peak memory of ``paramtool convert --dtype bf16`` against ``load + .to(bfloat16) + save``.

    python benchmarks/bench_cast.py [--size-mb 1024] [--keep]

A float32 state dict of SIZE MiB (64 MiB matrices) is written as ``.pt`` and ``.safetensors`` into a temporary
directory; each command then runs in a fresh process, and its peak RSS (``ru_maxrss`` of that child) is
reported with the ratio paramtool / baseline (the issue asks for <= 0.3). Not a test: memory is a property of
the machine, so it is measured here, not asserted in the suite.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

BASELINE = {
    "pt": "import torch,sys; sd=torch.load(sys.argv[1], weights_only=True); "
          "torch.save({k: v.to(torch.bfloat16) for k, v in sd.items()}, sys.argv[2])",
    "safetensors": "import torch,sys; from safetensors.torch import load_file, save_file; sd=load_file(sys.argv[1]); "
                   "save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, sys.argv[2])",
}
PEAK = ("import resource,subprocess,sys; r=subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")


def peak_mib(cmd: list[str]) -> float:
    out = subprocess.run([sys.executable, "-c", PEAK, *cmd], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def make(directory: str, size_mb: int) -> dict[str, str]:
    import torch
    from safetensors.torch import save_file

    sd, left, i = {}, size_mb * 2**20 // 4, 0
    while left > 0:
        n = min(left, 4096 * 4096)
        sd[f"w{i}"] = torch.randn(n // 4096 or 1, min(n, 4096))
        left -= sd[f"w{i}"].numel()
        i += 1
    paths = {"pt": os.path.join(directory, "ckpt.pt"), "safetensors": os.path.join(directory, "ckpt.safetensors")}
    torch.save(sd, paths["pt"])
    save_file(sd, paths["safetensors"])
    return paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    directory = tempfile.mkdtemp(prefix="bench-cast-")
    try:
        paths = make(directory, args.size_mb)
        for fmt, path in paths.items():
            ours = peak_mib([sys.executable, "-m", "paramtool", "convert", path, "--dtype", "bf16",
                             "-o", os.path.join(directory, "ours." + fmt)])
            base = peak_mib([sys.executable, "-c", BASELINE[fmt], path, os.path.join(directory, "base." + fmt)])
            print(f"{fmt:12} {args.size_mb} MiB  paramtool {ours:8.0f} MiB  baseline {base:8.0f} MiB  "
                  f"ratio {ours / base:.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()

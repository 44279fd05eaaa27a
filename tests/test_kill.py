"""SIGKILL at random points during writes: the target is always the old file or the complete new one."""
from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch


def digest(path) -> str:
    """Content hash; for a torch zip, every record but the random serialization id torch writes."""
    data = open(path, "rb").read()
    if data[:4] != b"PK\x03\x04":
        return hashlib.sha256(data).hexdigest()
    h = hashlib.sha256()
    with zipfile.ZipFile(path) as z:
        for info in sorted(z.infolist(), key=lambda i: i.filename):
            if not info.filename.endswith(".data/serialization_id"):
                h.update(info.filename.split("/", 1)[1].encode() + z.read(info))
    return h.hexdigest()


@pytest.mark.parametrize("kind", ["init-in-place-pt", "init-in-place-safetensors", "convert"])
def test_sigkill_leaves_old_or_new(tmp_path, kind):
    g = torch.Generator().manual_seed(0)
    sd = {f"l.{i}.weight": torch.randn(512, 512, generator=g) for i in range(64)}  # 64 MiB: writing takes long enough to be hit
    ext = ".safetensors" if kind.endswith("safetensors") else ".pt"
    original = tmp_path / f"orig{ext}"
    if ext == ".pt":
        torch.save(sd, original)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(original))
    exe = [sys.executable, "-m", "paramtool"]
    if kind == "convert":
        target = tmp_path / "target.safetensors"
        target.write_bytes(b"old contents")
        args = ["convert", str(original), str(target)]
    else:
        target = tmp_path / f"target{ext}"
        target.write_bytes(original.read_bytes())
        args = ["init", str(target), "--scheme", "xavier", "--seed", "1", "--in-place"]
    old = digest(target)
    # the complete new file, from an uninterrupted run on a copy
    reference = tmp_path / f"ref{target.suffix}"
    reference.write_bytes(target.read_bytes())
    ref_args = [reference if a == str(target) else a for a in args]
    assert subprocess.run(exe + [str(a) for a in ref_args], capture_output=True).returncode == 0
    new = digest(reference)
    rng = random.Random(kind)
    outcomes = set()
    for _ in range(5):
        p = subprocess.Popen(exe + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 3.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        state = digest(target)
        assert state in (old, new), "target is neither the old nor the new file"
        outcomes.add(state == new)
        if state == new:  # start the next round from the old file again
            target.write_bytes(original.read_bytes() if kind != "convert" else b"old contents")
        for stale in tmp_path.glob(".*paramtool-tmp"):
            stale.unlink()  # a killed run cannot clean up; its temporary file never replaces the target
    # a clean run leaves no temporary file behind
    assert subprocess.run(exe + args, capture_output=True).returncode == 0
    assert digest(target) == new
    assert not list(tmp_path.glob(".*paramtool-tmp"))

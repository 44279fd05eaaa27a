"""Both cores for value commands: a bounded pool that reads one storage ahead while others are computed.

Reading (page faults on mapped storages, ``os.preadv``) happens inside torch's kernels and file writes, which
release the GIL, so threads are enough. At most
``workers + 1`` items are in flight, so memory stays near (workers + 1) x the largest storage whatever the
checkpoint's size; results come back in input order. torch's own intra-op threads are lowered for the
duration, so the pool and torch do not fight over the same cores.
"""
from __future__ import annotations

import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


_local = threading.local()
SCRATCH = 1 << 18  # float64 values: 2 MiB, small enough for the passes over it to stay in the CPU cache


def scratch(n: int, slot: int = 0) -> Any:
    """This thread's reusable float64 buffer number ``slot``, ``n`` values long: chunk after chunk reuses
    the same (cache-warm) memory instead of faulting in fresh pages."""
    import torch

    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get(slot)
    if buf is None or buf.numel() < n:
        buf = bufs[slot] = torch.empty(max(n, SCRATCH), dtype=torch.float64)
    return buf[:n]


def default_workers() -> int:
    """Two workers where there are two or more cores (the pool is I/O plus one compute stream each)."""
    return max(1, min(2, os.cpu_count() or 1))


@contextmanager
def torch_threads(workers: int) -> Iterator[None]:
    """Give each pool worker its share of the cores for torch's intra-op parallelism, then restore."""
    torch = sys.modules.get("torch")
    if torch is None:  # nothing to tune (and no reason to import it: byte-level work needs no torch)
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, workers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> Iterator[R]:
    """``fn(item)`` for every item, in order, ``workers`` at a time plus one read ahead.

    With one worker (or one item) this runs inline: no threads, identical results.
    """
    items = list(items)
    workers = default_workers() if workers is None else workers
    if workers <= 1 or len(items) <= 1:
        for item in items:
            yield fn(item)
        return
    window = workers + 1
    with torch_threads(workers), ThreadPoolExecutor(max_workers=window) as pool:
        pending: deque[Future[Any]] = deque()
        it = iter(items)
        try:
            for item in it:
                pending.append(pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # an error or an abandoned generator: nothing new starts, running work finishes
            for f in pending:
                f.cancel()

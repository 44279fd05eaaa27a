"""Per-tensor statistics and histograms, computed chunk by chunk so memory stays bounded by the chunk.

A 10 GB memory-mapped checkpoint is read a few million values at a time; nothing is materialised whole.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

CHUNK = 1 << 22  # values per chunk: 32 MiB as float64


@dataclass
class TensorStats:
    name: str
    numel: int
    mean: float
    std: float
    min: float
    max: float
    zeros: float  # fraction of exact zeros
    norm: float  # L2
    nan: int
    inf: int

    def as_json(self) -> dict:
        return {k: _num(v) for k, v in self.__dict__.items()}


def _num(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def _chunks(t: Any):
    flat = t.detach().reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        yield flat[start : start + CHUNK]


def tensor_stats(name: str, t: Any) -> TensorStats:
    """mean/std/min/max as torch computes them (NaN propagates), plus zeros, L2 norm and NaN/Inf counts."""
    import torch

    n = t.numel()
    if n == 0:
        nan = float("nan")
        return TensorStats(name, 0, nan, nan, nan, nan, 0.0, 0.0, 0, 0)
    count = 0
    mean = 0.0
    m2 = 0.0  # Chan et al.'s parallel variance: merge chunk means and squared deviations
    lo, hi = math.inf, -math.inf
    zeros = nans = infs = 0
    sumsq = 0.0
    saw_nan = False
    for chunk in _chunks(t):
        c = chunk.to(torch.float64) if chunk.dtype != torch.bool else chunk.to(torch.float64)
        k = c.numel()
        cm = c.mean().item()
        cm2 = ((c - cm) ** 2).sum().item()
        delta = cm - mean
        total = count + k
        mean += delta * k / total
        m2 += cm2 + delta * delta * count * k / total
        count = total
        isnan = torch.isnan(c)
        nans += int(isnan.sum())
        infs += int(torch.isinf(c).sum())
        saw_nan = saw_nan or bool(isnan.any())
        lo = min(lo, c.min().item())
        hi = max(hi, c.max().item())
        zeros += int((c == 0).sum())
        sumsq += (c * c).sum().item()
    std = math.sqrt(m2 / (count - 1)) if count > 1 else float("nan")
    if saw_nan:
        mean = std = lo = hi = float("nan")
    return TensorStats(name, n, mean, std, lo, hi, zeros / n, math.sqrt(sumsq), nans, infs)


# --- histograms --------------------------------------------------------------------------------------


@dataclass
class Histogram:
    """Bins over the finite non-zero values; exact zeros get a bin of their own so a spike shows."""

    edges: list[float]  # len(counts) + 1, with zero as an edge when the range spans it
    counts: list[int]
    zeros: int
    zero_at: int  # index into counts before which the zero row goes (-1: no zero row)
    nonfinite: int


def histogram(t: Any, bins: int = 20) -> Histogram:
    import torch

    lo = hi = None
    zeros = nonfinite = 0
    for chunk in _chunks(t):
        c = chunk.to(torch.float64)
        finite = c[torch.isfinite(c)]
        nonfinite += c.numel() - finite.numel()
        nz = finite[finite != 0]
        zeros += finite.numel() - nz.numel()
        if nz.numel():
            lo = nz.min().item() if lo is None else min(lo, nz.min().item())
            hi = nz.max().item() if hi is None else max(hi, nz.max().item())
    if lo is None:
        return Histogram([0.0, 0.0], [0], zeros, 0 if zeros else -1, nonfinite)
    if lo < 0 < hi:  # split the bins at zero, in proportion to each side's width
        neg = min(bins - 1, max(1, round(bins * -lo / (hi - lo))))
        pos = bins - neg
        edges = [lo + (0 - lo) * i / neg for i in range(neg)] + [0.0] + [hi * i / pos for i in range(1, pos + 1)]
        zero_at = neg
    else:
        if hi == lo:
            edges = [lo, hi]
        else:
            edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
        zero_at = (0 if lo > 0 else len(edges) - 1) if zeros else -1
    counts = [0] * (len(edges) - 1)
    edge_t = torch.tensor(edges[1:-1], dtype=torch.float64)
    for chunk in _chunks(t):
        c = chunk.to(torch.float64)
        c = c[torch.isfinite(c) & (c != 0)]
        if c.numel() == 0:
            continue
        # bins are [lo, hi), the last one closed; zeros were counted apart
        idx = torch.bucketize(c, edge_t, right=True)
        for i, n in enumerate(torch.bincount(idx, minlength=len(counts)).tolist()):
            counts[i] += n
    return Histogram(edges, counts, zeros, zero_at if zeros else -1, nonfinite)


BLOCKS = " ▏▎▍▌▋▊▉█"


def bar(count: int, top: int, width: int) -> str:
    if top <= 0 or count <= 0:
        return ""
    eighths = max(1, round(count / top * width * 8))
    full, part = divmod(eighths, 8)
    return "█" * full + (BLOCKS[part] if part else "")


def histogram_lines(h: Histogram, width: int = 40) -> list[str]:
    """Rows of ``[lo, hi) │ bar count``; the exact-zero row is labelled ``= 0``."""
    rows: list[tuple[str, int]] = []
    for i, n in enumerate(h.counts):
        if i == h.zero_at:
            rows.append(("= 0", h.zeros))
        rows.append((f"{h.edges[i]:>10.4g} .. {h.edges[i + 1]:<10.4g}", n))
    if h.zero_at == len(h.counts):
        rows.append(("= 0", h.zeros))
    top = max((n for _, n in rows), default=0)
    label_w = max(len(label) for label, _ in rows)
    lines = [f"{label:>{label_w}} │{bar(n, top, width):<{width}} {n:,}" for label, n in rows]
    if h.nonfinite:
        lines.append(f"{'nan/inf':>{label_w}} │ {h.nonfinite:,}")
    return lines


def histogram_png(named: list[tuple[str, Any]], path: str) -> None:
    """The same histograms as an image; needs matplotlib (the ``plot`` extra)."""
    from .errors import ParamtoolError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ParamtoolError("--hist-png needs matplotlib: pip install 'paramtool[plot]'") from None
    import torch

    fig, axes = plt.subplots(len(named), 1, figsize=(8, 2.2 * len(named)), squeeze=False)
    for ax, (name, t) in zip(axes[:, 0], named):
        values = t.detach().reshape(-1).to(torch.float32)
        values = values[torch.isfinite(values)]
        ax.hist(values.numpy(), bins=60)
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)

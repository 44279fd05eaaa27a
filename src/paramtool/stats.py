"""Per-tensor statistics and histograms, computed chunk by chunk so memory stays bounded by the chunk.

A 10 GB memory-mapped checkpoint is read a few million values at a time; nothing is materialised whole.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .formats.dtypes import NUMPY, TORCH_MINMAX
from .pipeline import scratch
from .records import dataclass

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

CHUNK = 1 << 18  # values per chunk: 2 MiB as float64, so the passes over one chunk run from the CPU cache



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
        return dict(self.__dict__)  # (render.dumps writes non-finite numbers as "nan", "inf", "-inf")


def _chunks(t: Any):
    flat = t.detach().reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        yield flat[start : start + CHUNK]


@dataclass
class _Moments:
    """Running count, mean and sum of squared deviations (Chan et al.'s merge), sum of squares, extremes."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    sumsq: float = 0.0
    total: float = 0.0  # plain sum: the mean when infinities make the running mean meaningless
    lo: float = math.inf
    hi: float = -math.inf
    zeros: int = 0
    nan: int = 0
    inf: int = 0

    def add(self, chunk: Any) -> None:
        """One torch chunk (see ``_torch_moments``)."""
        self.merge(*_torch_moments(chunk))

    def merge(self, k: int, lo: float, hi: float, zeros: int, s: float, sumsq: float, m2: float, nan: int,
              inf: int) -> None:
        """One chunk's own numbers (count, extremes, zeros, sum, sum of squares, squared deviations from its
        mean, NaN/Inf counts) merged into the running ones."""
        self.zeros += zeros
        self.total += s
        self.sumsq += sumsq
        self.nan += nan
        self.inf += inf
        cm = s / k
        delta = cm - self.mean
        total = self.count + k
        self.mean += delta * k / total
        self.m2 += m2 + delta * delta * self.count * k / total
        self.count = total
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)

    def result(self, name: str) -> TensorStats:
        n = self.count
        std = math.sqrt(self.m2 / (n - 1)) if n > 1 and not self.inf else float("nan")
        mean, lo, hi = self.mean, self.lo, self.hi
        if self.inf:  # +inf (or -inf, or both: NaN), as torch's mean gives
            mean = self.total / n
        if self.nan:  # NaN propagates, as in torch
            mean = std = lo = hi = float("nan")
        return TensorStats(name, n, mean, std, lo, hi, self.zeros / n, math.sqrt(self.sumsq), self.nan, self.inf)


def _torch_moments(chunk: Any) -> tuple[int, float, float, int, float, float, float, int, int]:
    """One chunk's numbers with torch: its own dtype for min/max and zeros, one float64 copy for the exact sums.

    The chunk's squared deviations are ``sumsq - sum * mean`` when that loses at most 6 bits (the chunk's mean
    within 8 standard deviations of zero, as weights are); otherwise they are taken from the chunk's own mean
    (two more passes over a cache-resident buffer), so the variance is as exact as torch's float64
    computation, whatever the data's offset (``numeric.moments`` does the same with numpy).
    """
    import torch

    k = chunk.numel()
    own = chunk if str(chunk.dtype).removeprefix("torch.") in TORCH_MINMAX else None
    wide = scratch(k)
    wide.copy_(chunk.real if chunk.is_complex() else chunk)
    lo, hi = torch.aminmax(own if own is not None else wide)
    zeros = k - int(torch.count_nonzero(own if own is not None else wide))
    s = wide.sum().item()
    sumsq = torch.dot(wide, wide).item()
    nan = inf = 0
    if not math.isfinite(s):  # NaN/Inf present: count them (only then)
        nan = int(torch.isnan(wide).sum())
        inf = int(torch.isinf(wide).sum())
    m2 = sumsq - s * (s / k)
    if not (m2 > sumsq / 64 and math.isfinite(m2)):  # cancellation (or overflow): deviations from the mean
        wide.sub_(s / k)
        d = wide.sum().item()  # what rounding left of the mean: the corrected two-pass formula takes it out
        m2 = torch.dot(wide, wide).item() - d * d / k
    return k, float(lo), float(hi), zeros, s, sumsq, m2, nan, inf


def raw_stats(name: str, raw: Any, dtype: str) -> TensorStats:
    """``tensor_stats`` from a tensor's bytes with numpy (``numeric``): no torch needed."""
    from . import numeric

    acc = _Moments()
    with numeric.quiet():
        for x in numeric.values(raw, dtype):
            acc.merge(*numeric.moments(x))
    if acc.count == 0:
        nan = float("nan")
        return TensorStats(name, 0, nan, nan, nan, nan, 0.0, 0.0, 0, 0)
    return acc.result(name)


def raw_reader(ckpt: Checkpoint) -> Callable[[str], tuple[Any, str] | None]:
    """``name -> (bytes, dtype)`` for the tensors of ``ckpt`` whose bytes are at hand without torch, in a dtype
    ``numeric`` reads; None for the others (they go through torch)."""
    from . import numeric

    dtypes = {i.name: i.dtype for i in ckpt.infos()}

    def raw_of(name: str) -> tuple[Any, str] | None:
        dtype = dtypes.get(name)
        if dtype not in NUMPY:
            return None
        raw = ckpt.raw_bytes(name)  # (asked first: a remote read is under way while numpy is first imported)
        return None if raw is None or not numeric.supports(dtype) else (raw, dtype)

    return raw_of


def tensor_stats(name: str, t: Any) -> TensorStats:
    """mean/std/min/max as torch computes them (NaN propagates), plus zeros, L2 norm and NaN/Inf counts."""
    from .values import readable

    t = readable(t, name)
    if t.numel() == 0:
        nan = float("nan")
        return TensorStats(name, 0, nan, nan, nan, nan, 0.0, 0.0, 0, 0)
    acc = _Moments()
    for chunk in _chunks(t):
        acc.add(chunk)
    return acc.result(name)


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
    from .values import readable

    t = readable(t)
    return _histogram(lambda: _torch_nonzero(t), bins, _torch_bucket_counts)


def raw_histogram(raw: Any, dtype: str, bins: int = 20) -> Histogram:
    """``histogram`` from a tensor's bytes with numpy (``numeric``): the same bins and counts, no torch."""
    from . import numeric

    def nonzero() -> Iterator[tuple[Any, int, int]]:
        return (numeric.finite_nonzero(x) for x in numeric.values(raw, dtype))

    return _histogram(nonzero, bins, numeric.bucket_counts)


def _torch_nonzero(t: Any) -> Iterator[tuple[Any, int, int]]:
    """Per chunk: its finite non-zero values in float64, its zeros, its non-finite values."""
    import torch

    for chunk in _chunks(t):
        c = chunk.to(torch.float64)
        finite = c[torch.isfinite(c)]
        nz = finite[finite != 0]
        yield nz, finite.numel() - nz.numel(), c.numel() - finite.numel()


def _torch_bucket_counts(values: Any, edges: list[float], n: int) -> list[int]:
    """How many values fall in each of ``n`` bins; a bin is [edge, next edge), the last one closed."""
    import torch

    idx = torch.bucketize(values, torch.tensor(edges[1:-1], dtype=torch.float64), right=True)
    return torch.bincount(idx, minlength=n).tolist()


def _histogram(nonzero: Callable[[], Iterator[tuple[Any, int, int]]], bins: int,
               bucket_counts: Callable[[Any, list[float], int], list[int]]) -> Histogram:
    """Two passes over ``nonzero()`` (chunks of finite non-zero float64 values, with their zero and non-finite
    counts): the range, then the counts in bins laid out over it."""
    lo = hi = None
    zeros = nonfinite = 0
    for nz, z, nf in nonzero():
        zeros += z
        nonfinite += nf
        if len(nz):
            lo = float(nz.min()) if lo is None else min(lo, float(nz.min()))
            hi = float(nz.max()) if hi is None else max(hi, float(nz.max()))
    if lo is None:
        return Histogram([0.0, 0.0], [0], zeros, 0 if zeros else -1, nonfinite)
    if lo < 0 < hi:  # split the bins at zero, in proportion to each side's width
        share = bins * -lo / (hi - lo)
        if not math.isfinite(share):  # a range near float64's limits: the same share, without overflowing
            share = bins / (1 + hi / -lo)
        neg = min(bins - 1, max(1, round(share)))
        pos = bins - neg
        edges = [lo + (0 - lo) * i / neg for i in range(neg)] + [0.0] + [hi * i / pos for i in range(1, pos + 1)]
        if not all(map(math.isfinite, edges)):  # a range near float64's limits: scaled first
            edges = [lo + (-lo / neg) * i for i in range(neg)] + [0.0] + [(hi / pos) * i for i in range(1, pos)] + [hi]
        zero_at = neg
    else:
        if hi == lo:
            edges = [lo, hi]
        else:
            edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
            if not all(map(math.isfinite, edges)):  # a range near float64's limits: scaled first
                edges = [lo + (hi / bins - lo / bins) * i for i in range(bins)] + [hi]
        zero_at = (0 if lo > 0 else len(edges) - 1) if zeros else -1
    counts = [0] * (len(edges) - 1)
    for nz, _, _ in nonzero():
        if len(nz) == 0:
            continue
        # bins are [lo, hi), the last one closed; zeros were counted apart
        for i, n in enumerate(bucket_counts(nz, edges, len(counts))):
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


PNG_BINS = 60


def histogram_png(named: list[tuple[str, Histogram]], path: str) -> None:
    """The histograms as an image, drawn from counts already taken in the one pass over the values
    (nothing is read twice, no tensor is held); needs matplotlib (the ``plot`` extra)."""
    from .errors import ParamtoolError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ParamtoolError("--hist-png needs matplotlib: pip install 'paramtool[plot]'") from None

    fig, axes = plt.subplots(max(1, len(named)), 1, figsize=(8, 2.2 * max(1, len(named))), squeeze=False)
    for ax, (name, h) in zip(axes[:, 0], named):
        ax.stairs(h.counts, h.edges, fill=True)
        if h.zeros:  # exact zeros: a bar of their own at 0, as in the terminal histogram
            width = (h.edges[-1] - h.edges[0]) / max(1, len(h.counts)) or 1.0
            ax.bar([0.0], [h.zeros], width=width, color="tab:orange")
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


@dataclass
class StatsRun:
    """What ``stats`` reports for a selection: numbers per tensor, and the histograms asked for."""

    results: list[TensorStats]
    hists: dict[str, Histogram]
    png: dict[str, Histogram]


def stats_many(tensor_of: Callable[[str], Any], names: list[str], bins: int | None, png: bool,
               advance: Callable[[], None] = lambda: None, workers: int | None = None,
               raw_of: Callable[[str], tuple[Any, str] | None] | None = None) -> StatsRun:
    """Every selected tensor read once (two at a time, one read ahead) for its numbers and histograms;
    only the numbers are kept, so memory is a few storages whatever the checkpoint's size.

    ``raw_of`` (see ``raw_reader``): tensors whose bytes it gives are computed with numpy, without torch; without
    histograms (one pass over the values), as the bytes arrive where the reader can hand them over so
    (``numeric.streamed``: a large remote storage, computed on while it is received)."""
    from .pipeline import ordered_map

    def raw_bytes(name: str) -> tuple[Any, str] | None:
        if raw_of is None:
            return None
        if bins or png:  # (a histogram reads the values twice: the range, then the counts)
            return raw_of(name)
        from . import numeric

        with numeric.streamed():
            return raw_of(name)

    def one(name: str) -> tuple[TensorStats, Histogram | None, Histogram | None]:
        raw = raw_bytes(name)
        if raw is not None:
            return (raw_stats(name, *raw), raw_histogram(*raw, bins) if bins else None,
                    raw_histogram(*raw, PNG_BINS) if png else None)
        t = tensor_of(name)
        r = tensor_stats(name, t)
        h = histogram(t, bins) if bins else None
        p = histogram(t, PNG_BINS) if png else None
        return r, h, p

    out = StatsRun([], {}, {})
    for name, (r, h, p) in zip(names, ordered_map(one, names, workers)):
        out.results.append(r)
        if h is not None:
            out.hists[name] = h
        if p is not None:
            out.png[name] = p
        advance()
    return out

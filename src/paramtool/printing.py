"""``show`` without torch: what ``print(t)`` prints, rebuilt from a tensor's raw bytes with numpy.

Importing torch costs about 1.5 s, so ``show`` of a 64-element bias paid 30 times its work. Where the bytes are
at hand as stored (``Checkpoint.raw_bytes``: a tensor that is its whole storage, contiguous), this module does
what torch's ``_tensor_str`` does under its default print options (precision 4, threshold 1000, edge items 3,
line width 80), step by step, over numpy arrays; the numbers reach Python's float and int formatting as the same
Python objects ``Tensor.item()``/``tolist()`` give, so the text is torch's byte for byte. It takes only the dtypes
for which that holds: float32, float64, the signed integers, uint8 and bool. float16 and bfloat16 (torch decides
their layout in their own precision), float8, complex and everything else go through torch.
"""
from __future__ import annotations

import math

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any

from .formats.dtypes import NUMPY, PRINTED, UNSUFFIXED

PRECISION, THRESHOLD, EDGE, LINEWIDTH = 4, 1000, 3, 80  # torch's default print options
PREFIX = "tensor("


def supports(dtype: str) -> bool:
    """Can ``tensor_text`` print this dtype as torch does (and is numpy installed)?"""
    from . import numeric

    return dtype in PRINTED and numeric.supports(dtype)


def array(raw: Any, dtype: str, shape: list[int] | tuple[int, ...]) -> Any:
    """The tensor's values as a numpy array over ``raw`` (no copy)."""
    from . import numeric

    return numeric.numpy().frombuffer(raw, dtype=NUMPY[dtype]).reshape(tuple(shape))


def values_json(name: str, raw: Any, dtype: str, shape: list[int] | tuple[int, ...]) -> dict:
    """``show --json``'s document (``values.tensor_json``), from the bytes."""
    from .values import json_doc

    return json_doc(name, list(shape), dtype, array(raw, dtype, shape).tolist())


class _Formatter:
    """torch's ``_Formatter``: one width, and fixed, integer or scientific notation, for every value printed."""

    def __init__(self, a: Any, floating: bool) -> None:
        from . import numeric

        np = numeric.numpy()
        self.floating, self.int_mode, self.sci_mode, self.max_width = floating, True, False, 1
        flat = a.reshape(-1)
        if not floating:  # an integer's text is longest at the smallest or the largest value
            if flat.size:
                ends = [bool(v) for v in np.unique(flat)] if flat.dtype == bool else [flat.min().item(), flat.max().item()]
                self.max_width = max(len(f"{v}") for v in ends)
            return
        with numeric.quiet():
            vals = flat[np.isfinite(flat) & (flat != 0)]
            if vals.size == 0:
                return
            magnitude = np.abs(vals).astype(np.float64)
            low, high = magnitude.min(), magnitude.max()
            self.int_mode = bool(np.all(vals == np.ceil(vals)))
            self.sci_mode = bool(high / low > 1000.0 or high > 1.0e8 or low < 1.0e-4)
        if self.sci_mode:
            spec, extra = f".{PRECISION}e", 0
        elif self.int_mode:
            spec, extra = ".0f", 1  # the "." every integer-valued float gets
        else:
            spec, extra = f".{PRECISION}f", 0
        self.max_width = max(self.max_width, max(len(format(v, spec)) + extra for v in vals.tolist()))

    def format(self, value: Any) -> str:
        if not self.floating:
            text = f"{value}"
        elif self.sci_mode:
            text = f"{value:{self.max_width}.{PRECISION}e}"
        elif self.int_mode:
            text = f"{value:.0f}" + ("" if math.isinf(value) or math.isnan(value) else ".")
        else:
            text = f"{value:.{PRECISION}f}"
        return (self.max_width - len(text)) * " " + text


def _summarized(a: Any) -> Any:
    """torch's ``get_summarized_data``: the values an elided print shows (the edge items of every dimension)."""
    from . import numeric

    np = numeric.numpy()
    if a.ndim == 0:
        return a
    if a.ndim == 1:
        return np.concatenate((a[:EDGE], a[-EDGE:])) if a.shape[0] > 2 * EDGE else a
    rows = list(a[:EDGE]) + list(a[-EDGE:]) if a.shape[0] > 2 * EDGE else list(a)
    return np.stack([_summarized(r) for r in rows])


def _vector(a: Any, indent: int, summarize: bool, fmt: _Formatter) -> str:
    per_line = max(1, math.floor((LINEWIDTH - indent) / (fmt.max_width + 2)))
    if summarize and a.shape[0] > 2 * EDGE:
        data = [fmt.format(v) for v in a[:EDGE].tolist()] + [" ..."] + [fmt.format(v) for v in a[-EDGE:].tolist()]
    else:
        data = [fmt.format(v) for v in a.tolist()]
    lines = [", ".join(data[i : i + per_line]) for i in range(0, len(data), per_line)]
    return "[" + (",\n" + " " * (indent + 1)).join(lines) + "]"


def _nested(a: Any, indent: int, summarize: bool, fmt: _Formatter) -> str:
    """torch's ``_tensor_str_with_formatter``."""
    if a.ndim == 0:
        return fmt.format(a.item())
    if a.ndim == 1:
        return _vector(a, indent, summarize, fmt)
    n = a.shape[0]
    rows = list(range(EDGE)) + [None] + list(range(n - EDGE, n)) if summarize and n > 2 * EDGE else list(range(n))
    slices = ["..." if i is None else _nested(a[i], indent + 1, summarize, fmt) for i in rows]
    return "[" + ("," + "\n" * (a.ndim - 1) + " " * (indent + 1)).join(slices) + "]"


def _with_suffixes(text: str, suffixes: list[str], indent: int) -> str:
    """torch's ``_add_suffixes`` (its line length count included, one more than the line's)."""
    out = [text]
    last = len(text) - text.rfind("\n") + 1
    for suffix in suffixes:
        if last + len(suffix) + 2 > LINEWIDTH:
            out.append(",\n" + " " * indent + suffix)
            last = indent + len(suffix)
        else:
            out.append(", " + suffix)
            last += len(suffix) + 2
    return "".join(out) + ")"


def tensor_text(raw: Any, dtype: str, shape: list[int] | tuple[int, ...]) -> str:
    """``repr(t)`` of the CPU tensor of ``dtype`` and ``shape`` whose contiguous bytes are ``raw``."""
    a = array(raw, dtype, shape)
    indent = len(PREFIX)
    suffixes = []
    if a.size == 0:
        if a.ndim != 1:
            suffixes.append(f"size={tuple(a.shape)}")
        if dtype != "float32":
            suffixes.append(f"dtype=torch.{dtype}")
        body = "[]"
    else:
        if dtype not in UNSUFFIXED:
            suffixes.append(f"dtype=torch.{dtype}")
        summarize = a.size > THRESHOLD
        fmt = _Formatter(_summarized(a) if summarize else a, dtype.startswith("float"))
        body = _nested(a, indent, summarize, fmt)
    return _with_suffixes(PREFIX + body, suffixes, indent)

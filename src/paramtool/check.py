"""``check``: health rules over a checkpoint, one finding per problem, for CI gates.

The rules (each finding names its rule):

- ``nan``, ``inf``: a tensor holds NaN or infinite values (how many);
- ``zero``, ``constant``: a floating-point tensor of two or more dimensions whose values are all 0, or all one
  value (a dead layer). 1-D tensors are not judged: biases and norm gains start as zeros and ones;
- ``outlier``: among the same tensor of repeated blocks (``h.0.mlp.c_fc.weight`` … ``h.11.mlp.c_fc.weight``:
  names equal once their numbers are set aside, same shape and dtype, at least ``min_siblings`` of them), one
  whose std (matrices only) or root-mean-square is more than ``outlier_factor`` times the siblings' median, or
  less than the median divided by it. Siblings whose median is 0 are not judged;
- ``tie-diverged``: a tie the model directory's ``config.json`` declares (``tie_word_embeddings``) between
  tensors stored apart whose values differ: transformers would load them untied;
- ``optimizer-shape``: an optimizer's state (``exp_avg``, ``momentum_buffer``, …) whose shape is not its
  parameter's. State keyed by position is matched in order, skipping what has no state (buffers, frozen
  parameters); state keyed by name is matched by name;
- ``mixed-dtype``: the floating-point matrices (two or more dimensions) are in more than one dtype; 1-D tensors
  (norms kept in float32) are not counted.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Callable

from .checkpoint import Checkpoint
from .formats.dtypes import kind
from .records import dataclass, field
from .toc import TensorInfo, Toc

RULES = ("nan", "inf", "zero", "constant", "outlier", "tie-diverged", "optimizer-shape", "mixed-dtype")


@dataclass(frozen=True)
class Finding:
    rule: str
    name: str | None  # the tensor it is about; None for the checkpoint as a whole
    message: str

    def as_json(self) -> dict:
        return {"rule": self.rule, "name": self.name, "message": self.message}


@dataclass(frozen=True)
class Thresholds:
    outlier_factor: float = 8.0
    min_siblings: int = 3


@dataclass
class Report:
    source: str
    findings: list[Finding] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"source": self.source, "clean": not self.findings, "findings": [f.as_json() for f in self.findings]}


def check(ckpt: Checkpoint, toc: Toc, thresholds: Thresholds = Thresholds(),
          tensor_stats: Callable[[list[str]], list[Any]] | None = None) -> Report:
    """Every rule over ``ckpt``. ``tensor_stats(names)`` gives ``stats.TensorStats`` for the names (read once)."""
    from . import stats as st

    infos = [t for t in toc.tensors if t.name not in toc.config_ties]
    numeric = [t.name for t in infos if kind(t.dtype) in ("float", "complex")]
    if tensor_stats is None:
        def tensor_stats(names: list[str]) -> list[Any]:
            return st.stats_many(ckpt.tensor, names, None, False, raw_of=st.raw_reader(ckpt)).results
    by_name = {t.name: t for t in infos}
    results = {r.name: r for r in tensor_stats(numeric)}
    report = Report(toc.source)
    for name in numeric:
        report.findings += value_findings(by_name[name], results[name])
    report.findings += outliers(infos, results, thresholds)
    report.findings += diverged_ties(ckpt, toc)
    report.findings += optimizer_shapes(ckpt.root, [t.name for t in infos], by_name)
    report.findings += mixed_dtypes(infos)
    return report


def value_findings(info: TensorInfo, s: Any) -> list[Finding]:
    out = []
    if s.nan:
        out.append(Finding("nan", info.name, f"{s.nan} NaN of {s.numel} values"))
    if s.inf:
        out.append(Finding("inf", info.name, f"{s.inf} infinite of {s.numel} values"))
    if len(info.shape) >= 2 and s.numel > 1 and not (s.nan or s.inf) and kind(info.dtype) == "float":
        if s.zeros == 1.0:
            out.append(Finding("zero", info.name, f"all {s.numel} values are 0"))
        elif s.min == s.max:
            out.append(Finding("constant", info.name, f"all {s.numel} values are {s.min:g}"))
    return out


def _template(name: str) -> str:
    return re.sub(r"\d+", "#", name)


def outliers(infos: list[TensorInfo], results: Mapping[str, Any], th: Thresholds) -> list[Finding]:
    """Tensors far from their siblings in repeated blocks (see the module doc)."""
    groups: dict[tuple, list[str]] = {}
    for t in infos:
        if t.name in results and re.search(r"\d", t.name) and t.numel > 1:
            groups.setdefault((_template(t.name), t.shape, t.dtype), []).append(t.name)
    out = []
    for (template, shape, _), names in groups.items():
        if len(names) < th.min_siblings:
            continue
        metrics = [("std", lambda r: r.std)] if len(shape) >= 2 else []  # (a 1-D gain's spread varies by layer)
        for metric, value_of in metrics + [("rms", lambda r: r.norm / math.sqrt(r.numel))]:
            values = {n: value_of(results[n]) for n in names}
            finite = sorted(v for v in values.values() if math.isfinite(v))
            if len(finite) < th.min_siblings:
                continue
            median = finite[len(finite) // 2] if len(finite) % 2 else (finite[len(finite) // 2 - 1] + finite[len(finite) // 2]) / 2
            if median <= 0:
                continue
            for n, v in values.items():
                if math.isfinite(v) and (v > median * th.outlier_factor or v < median / th.outlier_factor):
                    ratio = f"{v / median:.3g}× the median" if v else "0, against a median"
                    out.append(Finding("outlier", n, f"{metric} {v:.4g} is {ratio} {median:.4g} of its {len(names)} "
                                                     f"siblings {template} (threshold {th.outlier_factor:g}×)"))
            if any(f.name in values for f in out):
                break  # one finding per tensor group and tensor: std first, then rms
    return out


def diverged_ties(ckpt: Checkpoint, toc: Toc) -> list[Finding]:
    """config.json ties stored apart whose values differ."""
    if not toc.config_pairs:
        return []
    from .formats.modeldir import differing_pairs

    return [Finding("tie-diverged", output, message)
            for output, source in toc.config_pairs for message in differing_pairs(ckpt.tensor, [(output, source)])]


def _shape(t: Any) -> tuple[int, ...] | None:
    from . import tree

    return tuple(t.shape) if tree.is_tensor(t) else None


def optimizer_shapes(root: Any, names: list[str], infos: Mapping[str, TensorInfo]) -> list[Finding]:
    """Optimizer state whose shape is not its parameter's (see the module doc)."""
    from .ops import optimizer_states, parameter_names

    params = parameter_names(names)
    out = []
    for where, opt in optimizer_states(root, ()):
        place = ".".join(str(p) for p in where) or "(root)"
        state = opt["state"]
        positional = sorted(k for k in state if isinstance(k, int))
        cursor = 0
        for key in positional:
            slots = _moments(state[key])
            if not slots:
                continue
            shape = next(iter(slots.values()))
            start = cursor
            while cursor < len(params) and infos[params[cursor]].shape != shape:
                cursor += 1
            if cursor == len(params):
                expected = params[key] if key < len(params) else None
                why = (f"parameter {expected} is {list(infos[expected].shape)}" if expected
                       else f"the model has {len(params)} parameters")
                out.append(Finding("optimizer-shape", expected,
                                   f"optimizer '{place}' state {key} ({', '.join(slots)}) is {list(shape)}, "
                                   f"no parameter in order has that shape; {why}"))
                cursor = start
            else:
                cursor += 1
        for key in (k for k in state if isinstance(k, str)):
            slots = _moments(state[key])
            match = [n for n in params if n == key or n.endswith("." + key) or key.endswith("." + n)]
            if slots and match and infos[match[0]].shape != next(iter(slots.values())):
                out.append(Finding("optimizer-shape", match[0],
                                   f"optimizer '{place}' state ({', '.join(slots)}) is {list(next(iter(slots.values())))}, "
                                   f"the parameter is {list(infos[match[0]].shape)}"))
    return out


def _moments(entry: Any) -> dict[str, tuple[int, ...]]:
    """A parameter's state: slot -> shape, for the tensors shaped like the parameter (not ``step``)."""
    if not isinstance(entry, Mapping):
        return {}
    out = {}
    for slot, value in entry.items():
        shape = _shape(value)
        if shape is not None and slot != "step" and shape != ():
            out[str(slot)] = shape
    return out


def mixed_dtypes(infos: list[TensorInfo]) -> list[Finding]:
    counts: dict[str, list[str]] = {}
    for t in infos:
        if kind(t.dtype) == "float" and len(t.shape) >= 2:
            counts.setdefault(t.dtype, []).append(t.name)
    if len(counts) < 2:
        return []
    ordered = sorted(counts.items(), key=lambda kv: -len(kv[1]))
    minority = [n for _, ns in ordered[1:] for n in ns]
    shown = ", ".join(minority[:4]) + (", ..." if len(minority) > 4 else "")
    summary = ", ".join(f"{len(ns)} {d}" for d, ns in ordered)
    return [Finding("mixed-dtype", None, f"the weight matrices are in several dtypes ({summary}); not "
                                         f"{ordered[0][0]}: {shown}")]

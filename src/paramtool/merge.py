"""``merge``: combine several parameter sets tensor by tensor (weighted average, task arithmetic, TIES, SLERP).

The methods follow mergekit's definitions (``linear``, ``task_arithmetic``, ``ties`` with magnitude trimming and
the "sum" sign election, ``slerp``), computed in float32 (float64 for float64 tensors) whatever the stored dtype,
and rounded once into the first source's dtype.

The result is the first source with its floating-point tensors replaced: the merge is a plan of ``plan.Action``s
on the first source's listing, so the existing writers carry it out one storage at a time, and the first source's
container, non-tensor entries, ties, order, metadata and sidecars stay as they are. Each action reads the same
tensor from every source (mapped, one tensor per source in memory) when its storage is written.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from .checkpoint import Checkpoint
from .errors import ParamtoolError, UsageError
from .formats.dtypes import kind
from .ops import note_ties
from .plan import Action, Plan, Report
from .records import dataclass
from .select import select

METHODS = ("linear", "task-arithmetic", "ties", "slerp")
SLERP_DOT_THRESHOLD = 0.9995  # mergekit's: above it the two tensors are taken as colinear and interpolated linearly
SLERP_EPS = 1e-8


@dataclass(frozen=True)
class Method:
    """What ``merge`` was asked to do: the method and its parameters, checked (``method_of``)."""

    name: str
    weights: tuple[float, ...]
    density: float = 1.0  # ties: fraction of each task vector's entries kept (by magnitude)
    scale: float = 1.0  # task-arithmetic, ties: lambda, applied to the combined task vector
    t: float = 0.5  # slerp: 0 is the first source, 1 the second


def method_of(name: str, count: int, weights: Sequence[float] | None, base: bool, density: float | None,
              scale: float | None, t: float | None) -> Method:
    """Check a command line's merge parameters (usage errors, exit 2) and fill in the defaults."""
    if name not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, not '{name}'")
    if weights is not None and len(weights) != count:
        raise UsageError(f"--weights gives {len(weights)} weight(s) for {count} source(s): give one per source")
    if name in ("task-arithmetic", "ties") and not base:
        raise UsageError(f"--method {name} combines task vectors (source - base): give --base BASE")
    if name in ("linear", "slerp") and base:
        raise UsageError(f"--method {name} takes no --base (task-arithmetic and ties do)")
    if density is not None and name != "ties":
        raise UsageError("--density goes with --method ties")
    if scale is not None and name not in ("task-arithmetic", "ties"):
        raise UsageError("--lambda goes with --method task-arithmetic or ties")
    if t is not None and name != "slerp":
        raise UsageError("--t goes with --method slerp")
    if count < (2 if name in ("linear", "slerp") else 1):
        raise UsageError(f"--method {name} needs at least two sources")
    if name == "slerp":
        if count != 2:
            raise UsageError(f"--method slerp interpolates between exactly two sources, not {count}")
        if t is not None and weights is not None:
            raise UsageError("give --t or --weights for slerp, not both")
        if weights is not None:
            if sum(weights) == 0:
                raise UsageError("--weights sum to 0")
            t = weights[1] / (weights[0] + weights[1])
        return Method(name, (1.0 - (0.5 if t is None else t), 0.5 if t is None else t), t=0.5 if t is None else t)
    if name == "linear" and weights is not None and sum(weights) == 0:
        raise UsageError("--weights sum to 0: linear normalizes by their sum")
    if density is not None and not 0 < density <= 1:
        raise UsageError(f"--density must be in (0, 1], not {density}")
    return Method(name, tuple(weights) if weights is not None else (1.0,) * count,
                  density=0.2 if density is None and name == "ties" else (density or 1.0),
                  scale=1.0 if scale is None else scale)


# ---------------------------------------------------------------- the methods (float tensors in, float out)


def accumulator(dtype: Any) -> Any:
    """The dtype a merge computes in: float64 for float64 tensors, else float32."""
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32


def linear(tensors: list[Any], weights: Sequence[float]) -> Any:
    """sum(w_i * t_i) / sum(w_i), accumulated one source at a time (mergekit's ``linear``, normalized)."""
    acc = tensors[0].to(accumulator(tensors[0].dtype)) * weights[0]
    for w, t in zip(weights[1:], tensors[1:]):
        acc.add_(t, alpha=w)  # (promoted to acc's dtype element by element: no temporary)
    return acc.div_(sum(weights))


def trim(delta: Any, density: float) -> Any:
    """TIES' trim (mergekit's ``magnitude`` sparsification): keep the ``int(density * numel)`` entries of largest
    magnitude, zero the rest."""
    import torch

    if density >= 1:
        return delta
    k = int(density * delta.numel())
    if k <= 0:
        raise ParamtoolError(f"--density {density} keeps no entry of a tensor of {delta.numel()} values")
    keep = torch.argsort(delta.abs().reshape(-1), descending=True)[:k]
    out = torch.zeros_like(delta)
    out.view(-1)[keep] = delta.reshape(-1)[keep]
    return out


def task_vectors(tensors: list[Any], base: Any, method: Method) -> Any:
    """base + lambda * combined task vectors: their weighted sum (task arithmetic), or TIES' trim, sign election
    (the sign of the weighted sum) and disjoint mean over the sources that agree with it."""
    import torch

    acc = accumulator(base.dtype)
    b = base.to(acc)
    if method.name == "task-arithmetic":
        mixed = torch.zeros_like(b)
        for w, t in zip(method.weights, tensors):
            mixed.add_(t, alpha=w).sub_(b, alpha=w)
    else:
        weighted = torch.stack([trim(t.to(acc) - b, method.density) * w for w, t in zip(method.weights, tensors)])
        majority = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(acc)
        agree = (weighted.sign() == majority).to(acc)
        mixed = (weighted * agree).sum(dim=0)
        w = torch.tensor(method.weights, dtype=acc).reshape((-1,) + (1,) * b.dim())
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
        mixed.div_(divisor)
        del weighted, agree
    return b + mixed.mul_(method.scale)  # (out of place: b may be the base's own tensor)


def slerp(a: Any, b: Any, t: float) -> Any:
    """Spherical interpolation of two tensors seen as vectors (mergekit's ``slerp``): the angle between their
    directions, then sin-weighted; linear where they are (nearly) colinear."""
    acc = accumulator(a.dtype)
    v0, v1 = a.to(acc), b.to(acc)
    n0, n1 = float(v0.double().norm()), float(v1.double().norm())
    dot = float((v0.double() / (n0 if n0 > SLERP_EPS else 1.0) * (v1.double() / (n1 if n1 > SLERP_EPS else 1.0))).sum())
    if abs(dot) > SLERP_DOT_THRESHOLD:
        return v0 * (1 - t) + v1 * t  # (out of place: a float32 input is not copied by .to, and is a source's)
    theta = math.acos(max(-1.0, min(1.0, dot)))
    s0 = math.sin(theta - theta * t) / math.sin(theta)
    s1 = math.sin(theta * t) / math.sin(theta)
    return v0 * s0 + v1 * s1


def combine(method: Method, tensors: list[Any], base: Any | None) -> Any:
    """One merged tensor (in the accumulation dtype) from the same tensor of every source."""
    if method.name == "linear":
        return linear(tensors, method.weights)
    if method.name == "slerp":
        return slerp(tensors[0], tensors[1], method.t)
    return task_vectors(tensors, base, method)


# ---------------------------------------------------------------- the plan


def mismatches(first: Checkpoint, first_label: str, others: list[tuple[str, Checkpoint]], names: list[str],
               whole: bool) -> list[str]:
    """What does not match between the first source and the others, for ``names``: missing names, shapes,
    dtypes; and (``whole``: no --layer) names the others have and the first has not."""
    infos = {i.name: i for i in first.infos()}
    problems: list[str] = []
    for label, other in others:
        theirs = {i.name: i for i in other.infos()}
        missing = [n for n in names if n not in theirs]
        if missing:
            problems.append(f"not in {label}: {_few(missing)}")
        if whole:
            extra = [n for n in theirs if n not in infos]
            if extra:
                problems.append(f"only in {label}: {_few(extra)}")
        for n in names:
            if n in theirs and (theirs[n].shape, theirs[n].dtype) != (infos[n].shape, infos[n].dtype):
                problems.append(f"'{n}' is {_desc(infos[n])} in {first_label} but {_desc(theirs[n])} in {label}")
    return problems


def _desc(info: Any) -> str:
    return f"{info.dtype}{list(info.shape)}"


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def plan_merge(first: Checkpoint, sources: list[tuple[str, Checkpoint]], base: tuple[str, Checkpoint] | None,
               method: Method, layers: list[str]) -> Plan:
    """The merge as a plan on ``first`` (the first source's listing): one action per distinct floating-point
    view (a tied group is merged once, by its first name), each reading that name from every source in
    ``sources`` (all of them, the first included, opened for values) and from ``base``."""
    names = list(first.names)
    chosen = select(names, layers, "all")
    others = sources[1:] + ([base] if base is not None else [])
    problems = mismatches(first, sources[0][0], others, chosen, not layers)
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise ParamtoolError(f"the sources do not match ({shown}); narrow the merge with --layer, or convert them first")
    infos = {i.name: i for i in first.infos()}
    report = Report(f"merge ({method.name})")
    plan = Plan(report)
    skipped = [n for n in chosen if kind(infos[n].dtype) != "float"]
    done: set[Any] = set()
    for name in chosen:
        info = infos[name]
        view = (info.storage, info.offset, info.shape, info.stride)
        if kind(info.dtype) != "float" or view in done:
            continue
        done.add(view)
        report.changed.append(name)
        plan.actions.append(Action(name, _merge_action(name, method, [c for _, c in sources],
                                                        base[1] if base else None), True))
    if not report.changed:
        raise ParamtoolError("no floating-point tensor to merge among the selected ones")
    if skipped:
        report.warnings.append(f"kept from {sources[0][0]} (not floating-point): {_few(skipped)}")
    note_ties(report, list(infos.values()))
    return plan


def _merge_action(name: str, method: Method, sources: list[Checkpoint], base: Checkpoint | None) -> Callable[[Any], None]:
    def run(out: Any) -> None:
        tensors = [c.tensor(name) for c in sources]
        merged = combine(method, tensors, base.tensor(name) if base is not None else None)
        out.copy_(merged)  # rounded once, into the first source's dtype

    return run

"""``diff``: what differs between two checkpoints, tensor by tensor."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .checkpoint import Checkpoint
from .ties import find_ties, names_key


@dataclass
class Diff:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[dict] = field(default_factory=list)
    same: int = 0
    ties_gained: list[list[str]] = field(default_factory=list)
    ties_lost: list[list[str]] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not (self.added or self.removed or self.changed or self.ties_gained or self.ties_lost)

    def as_json(self) -> dict:
        return {
            "added": self.added,
            "removed": self.removed,
            "changed": self.changed,
            "same": self.same,
            "ties_gained": self.ties_gained,
            "ties_lost": self.ties_lost,
        }


def _describe(t: Any) -> dict:
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def compare_tensors(a: Any, b: Any, rtol: float, atol: float) -> dict | None:
    """None when equal (bit-exact when rtol = atol = 0); else the differences."""
    import torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return {"max_abs_diff": None, "a": _describe(a), "b": _describe(b)}
    if a.numel() == 0:
        return None
    ca, cb = a.detach().contiguous(), b.detach().contiguous()
    if rtol == 0 and atol == 0:
        same = torch.equal(ca.reshape(-1).view(torch.uint8), cb.reshape(-1).view(torch.uint8))
    else:
        fa, fb = ca.to(torch.float64), cb.to(torch.float64)
        same = bool(torch.isclose(fa, fb, rtol=rtol, atol=atol, equal_nan=True).all())
    if same:
        return None
    fa, fb = ca.to(torch.float64).reshape(-1), cb.to(torch.float64).reshape(-1)
    diff = (fa - fb).abs()
    max_abs = diff.max().item() if diff.numel() else 0.0
    denom = fb.abs().max().item()
    na, nb = fa.norm().item(), fb.norm().item()
    cosine = (fa @ fb).item() / (na * nb) if na > 0 and nb > 0 else None
    return {
        "max_abs_diff": _finite(max_abs),
        "max_rel_diff": _finite(max_abs / denom) if denom > 0 else None,
        "cosine": _finite(cosine) if cosine is not None else None,
        "a": _describe(a),
        "b": _describe(b),
    }


def diff(a: Checkpoint, b: Checkpoint, rtol: float = 0.0, atol: float = 0.0) -> Diff:
    out = Diff()
    names_b = set(b.names)
    out.removed = [n for n in a.names if n not in names_b]
    out.added = [n for n in b.names if n not in a.names]
    for name in a.names:
        if name not in names_b:
            continue
        change = compare_tensors(a.tensor(name), b.tensor(name), rtol, atol)
        if change is None:
            out.same += 1
        else:
            out.changed.append({"name": name, **change})
    ties_a = {g.names for g in find_ties(a.infos())}
    ties_b = {g.names for g in find_ties(b.infos())}
    out.ties_gained = [list(g) for g in sorted(ties_b - ties_a, key=names_key)]
    out.ties_lost = [list(g) for g in sorted(ties_a - ties_b, key=names_key)]
    return out

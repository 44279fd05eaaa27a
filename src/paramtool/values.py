"""Tensor values for ``show``: torch's own print format, and nested lists for JSON."""
from __future__ import annotations

import math
from typing import Any


def tensor_text(t: Any) -> str:
    """What ``print(t.data)`` prints: torch elides large tensors itself."""
    return repr(t.detach())


def _clean(v: Any) -> Any:
    if isinstance(v, list):
        return [_clean(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Infinity: "nan", "inf", "-inf"
    if isinstance(v, complex):
        return [v.real, v.imag]
    return v


def tensor_json(name: str, t: Any) -> dict:
    import torch

    data = t.detach()
    if data.dtype in (torch.bfloat16, torch.float16) or str(data.dtype).startswith("torch.float8"):
        data = data.float()
    return {
        "name": name,
        "shape": list(t.shape),
        "dtype": str(t.dtype).removeprefix("torch."),
        "values": _clean(data.tolist()),
    }

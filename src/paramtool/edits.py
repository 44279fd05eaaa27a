"""``paramtool set`` edits: ``NAME[INDEX] OP VALUE``, parsed by hand (never evaluated).

INDEX is a comma list of integers, slices ``a:b:c`` (parts optional) and ``...``; OP is one of
``= += -= *= /=``; VALUE is a number (``42``, ``-1e-3``, ``inf``, ``nan``) or ``True``/``False``.
Tensor names may contain dots, spaces and brackets: the name is the longest known name the edit starts with.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

from .errors import ParamtoolError, UsageError

OPS = ("+=", "-=", "*=", "/=", "=")
_INT = re.compile(r"^[+-]?\d+$")


@dataclass(frozen=True)
class Edit:
    name: str
    index: tuple | None
    op: str
    value: float | int | bool
    text: str


def _value(text: str, edit: str) -> float | int | bool:
    t = text.strip()
    if t in ("True", "False"):
        return t == "True"
    if _INT.match(t):
        return int(t)
    try:
        return float(t)  # accepts 1e-3, inf, -inf, nan
    except ValueError:
        raise UsageError(f"edit '{edit}': '{t}' is not a number") from None


def _index_part(part: str, edit: str) -> Any:
    p = part.strip()
    if p == "...":
        return Ellipsis
    if ":" in p:
        bits = p.split(":")
        if len(bits) > 3 or any(b.strip() and not _INT.match(b.strip()) for b in bits):
            raise UsageError(f"edit '{edit}': bad slice '{p}'")
        nums = [int(b) if b.strip() else None for b in bits] + [None] * (3 - len(bits))
        if nums[2] == 0:
            raise UsageError(f"edit '{edit}': slice step cannot be zero")
        return slice(*nums)
    if _INT.match(p):
        return int(p)
    raise UsageError(f"edit '{edit}': bad index '{p}' (use integers, slices a:b:c and ...)")


def parse_edit(text: str, names: list[str]) -> Edit:
    match = re.search(r"(\+=|-=|\*=|/=|=)", text)
    if not match:
        raise UsageError(f"edit '{text}' has no operator (use =, +=, -=, *= or /=)")
    lhs, op, rhs = text[: match.start()].strip(), match.group(1), text[match.end():]
    if not rhs.strip():
        raise UsageError(f"edit '{text}' has no value")
    name = max((n for n in names if lhs == n or (lhs.startswith(n) and lhs[len(n):].lstrip().startswith("["))),
               key=len, default=None)
    if name is None:
        base = lhs.split("[", 1)[0].strip()
        close = difflib.get_close_matches(base, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ParamtoolError(f"edit '{text}': no tensor named '{base}'{hint}")
    rest = lhs[len(name):].strip()
    index = None
    if rest:
        if not (rest.startswith("[") and rest.endswith("]")):
            raise UsageError(f"edit '{text}': expected [INDEX] after '{name}'")
        inner = rest[1:-1]
        if "[" in inner or "]" in inner:
            raise UsageError(f"edit '{text}': one [INDEX] only, e.g. w[0, 1:3]")
        index = tuple(_index_part(p, text) for p in inner.split(","))
    return Edit(name, index, op, _value(rhs, text), text)


def apply_edit(edit: Edit, tensor: Any) -> None:
    """Apply in place (so every tied name sees it), keeping the tensor's dtype."""
    import torch

    with torch.no_grad():
        try:
            if edit.op == "=":
                if edit.index is None:
                    tensor.fill_(edit.value)
                else:
                    tensor[edit.index] = edit.value
                return
            view = tensor[edit.index] if edit.index is not None else tensor  # basic indexing: a view
            if edit.op == "/=" and edit.value == 0 and not tensor.is_floating_point():
                raise ParamtoolError(f"edit '{edit.text}': integer division by zero")
            current = view.to(torch.float64)
            if edit.op == "+=":
                new = current + edit.value
            elif edit.op == "-=":
                new = current - edit.value
            elif edit.op == "*=":
                new = current * edit.value
            else:
                new = current / edit.value
            view.copy_(new.to(view.dtype))
        except IndexError as e:
            raise ParamtoolError(f"edit '{edit.text}': {e} (tensor '{edit.name}' has shape {list(tensor.shape)})") from None
        except (RuntimeError, TypeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ParamtoolError(f"edit '{edit.text}': {first}") from None

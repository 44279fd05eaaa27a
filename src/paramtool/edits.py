"""``paramtool set`` edits: ``NAME[INDEX] OP VALUE`` or ``NAME OP VALUE``, parsed by hand (never evaluated).

- NAME is a tensor name; names may contain dots, spaces, ``=`` and even ``[``, so the name is the *longest
  known name* the edit starts with that is followed by ``[`` or an operator (``0.block 1.0.weight[0, 0] = 42``).
- INDEX is a comma list of integers (negative allowed), slices ``a:b:c`` (every part optional) and ``...``;
  a trailing comma is allowed, as in Python. Basic indexing only, so the indexed part is a view of the tensor.
- OP is one of ``=  +=  -=  *=  /=``.
- VALUE is a number literal: ``42``, ``-1e-3``, ``.5``, ``inf``, ``-inf``, ``nan``, or ``True`` / ``False``.

Semantics (``apply_edit``): the tensor is changed in place under ``torch.no_grad()``, so every tied name sees the
change, and its dtype is kept. Floating and complex tensors use torch's own in-place ops (``w *= 0.1`` gives the
bits ``w.mul_(0.1)`` gives, rounded as torch rounds). Integer and bool tensors never round silently: a value or a
result the dtype cannot hold exactly (``2.5``, ``300`` in uint8, ``nan``, ``7 /= 2``, an overflow) is an error
naming the tensor, its dtype and the value, and the tensor is left as it was. Bool tensors take ``=`` only.
"""
from __future__ import annotations

import difflib
import re
from typing import Any

from .errors import ParamtoolError, UsageError, first_line
from .records import dataclass

OPS = ("+=", "-=", "*=", "/=", "=")  # longest first: "+=" must win over "="
_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|inf|infinity|nan)$", re.IGNORECASE)
_BOOLS = {"True": True, "False": False, "true": True, "false": False}


@dataclass(frozen=True)
class Edit:
    name: str
    index: tuple | None
    op: str
    value: float | int | bool
    text: str


def _one_line(text: str) -> str:
    """The edit as shown in messages: one line, whatever the user typed."""
    return " ".join(text.split()) if "\n" in text or "\r" in text else text


def _bad(text: str, why: str) -> UsageError:
    return UsageError(f"edit '{_one_line(text)}': {why} (expected NAME[INDEX] OP VALUE, e.g. \"0.weight[0, 0] = 42\")")


def _op_at(s: str) -> str | None:
    return next((op for op in OPS if s.startswith(op)), None)


def _value(raw: str, text: str) -> float | int | bool:
    t = raw.strip()
    if not t:
        raise _bad(text, "no value after the operator")
    if t in _BOOLS:
        return _BOOLS[t]
    if _INT.match(t):
        return int(t)
    if _FLOAT.match(t):
        return float(t)
    raise _bad(text, f"'{t}' is not a number")


def _index_part(part: str, text: str) -> Any:
    p = part.strip()
    if p == "...":
        return Ellipsis
    if ":" in p:
        bits = [b.strip() for b in p.split(":")]
        if len(bits) > 3 or any(b and not _INT.match(b) for b in bits):
            raise _bad(text, f"bad slice '{p}'")
        nums = [int(b) if b else None for b in bits] + [None] * (3 - len(bits))
        if nums[2] == 0:
            raise _bad(text, "slice step cannot be zero")
        return slice(*nums)
    if _INT.match(p):
        return int(p)
    raise _bad(text, f"bad index '{p}' (use integers, slices a:b:c and ...)")


def _parse_index(inner: str, text: str) -> tuple:
    parts = inner.split(",")
    if len(parts) > 1 and not parts[-1].strip():
        parts = parts[:-1]  # w[0,] as in Python
    index = tuple(_index_part(p, text) for p in parts)
    if sum(i is Ellipsis for i in index) > 1:
        raise _bad(text, "an index can only have a single ellipsis ('...')")
    return index


def _resolve_name(text: str, names: list[str]) -> str | None:
    """The longest name the edit starts with that is followed by '[' or an operator."""
    best = None
    for n in names:
        if n and text.startswith(n) and (best is None or len(n) > len(best)):
            rest = text[len(n):].lstrip()
            if rest.startswith("[") or _op_at(rest):
                best = n
    return best


def parse_edit(text: str, names: list[str]) -> Edit:
    stripped = text.strip()
    name = _resolve_name(text, names) or _resolve_name(stripped, names)
    if name is None:
        known = [n for n in names if n and stripped.startswith(n) and stripped[len(n):len(n) + 1].isspace()]
        if known:  # a known name followed by something that is not an operator: "w //= 2", "w 1"
            name = max(known, key=len)
            rest = stripped[len(name):].split()
            raise _bad(text, f"expected [INDEX] or an operator (=, +=, -=, *=, /=) after '{name}', found '{rest[0]}'")
        m = re.search(r"\+=|-=|\*=|/=|=", stripped)
        if not m:
            raise _bad(text, "no operator (use =, +=, -=, *= or /=)")
        base = stripped[: m.start()].strip()
        if base.endswith("]") and "[" in base:
            base = base[: base.rindex("[")].rstrip()
        if not base:
            raise _bad(text, "no tensor name")
        close = difflib.get_close_matches(base, names, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ParamtoolError(f"edit '{_one_line(text)}': no tensor named '{base}'{hint}")
    source = text if text.startswith(name) else stripped
    rest = source[len(name):].lstrip()
    index = None
    if rest.startswith("["):
        close_at = rest.find("]")
        if close_at < 0:
            raise _bad(text, "'[' without ']'")
        inner = rest[1:close_at]
        if "[" in inner:
            raise _bad(text, "one [INDEX] only, e.g. w[0, 1:3]")
        index = _parse_index(inner, text)
        rest = rest[close_at + 1:].lstrip()
    op = _op_at(rest)
    if op is None:
        shown = rest.split()[0] if rest.split() else "nothing"
        raise _bad(text, f"expected an operator (=, +=, -=, *=, /=) after '{name}', found '{shown}'")
    return Edit(name, index, op, _value(rest[len(op):], text), text)


_METHODS = {"+=": "add_", "-=": "sub_", "*=": "mul_", "/=": "div_"}


def apply_edit(edit: Edit, tensor: Any) -> None:
    """Apply ``edit`` to ``tensor`` in place (so every tied name sees it), keeping its dtype.

    With ``=`` and no index the tensor's old values are never read.
    """
    import torch

    where = f"edit '{_one_line(edit.text)}'"
    value, op = edit.value, edit.op
    _editable(tensor, edit.name, where)
    try:
        with torch.no_grad():
            # basic indexing: a view; negative steps (which torch refuses) become the same elements, stepped up
            target = tensor if edit.index is None else tensor[_positive_steps(edit.index, tuple(tensor.shape))]
            dtype = target.dtype
            if dtype.is_floating_point or dtype.is_complex:
                if op == "=":
                    target.fill_(value)
                    return
                try:
                    getattr(target, _METHODS[op])(value)
                except NotImplementedError:  # e.g. float8 on CPU: compute in float32, round once
                    target.copy_(_arith(target.to(torch.float32), op, value).to(dtype))
            elif dtype == torch.bool:
                if op != "=":
                    raise ParamtoolError(f"{where}: '{edit.name}' is a bool tensor; only '=' True/False applies")
                target.fill_(_exact_bool(value, _cannot_hold(where, edit.name, dtype, value)))
            else:
                _integer_edit(target, op, value, where, edit.name)
    except ParamtoolError:
        raise
    except IndexError as e:
        raise ParamtoolError(f"{where}: {first_line(e)} (tensor '{edit.name}' has shape {list(tensor.shape)})") from None
    except (RuntimeError, TypeError, ValueError, OverflowError, NotImplementedError, ZeroDivisionError) as e:
        raise ParamtoolError(f"{where}: {first_line(e)} (tensor '{edit.name}' is "
                             f"{str(tensor.dtype)[6:]} of shape {list(tensor.shape)})") from None


def _editable(tensor: Any, name: str, where: str) -> None:
    """A tensor whose values can be written: not a meta tensor (no values), not a dtype torch has no arithmetic
    for, not a bare storage (edit a tensor that views it)."""
    from .formats.dtypes import NO_ARITHMETIC

    dtype = str(getattr(tensor, "dtype", "")).removeprefix("torch.")
    why = "a meta tensor: the file holds no values" if getattr(tensor, "is_meta", False) else \
        f"{dtype}, which torch has no arithmetic for" if dtype in NO_ARITHMETIC else \
        "a bare storage" if not hasattr(tensor, "is_meta") else None
    if why:
        raise ParamtoolError(f"{where}: '{name}' is {why}")


def _cannot_hold(where: str, name: str, dtype: Any, value: Any, how: str = "") -> ParamtoolError:
    dt = str(dtype).removeprefix("torch.")
    return ParamtoolError(f"{where}: '{name}' is {dt} and cannot hold {value!r}{how} exactly "
                          f"({_range_text(dtype)}); edit a float tensor, or give a value it holds")


def _range_text(dtype: Any) -> str:
    import torch

    if dtype == torch.bool:
        return "bool holds True/False, 1/0"
    info = torch.iinfo(dtype)
    return f"{str(dtype).removeprefix('torch.')} holds the integers {info.min}..{info.max}"


def _exact_bool(value: float | int | bool, error: ParamtoolError) -> bool:
    if value in (0, 1):  # True/False, 0/1, 0.0/1.0 (nan compares unequal to both)
        return bool(value)
    raise error


def _exact_int(value: float | int | bool) -> int | None:
    """``value`` as an int when it is one exactly (``3``, ``3.0``, ``True``), else None (``2.5``, nan, inf)."""
    if isinstance(value, float):
        return int(value) if value == value and abs(value) != float("inf") and value.is_integer() else None
    return int(value)


def _integer_edit(target: Any, op: str, value: float | int | bool, where: str, name: str) -> None:
    """An edit of an integer tensor, done only when every result is exact and fits the dtype.

    Scalar ``+ - *`` are monotone, so the extremes of the result come from the extremes of the tensor and
    are checked with Python's exact integers before anything is written; ``/`` and float factors are
    checked element by element. uint16/32/64, for which torch's CPU kernels lack most ops, are computed in
    int64 (exact for them, uint64 up to 2**63 - 1) and copied back.
    """
    import torch

    dtype = target.dtype
    info = torch.iinfo(dtype)
    whole = _exact_int(value)
    if op == "=":
        if whole is None or not info.min <= whole <= info.max:
            raise _cannot_hold(where, name, dtype, value)
        target.fill_(whole)
        return
    if op == "/=" and value == 0:
        raise ParamtoolError(f"{where}: integer division by zero ('{name}' is {str(dtype)[6:]})")
    if target.numel() == 0:
        return
    hi_limit = info.max
    if dtype in (torch.uint16, torch.uint32, torch.uint64):
        hi_limit = min(info.max, torch.iinfo(torch.int64).max)
        if dtype == torch.uint64 and max(target.flatten().tolist()) > hi_limit:
            raise ParamtoolError(f"{where}: '{name}' is uint64 with values above 2**63 - 1, which paramtool cannot "
                                 "compute with exactly; use '=' to set values")
        work = target.to(torch.int64)
    else:
        work = target
    if whole is not None and op != "/=":
        lo, hi = int(work.min()), int(work.max())
        for x in (lo, hi):
            r = x + whole if op == "+=" else x - whole if op == "-=" else x * whole
            if not info.min <= r <= hi_limit:
                raise _cannot_hold(where, name, dtype, r, f" ({x} {op[0]} {whole})")
        getattr(work, _METHODS[op])(whole)
    elif whole is not None:  # /= by an integer: exact only where it divides
        rest = torch.fmod(work, whole) if abs(whole) <= torch.iinfo(torch.int64).max else work
        bad = torch.nonzero(rest.flatten()).flatten()
        if bad.numel():
            x = int(work.flatten()[bad[0]])
            raise _cannot_hold(where, name, dtype, x / whole, f" ({x} / {whole})")
        for x in (int(work.min()), int(work.max())):
            if not info.min <= x // whole <= hi_limit:  # the one overflow: min / -1
                raise _cannot_hold(where, name, dtype, x // whole, f" ({x} / {whole})")
        work.copy_(torch.div(work, whole, rounding_mode="trunc"))
    else:
        _float_factor_edit(work, op, float(value), where, name, dtype, hi_limit)
    if work is not target:
        target.copy_(work)


def _float_factor_edit(work: Any, op: str, value: float, where: str, name: str, dtype: Any, hi_limit: int) -> None:
    """``+= 2.5``, ``*= 0.5`` on integers: computed in float64, written only if every result is an integer
    the dtype holds (and float64 was exact, i.e. the inputs are below 2**53)."""
    import torch

    info = torch.iinfo(dtype)
    if value != value or abs(value) == float("inf"):
        raise _cannot_hold(where, name, dtype, value)
    lo, hi = int(work.min()), int(work.max())
    if max(abs(lo), abs(hi)) > 2**53:
        raise ParamtoolError(f"{where}: '{name}' is {str(dtype)[6:]} with values beyond 2**53, which a float "
                             f"factor cannot scale exactly; use an integer value")
    new = _arith(work.to(torch.float64), op, value)
    bad = ~(torch.isfinite(new) & (new == new.trunc()) & (new >= info.min) & (new <= hi_limit))
    where_bad = torch.nonzero(bad.flatten()).flatten()
    if where_bad.numel():
        i = int(where_bad[0])
        x, r = int(work.flatten()[i]), float(new.flatten()[i])
        raise _cannot_hold(where, name, dtype, r, f" ({x} {op[0]} {value!r})")
    work.copy_(new.to(work.dtype))


def _positive_steps(index: tuple, shape: tuple) -> tuple:
    """``index`` with each negative-step slice replaced by a positive-step one over the same elements.

    A scalar edit does not depend on the order the elements are visited in, so ``w[::-2] += 1`` is
    ``w[n-1::-2] += 1`` read the other way. Indices that do not fit the shape are left for torch to report.
    """
    if not any(isinstance(i, slice) and i.step is not None and i.step < 0 for i in index):
        return index
    used = sum(i is not Ellipsis for i in index)
    if used > len(shape):
        return index
    dims, d = [], 0
    for i in index:
        if i is Ellipsis:
            d += len(shape) - used
            dims.append(None)
        else:
            dims.append(d)
            d += 1
    out = []
    for i, dim in zip(index, dims):
        if isinstance(i, slice) and i.step is not None and i.step < 0:
            r = range(*i.indices(shape[dim]))
            i = slice(r[-1], r[0] + 1, -i.step) if len(r) else slice(0, 0)
        out.append(i)
    return tuple(out)


def _arith(t: Any, op: str, value: float | int | bool) -> Any:
    if op == "+=":
        return t + value
    if op == "-=":
        return t - value
    if op == "*=":
        return t * value
    return t / value



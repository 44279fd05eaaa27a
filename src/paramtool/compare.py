"""``diff``: what differs between two checkpoints, tensor by tensor."""
from __future__ import annotations

import contextlib
import math
import os
from typing import TYPE_CHECKING, Any

from . import numeric
from .checkpoint import Checkpoint
from .pipeline import ordered_map
from .records import dataclass, field
from .ties import find_ties, names_key

if TYPE_CHECKING:
    from .formats.base import Pairing


@dataclass
class Diff:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[dict] = field(default_factory=list)
    same: int = 0
    ties_gained: list[list[str]] = field(default_factory=list)
    ties_lost: list[list[str]] = field(default_factory=list)
    adapter: dict | None = None  # two LoRA adapter directories: settings that differ, updates that changed

    @property
    def equal(self) -> bool:
        return not (self.added or self.removed or self.changed or self.ties_gained or self.ties_lost
                    or (self.adapter and self.adapter["config"]))

    def as_json(self) -> dict:
        return {
            "added": self.added,
            "removed": self.removed,
            "changed": self.changed,
            "same": self.same,
            "ties_gained": self.ties_gained,
            "ties_lost": self.ties_lost,
            **({"adapter": self.adapter} if self.adapter is not None else {}),
        }


def _describe(t: Any) -> dict:
    shape = [t.size(0)] if t.is_nested else list(t.shape)  # (a nested tensor: its number of components)
    return {"shape": shape, "dtype": str(t.dtype).removeprefix("torch.")}


def _info(i: Any) -> dict:
    return {"shape": list(i.shape), "dtype": i.dtype}


def _equal(ca: Any, cb: Any, rtol: float, atol: float) -> bool:
    """Bit-exact (a byte compare) when rtol = atol = 0, else ``torch.isclose`` chunk by chunk in float64."""
    import torch

    from .stats import CHUNK
    from .pipeline import scratch

    fa, fb = ca.reshape(-1), cb.reshape(-1)
    if rtol == 0 and atol == 0:  # the bits, compared as the widest integers that tile them (8x fewer than bytes)
        return torch.equal(*_as_words(fa, fb))
    for start in range(0, fa.numel(), CHUNK):
        xa, xb = fa[start : start + CHUNK], fb[start : start + CHUNK]
        wa, wb = scratch(xa.numel(), 0), scratch(xb.numel(), 1)
        wa.copy_(xa)
        wb.copy_(xb)
        if not bool(torch.isclose(wa, wb, rtol=rtol, atol=atol, equal_nan=True).all()):
            return False
    return True


def _as_words(fa: Any, fb: Any) -> tuple[Any, Any]:
    """Both tensors' bytes as the widest integers that tile them (and that both addresses are aligned to)."""
    import torch

    ra, rb = fa.view(torch.uint8), fb.view(torch.uint8)
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if ra.numel() % size == 0 and ra.data_ptr() % size == 0 and rb.data_ptr() % size == 0:
            return ra.view(dtype), rb.view(dtype)
    return ra, rb


def _differences(ca: Any, cb: Any) -> tuple[float, float, float, float, float]:
    """(max |a - b|, max |b|, a.b, |a|^2, |b|^2) in one pass over cache-sized float64 chunks."""
    import torch

    from .stats import CHUNK
    from .pipeline import scratch

    fa, fb = ca.reshape(-1), cb.reshape(-1)
    max_abs = max_b = dot = na2 = nb2 = 0.0
    for start in range(0, fa.numel(), CHUNK):
        xa, xb = fa[start : start + CHUNK], fb[start : start + CHUNK]
        wa, wb = scratch(xa.numel(), 0), scratch(xb.numel(), 1)
        wa.copy_(xa.real if xa.is_complex() else xa)
        wb.copy_(xb.real if xb.is_complex() else xb)
        dot += torch.dot(wa, wb).item()
        na2 += torch.dot(wa, wa).item()
        nb2 += torch.dot(wb, wb).item()
        lo, hi = torch.aminmax(wb)
        max_b = _nanmax(max_b, max(abs(float(lo)), abs(float(hi))))
        lo, hi = torch.aminmax(wa.sub_(wb).abs_())
        max_abs = _nanmax(max_abs, float(hi))
    return max_abs, max_b, dot, na2, nb2


def _nanmax(a: float, b: float) -> float:
    """max that propagates NaN, as torch's max does."""
    return a + b if math.isnan(a) or math.isnan(b) else max(a, b)


def compare_tensors(a: Any, b: Any, rtol: float, atol: float) -> dict | None:
    """None when equal (bit-exact when rtol = atol = 0); else the differences."""
    from .values import as_tensor, readable

    a, b = as_tensor(a), as_tensor(b)
    if _describe(a)["shape"] == _describe(b)["shape"] and a.dtype != b.dtype and not a.is_nested \
            and not b.is_nested and _numeric(a) and _numeric(b):
        return _across_dtypes(readable(a), readable(b))
    if _describe(a) != _describe(b) or a.layout != b.layout or a.is_nested != b.is_nested:
        return {"max_abs_diff": None, "a": _describe(a), "b": _describe(b)}
    if a.is_nested and [c.shape for c in a.unbind()] != [c.shape for c in b.unbind()]:
        return {"max_abs_diff": None, "a": _describe(a), "b": _describe(b)}
    a, b = readable(a, bits=True), readable(b, bits=True)
    if a.numel() == 0:
        return None
    ca, cb = a.detach().contiguous(), b.detach().contiguous()
    if _equal(ca, cb, rtol, atol):
        return None
    return _changed(_differences(ca, cb), _describe(a), _describe(b))


def _numeric(t: Any) -> bool:
    from .values import NO_ARITHMETIC

    name = str(t.dtype).removeprefix("torch.")
    return not t.is_meta and not t.is_complex() and name not in NO_ARITHMETIC


def _nonfinite(t: Any) -> dict:
    """NaN and Inf counts of one side, with the first index (in row-major order) of each."""
    import torch

    out: dict = {}
    if not t.is_floating_point():
        return {"nan": 0, "inf": 0}
    for key, mask in (("nan", torch.isnan(t)), ("inf", torch.isinf(t))):
        n = int(mask.sum())
        out[key] = n
        if n:
            flat = int(mask.reshape(-1).nonzero()[0])
            out[f"first_{key}"] = list(torch.unravel_index(torch.tensor(flat), t.shape)) if t.dim() else []
            out[f"first_{key}"] = [int(i) for i in out[f"first_{key}"]]
    return out


def _across_dtypes(a: Any, b: Any) -> dict:
    """Two tensors of one shape and different dtypes (a cast): their values compared in float64, with each
    side's NaN/Inf counts; always reported (the dtype changed), ``max_abs_diff`` 0 when every value survived."""
    ca, cb = a.detach().contiguous(), b.detach().contiguous()
    sums = _differences(ca, cb) if ca.numel() else (0.0, 0.0, 0.0, 0.0, 0.0)
    out = _changed(sums, _describe(a), _describe(b))
    out["a"]["nonfinite"], out["b"]["nonfinite"] = _nonfinite(ca), _nonfinite(cb)
    return out


def _changed(sums: tuple[float, float, float, float, float], a: dict, b: dict) -> dict:
    """What ``diff`` reports for a changed tensor, from (max |a - b|, max |b|, a.b, |a|^2, |b|^2)."""
    max_abs, denom, dot, na2, nb2 = sums
    na, nb = math.sqrt(na2), math.sqrt(nb2)
    cosine = dot / (na * nb) if na > 0 and nb > 0 else (math.nan if math.isnan(na + nb) else None)  # NaN propagates
    return {
        "max_abs_diff": max_abs,  # (non-finite: "nan"/"inf" in JSON, by render.dumps)
        "max_rel_diff": max_abs / denom if denom > 0 else None,
        "cosine": cosine,
        "a": a,
        "b": b,
    }


def compare_raw(ra: Any, rb: Any, dtype: str, rtol: float, atol: float) -> tuple | None:
    """``compare_tensors``' numbers from two tensors' bytes with numpy (``numeric``), no torch: None when they
    are within the tolerances (``isclose``), else the sums ``_changed`` reports. With rtol = atol = 0 the
    bytes are known to differ (``numeric.bytes_equal`` said so), unless one side arrives in parts
    (``numeric.streamed``: a large remote storage): then one pass over the chunk pairs both compares them
    (bit for bit, or within the tolerances) and sums them, so nothing is read twice. Chunk pairs are read in
    step, their mapped pages dropped behind."""
    once = hasattr(ra, "parts") or hasattr(rb, "parts")

    def pairs() -> Any:
        return zip(numeric.values(ra, dtype, 0), numeric.values(rb, dtype, 1))

    with numeric.quiet():
        if not once and (rtol or atol) and all(numeric.all_close(xa, xb, rtol, atol) for xa, xb in pairs()):
            return None
        same = once
        max_abs = max_b = dot = na2 = nb2 = 0.0
        for xa, xb in pairs():
            equal = once and numeric.same_bits(xa, xb)  # (most chunk pairs of a changed tensor: cheaper sums)
            if same:
                same = equal or bool(rtol or atol) and numeric.all_close(xa, xb, rtol, atol)
            m, mb, d, a2, b2 = numeric.own_differences(xa) if equal else numeric.differences(xa, xb)
            max_abs, max_b = _nanmax(max_abs, m), _nanmax(max_b, mb)
            dot, na2, nb2 = dot + d, na2 + a2, nb2 + b2
    return None if same else (max_abs, max_b, dot, na2, nb2)


def diff(a: Checkpoint, b: Checkpoint, rtol: float = 0.0, atol: float = 0.0) -> Diff:
    paired_a, paired_b = a.layout.pairing(a, list(b.names)), b.layout.pairing(b, list(a.names))
    if (paired_a is None) != (paired_b is None):  # a GGUF file and the checkpoint it was made from
        return quantization_diff(a, b, rtol, atol, paired_a or paired_b, file_is_a=paired_a is not None)
    out = Diff()
    names_b = set(b.names)
    out.removed = [n for n in a.names if n not in names_b]
    out.added = [n for n in b.names if n not in a.names]
    infos_a = {i.name: i for i in a.infos()}
    infos_b = {i.name: i for i in b.infos()}

    def one(name: str) -> dict | None:
        ia, ib = infos_a[name], infos_b[name]
        if ia.shape != ib.shape:  # no data needed to say so
            return {"max_abs_diff": None, "a": _info(ia), "b": _info(ib)}
        if ia.dtype != ib.dtype:  # a cast: the values compared in float64 (compare_tensors)
            return compare_tensors(a.tensor(name), b.tensor(name), rtol, atol)
        kernels = numeric.supports(ia.dtype)
        with numeric.streamed() if kernels else contextlib.nullcontext():  # (numpy's kernels take parts)
            ra, rb = a.raw_bytes(name), b.raw_bytes(name)
        mapped = ra is not None and rb is not None
        once = hasattr(ra, "parts") or hasattr(rb, "parts")
        if mapped and not once and rtol == 0 and atol == 0 and numeric.bytes_equal(ra, rb):  # bit-exact: bytes decide
            return None
        if mapped and kernels:  # numpy on the mapped bytes, no torch
            sums = compare_raw(ra, rb, ia.dtype, rtol, atol)
            return None if sums is None else _changed(sums, _info(ia), _info(ib))
        for r in (ra, rb):
            if hasattr(r, "parts"):  # (the other side goes through torch: this one too)
                r.close()
        del ra, rb
        return compare_tensors(a.tensor(name), b.tensor(name), rtol, atol)

    common = [n for n in a.names if n in names_b]
    for name, change in zip(common, ordered_map(one, common)):  # two pairs at a time, one read ahead
        if change is None:
            out.same += 1
        else:
            out.changed.append({"name": name, **change})
    ties_a = {g.names for g in find_ties(a.infos())}
    ties_b = {g.names for g in find_ties(b.infos())}
    out.ties_gained = [list(g) for g in sorted(ties_b - ties_a, key=names_key)]
    out.ties_lost = [list(g) for g in sorted(ties_a - ties_b, key=names_key)]
    if all(c.path and os.path.isfile(os.path.join(os.path.dirname(c.path), "adapter_config.json")) for c in (a, b)):
        from .lora import diff_adapters  # two PEFT adapter directories: what their configs and updates say

        out.adapter = diff_adapters(a, b, [c["name"] for c in out.changed] + out.added + out.removed)
    return out


def quantization_diff(a: Checkpoint, b: Checkpoint, rtol: float, atol: float, pairing: Pairing,
                      file_is_a: bool) -> Diff:
    """What quantizing cost, between a GGUF file and a checkpoint (either side): tensors are paired as the file's
    format pairs them (``pairing``, ``Format.pairing``: through the ``gguf`` package's tensor-name map for the
    file's architecture, else by equal names), the checkpoint's LLaMA query/key rows reordered as llama.cpp's
    converter does, a 2-D weight stored transposed (a Conv1D's) compared transposed, and each pair compared as
    float64 whatever the dtypes: max abs and relative error and cosine, with the tensor's GGUF type. Names are
    the checkpoint's. ``file_is_a``: the GGUF file is ``a``, else ``b``."""
    g, c = (a, b) if file_is_a else (b, a)
    pairs, types = pairing.pairs, pairing.quantization
    out = Diff()
    unpaired_c = [n for n in c.names if n not in pairs]
    unpaired_g = [n for n in g.names if n not in set(pairs.values())]
    out.removed, out.added = (unpaired_g, unpaired_c) if g is a else (unpaired_c, unpaired_g)

    def one(name: str) -> dict | None:
        gname = pairs[name]
        tc, tg = c.tensor(name), g.tensor(gname)
        tc = pairing.arranged(name, tc)
        flipped = tc.dim() == 2 and tc.shape[0] != tc.shape[1] and tuple(tc.shape) == tuple(tg.shape)[::-1]
        if flipped:  # a Conv1D weight (GPT-2), which converters store transposed
            tc = tc.T
        ta, tb = (tg, tc) if g is a else (tc, tg)
        if tuple(ta.shape) != tuple(tb.shape):
            return {"max_abs_diff": None, "a": _describe(ta), "b": _describe(tb)}
        sums = _differences(ta.detach().contiguous(), tb.detach().contiguous())
        if sums[0] <= atol + rtol * sums[1]:
            return None
        return {**_changed(sums, _describe(ta), _describe(tb)), **({"transposed": True} if flipped else {})}

    for name, change in zip(pairs, ordered_map(one, list(pairs))):
        if change is None:
            out.same += 1
        else:
            out.changed.append({"name": name, "gguf_name": pairs[name], "quantization": types.get(pairs[name]),
                                **change})
    return out

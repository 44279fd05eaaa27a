"""Tensor values for ``show``: torch's own print format, and nested lists for JSON."""
from __future__ import annotations

import math
from typing import Any

from .formats.dtypes import NO_ARITHMETIC

MAX_DENSE = 1 << 31  # elements a sparse tensor's values may expand to (8 GiB of float32)


def is_storage(t: Any) -> bool:
    """A bare storage (``torch.save(t.untyped_storage())``), listed as a 1-D tensor of its elements."""
    import torch

    return isinstance(t, (torch.storage.TypedStorage, torch.UntypedStorage))


def as_tensor(t: Any) -> Any:
    """A bare storage as the 1-D tensor of its elements (a view, no copy); a tensor as it is."""
    import torch

    if isinstance(t, torch.storage.TypedStorage):
        return torch.empty(0, dtype=t.dtype).set_(t._untyped_storage)
    if isinstance(t, torch.UntypedStorage):
        return torch.empty(0, dtype=torch.uint8).set_(t)
    return t


def kind_of(t: Any) -> str:
    """``toc.kind_text`` for a real tensor (or storage): the same words for what it is beyond a plain view."""
    import torch

    if isinstance(t, (torch.storage.TypedStorage, torch.UntypedStorage)):
        return "untyped storage" if isinstance(t, torch.UntypedStorage) else f"{str(t.dtype)[6:]} storage"
    if t.is_meta:
        return "meta"
    if t.is_quantized:
        scheme = str(t.qscheme()).removeprefix("torch.")
        if scheme.startswith("per_tensor"):
            return f"quantized {scheme} scale={t.q_scale():g} zero_point={t.q_zero_point()}"
        return f"quantized {scheme} axis={t.q_per_channel_axis()}"
    if t.is_nested:
        return f"{'jagged ' if t.layout == torch.jagged else ''}nested of {t.size(0)} tensors"
    if t.layout != torch.strided:
        return f"{str(t.layout).removeprefix('torch.')} nnz={t._nnz()}"
    bits = [b for b, on in (("conj", t.is_conj()), ("neg", t.is_neg())) if on]
    return " ".join(bits) + " view" if bits else ""


def readable(t: Any, name: str = "", bits: bool = False) -> Any:
    """The values torch gives for ``t`` as a plain strided tensor: a quantized tensor's ``dequantize()``, a
    sparse one's ``to_dense()``, a nested one's components one after another, conj/neg bits resolved. A meta
    tensor has no values: an error naming it, and so is a dtype torch computes nothing on, unless ``bits``
    asks for its bit patterns (as same-sized integers) to compare."""
    import torch

    t = as_tensor(t)
    if t.is_meta:
        from .errors import ParamtoolError

        raise ParamtoolError(f"'{name}' is a meta tensor: the file holds its shape and dtype, no values")
    if t.is_quantized:
        return t.dequantize()
    if str(t.dtype).removeprefix("torch.") in NO_ARITHMETIC:
        if bits:  # (to compare or checksum: the bit patterns, as integers of the same size)
            return t.view(torch.uint8 if t.element_size() == 1 else torch.int16)
        from .errors import ParamtoolError

        raise ParamtoolError(f"'{name}' is {str(t.dtype).removeprefix('torch.')}: torch has no arithmetic on it "
                             "(its bytes are listed, diffed and converted, not its values)")
    if t.is_nested:
        return torch.cat([c.reshape(-1) for c in t.unbind()])
    if t.layout != torch.strided:
        if t.numel() > MAX_DENSE:  # (a few bytes of a file can claim any dense shape)
            from .errors import ParamtoolError

            raise ParamtoolError(f"'{name}' is sparse with a dense shape of {t.numel()} elements: its values "
                                 f"are read as to_dense() up to {MAX_DENSE} elements")
        return t.to_dense()
    return t.resolve_conj().resolve_neg() if t.is_conj() or t.is_neg() else t


def storable(t: Any, name: str, where: str) -> Any:
    """``t`` as a dense tensor a flat format (``where``) can hold with the values torch gives (conj/neg bits
    resolved, a bare storage as its 1-D tensor); a tensor it cannot hold is an error naming it, never dropped."""
    t = as_tensor(t)
    kind = "a meta" if t.is_meta else "a quantized" if t.is_quantized else "a nested" if t.is_nested else \
        f"a {str(t.layout).removeprefix('torch.')}" if str(t.layout) != "torch.strided" else None
    if kind:
        from .errors import FormatError

        raise FormatError(f"{where} cannot hold '{name}': {kind} tensor (keep the .pt format, or drop it "
                          "with `paramtool drop`)")
    return t.resolve_conj().resolve_neg() if t.is_conj() or t.is_neg() else t


def tensor_text(t: Any) -> str:
    """What ``print(t.data)`` prints: torch elides large tensors itself."""
    return repr(readable(t).detach())


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

    data = readable(t, name).detach()
    if data.dtype in (torch.bfloat16, torch.float16) or str(data.dtype).startswith("torch.float8"):
        data = data.float()
    return json_doc(name, list(data.shape), str(t.dtype).removeprefix("torch."), data.tolist())


def json_doc(name: str, shape: list[int], dtype: str, values: Any) -> dict:
    """``show --json``'s document: ``values`` nested lists (``tolist()``), non-finite numbers as strings."""
    return {"name": name, "shape": shape, "dtype": dtype, "values": _clean(values)}

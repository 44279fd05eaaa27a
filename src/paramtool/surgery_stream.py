"""Streamed surgery: rename, drop and cast written one storage at a time, straight from the input's bytes.

The operation is carried out on the file's listing (stand-in tensors, no data); the output is then written
from it: a safetensors header is rebuilt (names, dtypes, offsets, tie metadata) and a torch zip file gets a
new pickle. Storage bytes are copied verbatim, or read and cast one storage at a time, so memory stays near
the largest storage whatever the size of the checkpoint.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from .records import replace
from typing import Any, Hashable

from . import tree
from .checkpoint import Checkpoint
from .toc import FakeTensor, TensorInfo, contiguous_stride, itemsize

_PLAIN = (str, int, float, bool, bytes, type(None))


def can_stream(listing: Checkpoint, plan: Any) -> bool:
    """Can ``plan`` be written straight from ``listing``'s bytes (same format, structure only plain containers)?"""
    if plan.report.action.startswith("resize") or not listing.path or not listing.layout.byte_ranges:
        return False
    if listing.layout.holds_non_tensors and not _plain_tree(listing.root):
        return False
    out = transformed(listing, plan)
    groups = _by_storage(out.infos() if listing.layout.flat else _all_infos(out.root))
    if plan.cast and any(len({t.dtype for t in members}) > 1 for members in groups.values()):
        return False  # a storage holding both cast and uncast views cannot be written once
    if listing.layout.flat:
        return all(_whole(members) is not None for members in groups.values())
    return True


def _plain_tree(root: Any) -> bool:
    """Only containers, plain values and tensors: what a new pickle can say exactly as the old one did."""
    stack = [root]
    while stack:
        obj = stack.pop()
        if isinstance(obj, FakeTensor) or type(obj) in _PLAIN:
            continue
        if type(obj) in (dict, OrderedDict):
            if set(getattr(obj, "__dict__", {})) - {"_metadata"}:
                return False
            stack.extend(obj.keys())
            stack.extend(obj.values())
            stack.append(getattr(obj, "_metadata", None))
        elif type(obj) in (list, tuple, set, frozenset):
            stack.extend(obj)
        else:
            return False
    return True


def _all_infos(root: Any) -> list[TensorInfo]:
    """Every tensor of a container, the optimizer's too (they share the file's storages)."""
    return [tree.tensor_info(".".join(map(str, p)), p, t) for p, t in tree.walk(root)]


def _by_storage(infos: list[TensorInfo]) -> dict[Hashable, list[TensorInfo]]:
    out: dict[Hashable, list[TensorInfo]] = {}
    for info in infos:
        out.setdefault(info.storage, []).append(info)
    return out


def transformed(listing: Checkpoint, plan: Any) -> Checkpoint:
    """A copy of the listing with the plan carried out on its stand-ins (nothing is read)."""
    out = copy.copy(listing)
    out.root = copy.deepcopy(listing.root)
    out.names = dict(listing.names)
    out.meta_ties = dict(listing.meta_ties)
    out.metadata = dict(listing.metadata) if listing.metadata is not None else None
    if plan.cast:
        dtype, chosen = plan.cast
        for name in chosen & set(out.names):  # (a shard holds some of the names)
            ft = out.tensor(name)
            tree.set_path(out.root, out.names[name], replace(ft, dtype=dtype, storage=replace(ft.storage, dtype=dtype)))
    else:
        plan.run(out)
    return out


def write(listing: Checkpoint, plan: Any, output: Any) -> Checkpoint:
    """Write the plan's result as ``output`` (a file, atomically, or stdout), then verify it; returns the
    result's listing."""
    from . import writer
    from .formats.storage import open_storage_file

    storage_file = open_storage_file(listing)
    out = transformed(listing, plan)
    overflows: dict[str, int] = {}

    def write_to(path: str) -> None:
        if listing.layout.flat:
            _write_safetensors(listing, out, storage_file, path, overflows)
        else:
            _write_zip(out, storage_file, path, overflows)
        writer._verify_file(out, output.format, path)

    try:
        writer.emit(output, write_to)
    finally:
        storage_file.close()
    if plan.cast:
        from .surgery import record_overflow

        record_overflow(plan.report, _overflow_names(out, overflows), plan.cast[0])
    return out


def _overflow_names(out: Checkpoint, by_storage: dict[Hashable, int]) -> dict[str, int]:
    """Overflow counts by storage -> by the first name on each storage."""
    named: dict[str, int] = {}
    for info in out.infos():
        if info.storage in by_storage:
            named[info.name] = by_storage.pop(info.storage)
    return named


def _produce(storage_file: Any, key: Hashable, dtype: str, overflows: dict[Hashable, int]) -> Any:
    """One output storage: the input's bytes, cast when the dtype changes."""
    from .surgery import cast_storage

    flat = storage_file.read_storage(key)
    if storage_file.spans[key].dtype == dtype:
        return flat
    out, overflow = cast_storage(flat, dtype)
    storage_file.recycle(flat)
    if overflow:
        overflows[key] = overflow
    return out


# ---------------------------------------------------------------- safetensors


def _whole(members: list[TensorInfo]) -> TensorInfo | None:
    """The member that is the whole storage (what a safetensors header stores), if any."""
    n = max(t.numel for t in members)
    for t in members:
        if t.offset == 0 and t.numel == n and tuple(t.stride) == contiguous_stride(t.shape):
            return t
    return None


def _write_safetensors(listing: Checkpoint, out: Checkpoint, storage_file: Any, path: str,
                       overflows: dict[Hashable, int]) -> None:
    """``safetensors_fmt.layout``'s header (the one ``save`` writes), then each stored tensor: the input's
    bytes as they are, or read and cast."""
    from .formats import safetensors_fmt
    from .formats.storage import _as_bytes, _copy

    old_stored = set(listing.names) - set(listing.meta_ties)
    _, _, rest = safetensors_fmt.split_metadata(dict(listing.metadata or {}), old_stored)  # old tie records go
    stored, meta = safetensors_fmt.layout(out.infos(), rest)
    with open(path, "wb") as f:
        f.write(safetensors_fmt.header([(t.name, t.dtype, tuple(t.shape)) for t in stored], meta))
        for t in stored:
            span = storage_file.spans[t.storage]
            whole = t.offset == 0 and t.numel * itemsize(span.dtype) == span.nbytes \
                and tuple(t.stride) == contiguous_stride(t.shape)
            if span.dtype == t.dtype and whole:  # untouched: the bytes as they are
                storage_file._file.seek(span.offset)
                _copy(storage_file._file, f, span.nbytes)
                continue
            data = _produce(storage_file, t.storage, t.dtype, overflows)
            if not whole:
                data = data.as_strided(t.shape, t.stride, t.offset).contiguous()
            f.write(_as_bytes(data))
            del data


# ---------------------------------------------------------------- torch zip


def _write_zip(out: Checkpoint, storage_file: Any, path: str, overflows: dict[Hashable, int]) -> None:
    """A torch zip file as ``torch.save`` writes it (``formats.pt``'s pickle and zip writer): the pickle, the
    format records, then each storage, copied or cast, one at a time."""
    from .formats import pt
    from .formats.storage import _as_bytes

    data, storages = pt.pickle_with_storages(out.root)

    def records() -> Any:
        for s in storages.values():
            span = storage_file.spans[s.source]
            if span.dtype == s.dtype:  # untouched: the storage's bytes as they are (mapped)
                yield s.key, storage_file.raw_storage(s.source)
            else:
                yield s.key, _as_bytes(_produce(storage_file, s.source, s.dtype, overflows))

    pt.write_zip(path, data, records())

"""Streamed surgery: rename, drop and cast written one storage at a time, straight from the input's bytes:
a file into either one-file format, a sharded checkpoint into one file, or (called per shard) a shard.

The operation is carried out on the file's listing (stand-in tensors, no data); the output is then written
from it: a safetensors header is rebuilt (names, dtypes, offsets, tie metadata) and a torch zip file gets a
new pickle. Storage bytes are copied verbatim, cast chunk by chunk as they are read (numpy on the bits, no
torch: ``numeric.cast_values``), or, for a tensor that is part of its storage, read and cast one storage at a
time by torch, so memory stays near a few chunks, or the largest storage, whatever the size of the checkpoint.
"""
from __future__ import annotations

import copy
import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Hashable

from . import tree
from .checkpoint import Checkpoint
from .records import replace
from .toc import FakeTensor, TensorInfo, contiguous_stride

if TYPE_CHECKING:
    from .convert_stream import Cast
    from .plan import Plan, Report
    from .commit import Output

_PLAIN = (str, int, float, bool, bytes, type(None))


def can_stream(listing: Checkpoint, plan: Plan, output_layout: Any = None) -> bool:
    """Can ``plan`` be written straight from ``listing``'s bytes into ``output_layout`` (None: the file's own
    format)? A file into its own format (structure only plain containers) or into the other one-file format;
    a sharded checkpoint, each shard streamable, into one file."""
    parts = getattr(listing, "parts", None)
    if parts:
        return _into_one_file(listing, plan, output_layout) and all(can_stream(p, plan) for p in parts.values())
    if plan.resized or not listing.path or not listing.byte_ranges:
        return False
    if os.name != "posix":  # storages are read through private (copy-on-write) mappings
        return False
    if listing.layout.holds_non_tensors and not _plain_tree(listing.root):
        return False
    if output_layout is not None and not listing.layout.can_patch(output_layout) and \
            not _into_one_file(listing, plan, output_layout):
        return False
    out = transformed(listing, plan)
    groups = _by_storage(out.infos() if listing.layout.flat else _all_infos(out.root))
    if plan.cast and any(len({t.dtype for t in members}) > 1 for members in groups.values()):
        return False  # a storage holding both cast and uncast views cannot be written once
    if listing.layout.flat:
        return all(_whole(members) is not None for members in groups.values())
    return True


def _into_one_file(listing: Checkpoint, plan: Plan, output_layout: Any) -> bool:
    """Can the result go into one file of another format than the input's, as the loaded path would write
    it? Not with ``--key`` (a sub-tree), or non-tensor entries into safetensors (the loaded path says why)."""
    from .writer import non_tensor_entries

    if output_layout is None or not output_layout.single_file or plan.sidecars or listing.key is not None:
        return False
    if not output_layout.holds_non_tensors:
        return not any(non_tensor_entries(p) for p in (getattr(listing, "parts", None) or {"": listing}).values())
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


def transformed(listing: Checkpoint, plan: Plan) -> Checkpoint:
    """A copy of the listing with the plan carried out on its stand-ins (nothing is read); a sharded
    listing's shards each, its names following them in the index's order."""
    if getattr(listing, "parts", None):
        return _transformed_shards(listing, plan)
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
        plan.restructure(out)
    return out


def _transformed_shards(listing: Checkpoint, plan: Plan) -> Any:
    out = copy.copy(listing)
    out.parts = {s: transformed(p, plan) for s, p in listing.parts.items()}
    out.root = {s: p.root for s, p in out.parts.items()}
    names = {n: (s,) + tuple(path) for s, p in out.parts.items() for n, path in p.names.items()}
    order = [plan.rename.get(n, n) for n in listing.names]
    out.names = {n: names[n] for n in dict.fromkeys(order + list(names)) if n in names}
    out.meta_ties = {n: t for p in out.parts.values() for n, t in p.meta_ties.items()}
    out.metadata = dict(listing.metadata) if listing.metadata is not None else None
    return out


def write(listing: Checkpoint, plan: Plan, output: Output) -> Checkpoint:
    """Write the plan's result as ``output`` (a file, atomically, or stdout), then verify it; returns the
    result's listing (nothing is written when it holds no tensor). Storages are read mapped (``convert_stream``'s readers: one file, or every shard),
    and written by ``convert_stream``'s writers: bytes that stay as they are are copied, the next storage to
    cast is read and cast on a worker thread while the current one is written."""
    from . import writer
    from .commit import emit
    from .convert_stream import Cast, memory_bound, reader_of, sharded_root, write_pt

    out = transformed(listing, plan)
    if not out.names:  # (a shard a drop leaves empty: nothing to write)
        return out
    reader = reader_of(listing)
    cast = Cast(reader)

    def write_to(path: str) -> None:
        with memory_bound():
            if not output.layout.holds_non_tensors:
                _write_safetensors(listing, out, reader, path, cast)
            else:
                write_pt(path, sharded_root(out) if getattr(out, "parts", None) else out.root, reader, cast)
        writer.verify_file(out, output.format, path)

    try:
        emit(output, write_to)
    finally:
        reader.close()
    if plan.cast:
        record_overflow(plan.report, _overflow_names(out, cast.overflows), plan.cast[0])
    return out


def _overflow_names(out: Checkpoint, by_storage: dict[Hashable, int]) -> dict[str, int]:
    """Overflow counts by storage -> by the first name on each storage."""
    named: dict[str, int] = {}
    for info in out.infos():
        if info.storage in by_storage:
            named[info.name] = by_storage.pop(info.storage)
    return named


# ---------------------------------------------------------------- safetensors


def _whole(members: list[TensorInfo]) -> TensorInfo | None:
    """The member that is the whole storage (what a safetensors header stores), if any."""
    n = max(t.numel for t in members)
    for t in members:
        if t.offset == 0 and t.numel == n and tuple(t.stride) == contiguous_stride(t.shape):
            return t
    return None


def _write_safetensors(listing: Checkpoint, out: Checkpoint, reader: Any, path: str, cast: Cast) -> None:
    """``safetensors_fmt.layout``'s header (the one ``save`` writes; the input's tie records recomputed), then
    each stored tensor: the input's bytes as they are, or read and cast (``convert_stream``'s writer)."""
    from .convert_stream import write_safetensors
    from .formats import safetensors_fmt

    old_stored = set(listing.names) - set(listing.meta_ties)
    _, _, rest = safetensors_fmt.split_metadata(dict(listing.metadata or {}), old_stored)  # old tie records go
    write_safetensors(path, *safetensors_fmt.layout(out.infos(), rest), reader, cast)


def record_overflow(report: Report, overflows: dict[str, int], dtype: str) -> None:
    """Warn, in the report, of the values that became inf by a cast to ``dtype`` (``{name: count}``)."""
    if overflows:
        total = sum(overflows.values())
        report.warnings.append(f"{total} value(s) overflow {dtype} and became inf: "
                               + ", ".join(f"{n} ({k})" for n, k in overflows.items()))

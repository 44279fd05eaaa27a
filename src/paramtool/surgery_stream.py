"""Streamed surgery: rename, drop and cast written one storage at a time, straight from the input's bytes.

The operation is carried out on the file's listing (stand-in tensors, no data); the output is then written
from it: a safetensors header is rebuilt (names, dtypes, offsets, tie metadata) and a torch zip file gets a
new pickle. Storage bytes are copied verbatim, or read and cast one storage at a time, so memory stays near
the largest storage whatever the size of the checkpoint.
"""
from __future__ import annotations

import copy
import io
import json
import pickle
from collections import OrderedDict
from dataclasses import replace
from typing import Any, Hashable

from . import tree
from .checkpoint import Checkpoint
from .toc import FakeTensor, TensorInfo, contiguous_stride, itemsize

_PLAIN = (str, int, float, bool, bytes, type(None))


def can_stream(listing: Checkpoint, plan: Any) -> bool:
    """Can ``plan`` be written straight from ``listing``'s bytes (same format, structure only plain containers)?"""
    if plan.report.action.startswith("resize") or not listing.path or listing.format not in ("pt", "safetensors"):
        return False
    if listing.format == "pt" and not _plain_tree(listing.root):
        return False
    out = transformed(listing, plan)
    groups = _by_storage(out.infos() if listing.format == "safetensors" else _all_infos(out.root))
    if plan.cast and any(len({t.dtype for t in members}) > 1 for members in groups.values()):
        return False  # a storage holding both cast and uncast views cannot be written once
    if listing.format == "safetensors":
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
    from .stream import open_storage_file

    storage_file = open_storage_file(listing)
    out = transformed(listing, plan)
    overflows: dict[str, int] = {}

    def write_to(path: str) -> None:
        if listing.format == "safetensors":
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
    from .formats.safetensors_fmt import TIES_KEY, split_metadata
    from .stream import _as_bytes, _copy

    groups = _by_storage(out.infos())
    ordered = sorted(groups, key=lambda k: storage_file.spans[k].offset)
    stored = set(listing.names) - set(listing.meta_ties)
    _, _, meta = split_metadata(dict(listing.metadata or {}), stored)
    meta.setdefault("format", "pt")
    views: dict[str, dict] = {}
    header: dict[str, Any] = {}
    pos = 0
    codes = {v: k for k, v in _dtype_codes().items()}
    for key in ordered:
        members = groups[key]
        keep = _whole(members)
        nbytes = keep.numel * itemsize(keep.dtype)
        header[keep.name] = {"dtype": codes[keep.dtype], "shape": list(keep.shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
        for t in members:
            if t.name == keep.name:
                continue
            if (t.offset, t.shape, t.stride) == (keep.offset, keep.shape, keep.stride):
                meta[t.name] = keep.name
            else:
                views[t.name] = {"of": keep.name, "offset": t.offset, "shape": list(t.shape), "stride": list(t.stride)}
    if views:
        meta[TIES_KEY] = json.dumps(views, sort_keys=True)
    text = json.dumps({"__metadata__": meta, **header}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for key in ordered:
            dtype = _whole(groups[key]).dtype
            span = storage_file.spans[key]
            if span.dtype == dtype:  # untouched: the bytes as they are
                storage_file._file.seek(span.offset)
                _copy(storage_file._file, f, span.nbytes)
            else:
                data = _produce(storage_file, key, dtype, overflows)
                f.write(_as_bytes(data))
                del data


def _dtype_codes() -> dict[str, str]:
    from .formats.safetensors_fmt import DTYPES

    return DTYPES


# ---------------------------------------------------------------- torch zip


class _StorageOut:
    """A storage of the output file, as the pickle refers to it."""

    __slots__ = ("key", "dtype", "numel", "location", "source")

    def __init__(self, key: str, dtype: str, numel: int, location: str, source: Hashable) -> None:
        self.key, self.dtype, self.numel, self.location, self.source = key, dtype, numel, location, source


class _Data:
    """A parameter's data: pickled as a plain tensor inside ``_rebuild_parameter``."""

    __slots__ = ("fake",)

    def __init__(self, fake: FakeTensor) -> None:
        self.fake = fake


def _pickled(root: Any) -> tuple[bytes, dict[Hashable, _StorageOut]]:
    """The container pickled as ``torch.save`` pickles it: tensors rebuilt by torch's own functions from
    numbered storages (persistent ids); returns the pickle and the storages it names, by input storage key."""
    import torch

    storages: dict[Hashable, _StorageOut] = {}
    type_names = torch.storage._dtype_to_storage_type_map()

    def storage_of(ft: FakeTensor) -> _StorageOut:
        ref = ft.storage
        if ref.key not in storages:
            storages[ref.key] = _StorageOut(str(len(storages)), ref.dtype, ref.numel, ref.location, ref.key)
        return storages[ref.key]

    def tensor_reduce(ft: FakeTensor, requires_grad: bool) -> tuple:
        return (torch._utils._rebuild_tensor_v2,
                (storage_of(ft), ft.offset, tuple(ft.shape), tuple(ft.stride), requires_grad, OrderedDict()))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            if type(obj) is _StorageOut:
                kind = getattr(torch, type_names[getattr(torch, obj.dtype)])
                return ("storage", kind, obj.key, obj.location, obj.numel)
            return None

        def reducer_override(self, obj: Any) -> Any:
            if type(obj) is FakeTensor:
                if obj.is_parameter:
                    return (torch._utils._rebuild_parameter, (_Data(obj), obj.requires_grad, OrderedDict()))
                return tensor_reduce(obj, obj.requires_grad)
            if type(obj) is _Data:
                return tensor_reduce(obj.fake, False)
            return NotImplemented

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(root)
    return buf.getvalue(), storages


def _write_zip(out: Checkpoint, storage_file: Any, path: str, overflows: dict[Hashable, int]) -> None:
    """A torch zip file as ``torch.save`` writes it: the pickle, the format records, then each storage,
    copied or cast, one at a time."""
    import sys

    import torch

    data, storages = _pickled(out.root)
    # through a Python file object, as torch.save and stream.py do: on a path, torch's C++ writer aborts the
    # process on a write error, and rejects a temporary's name (".paramtool-tmp-...-out" has no stem)
    with open(path, "wb") as f:
        writer = torch._C.PyTorchFileWriter(f)
        writer.write_record("data.pkl", data, len(data))
        writer.write_record(".format_version", "1", 1)
        alignment = str(torch.serialization._get_storage_alignment())
        writer.write_record(".storage_alignment", alignment, len(alignment))
        writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        for s in storages.values():
            span = storage_file.spans[s.source]
            if span.dtype == s.dtype:  # untouched: the record's bytes as they are
                raw = storage_file.reader.get_record(span.record)
                writer.write_record(f"data/{s.key}", raw, len(raw))
                del raw
            else:
                tensor = _produce(storage_file, s.source, s.dtype, overflows)
                writer.write_record(f"data/{s.key}", tensor.untyped_storage(), tensor.untyped_storage().nbytes())
                del tensor
        writer.write_end_of_file()

"""``convert`` one storage at a time, for every pair of formats: pt <-> safetensors, sharded -> one file,
DCP -> one file.

Both writers need only the listing (names, shapes, dtypes, storages, ties) to lay the output out, so the
header (safetensors) or the pickle (torch zip) is written first and the storages follow, each read from
the source, written, and freed before the next (with one read ahead). A checkpoint larger than memory
converts; memory stays near two storages.

- safetensors: the header's offsets are computed from the listing; ties are stored once and recorded in
  the metadata exactly as ``safetensors_fmt.save`` records them.
- torch zip: the pickle is what ``torch.save`` writes for a dict of tensors (``_rebuild_tensor_v2`` over
  persistent storage ids), made by a pickler of its own over stand-ins; records are written with Python's
  ``zipfile`` (stored, 64-byte aligned data, as torch writes them), so every write error is a Python
  exception naming the cause, never an abort inside torch's C++ writer.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import uuid
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from .errors import FormatError, ParamtoolError
from .toc import TensorInfo, contiguous_stride, itemsize

ALIGN = 64  # torch's storage alignment inside the zip
ARCHIVE = "archive"


@dataclass
class StorageReader:
    """The storages of a listing, read one at a time: ``read(key)`` gives a 1-D tensor of the storage's
    dtype, ``nbytes(key)`` its size without reading it."""

    read: Callable[[Hashable], Any]
    nbytes: Callable[[Hashable], int]
    close: Callable[[], None]
    recycle: Callable[[Hashable, Any], None] = lambda key, t: None  # written: its memory serves the next read


# --- readers --------------------------------------------------------------------------------------------


def _file_reader(listing: Any) -> StorageReader | None:
    from .stream import open_storage_file

    sf = open_storage_file(listing)
    if sf is None:
        return None
    return StorageReader(sf.map_storage, lambda k: sf.spans[k].nbytes, sf.close)  # mapped, copy-on-write


def _sharded_reader(listing: Any) -> StorageReader | None:
    """Keys are ``(shard, key in shard)``, as the sharded listing names them."""
    files: dict[str, StorageReader] = {}
    for shard, part in listing.parts.items():
        if part.format not in ("pt", "safetensors"):
            for r in files.values():
                r.close()
            return None
        files[shard] = _file_reader(part)

    def close() -> None:
        for r in files.values():
            r.close()

    return StorageReader(lambda k: files[k[0]].read(k[1]), lambda k: files[k[0]].nbytes(k[1]), close,
                         lambda k, t: files[k[0]].recycle(k[1], t))


def _dcp_reader(listing: Any) -> StorageReader:
    """One tensor entry at a time, read by ``dcp.read_tensor`` (paramtool's own DCP reader); the
    metadata read once. Keys are the listing's ``("dcp", fqn)``."""
    from .formats import dcp
    from .tree import walk

    md = dcp._metadata(listing.path)
    items = dcp._items(listing.path, md)
    entries = {fqn: entry for fqn, _, entry in dcp._entries(listing.path, md) if entry is not None}
    refs = {fake.storage.key: fake.storage for _, fake in walk(listing.root)}

    def read(key: Hashable) -> Any:
        fqn = key[1]
        try:
            return dcp.read_tensor(listing.path, fqn, entries[fqn], items.get(fqn, [])).reshape(-1)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:  # a chunk torch cannot place
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise FormatError(f"{listing.path}: cannot read '{fqn}': {first[:200]}") from None

    return StorageReader(read, lambda k: refs[k].nbytes, lambda: None)


def open_reader(src: Any, listing: Any) -> StorageReader | None:
    """A storage reader for sources with byte ranges (zip torch files, safetensors, their shards, DCP);
    None where the data can only be loaded whole (legacy torch files, models built in Python)."""
    if src.kind == "file" and src.format in ("pt", "safetensors"):
        return _file_reader(listing)
    if src.kind == "sharded":
        return _sharded_reader(listing)
    if src.kind == "dcp":
        return _dcp_reader(listing)
    return None


# --- safetensors ----------------------------------------------------------------------------------------


def _st_code(dtype: str) -> str | None:
    from .formats.safetensors_fmt import DTYPES

    return next((code for code, name in DTYPES.items() if name == dtype), None)


def safetensors_layout(infos: list[TensorInfo], metadata: dict[str, str] | None) -> tuple[list[TensorInfo], dict[str, str]]:
    """(the tensors stored, in order; the header metadata): each tie group stores its largest, earliest
    view once; the others are recorded as aliases or views, the convention ``safetensors_fmt.save`` uses."""
    from .formats.safetensors_fmt import TIES_KEY, split_metadata
    from .ties import group_kind, storage_groups

    order = {t.name: i for i, t in enumerate(infos)}
    dropped: set[str] = set()
    aliases: dict[str, str] = {}
    views: dict[str, dict] = {}
    for group in storage_groups(infos):
        keep = max(group, key=lambda t: (t.numel, -order[t.name]))
        for t in group:
            if t.name == keep.name:
                continue
            dropped.add(t.name)
            if (t.offset, t.shape, t.stride) == (keep.offset, keep.shape, keep.stride) and group_kind([keep, t]) == "alias":
                aliases[t.name] = keep.name
            else:
                views[t.name] = {"of": keep.name, "offset": t.offset - keep.offset, "shape": list(t.shape),
                                 "stride": list(t.stride)}
    _, _, rest = split_metadata(dict(metadata or {}), {t.name for t in infos})
    meta = {**rest, **aliases}
    if views:
        meta[TIES_KEY] = json.dumps(views, sort_keys=True)
    return [t for t in infos if t.name not in dropped], meta


def _header(stored: list[TensorInfo], meta: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": meta} if meta else {}
    pos = 0
    for t in stored:
        header[t.name] = {"dtype": _st_code(t.dtype), "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors pads it
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors(path: str, infos: list[TensorInfo], metadata: dict[str, str] | None,
                      reader: StorageReader) -> None:
    """Header first (offsets from the listing), then each stored tensor's bytes, one storage in memory."""
    from .stream import _ahead, _as_bytes

    stored, meta = safetensors_layout(infos, metadata)
    bad = next((t for t in stored if _st_code(t.dtype) is None), None)
    if bad is not None:
        raise ParamtoolError(f"safetensors cannot hold {bad.dtype} tensors ('{bad.name}')")

    def produce(t: TensorInfo) -> Any:
        storage = reader.read(t.storage)
        if t.offset == 0 and tuple(t.stride) == contiguous_stride(t.shape) and storage.numel() == t.numel:
            return storage
        view = storage.as_strided(t.shape, t.stride, t.offset).contiguous()
        reader.recycle(t.storage, storage)
        return view

    with open(path, "wb") as out:
        out.write(_header(stored, meta))
        for t, data in _ahead(stored, produce):
            out.write(_as_bytes(data))
            reader.recycle(t.storage, data)
            del data


# --- torch zip ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _StorageId:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class _TensorStub:
    storage: _StorageId
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _storage_type(dtype: str) -> Any:
    import torch

    name = torch.storage._dtype_to_storage_type_map().get(getattr(torch, dtype, None))
    return getattr(torch, name) if name else None


class _Pickler(pickle.Pickler):
    """Pickles stand-ins exactly as ``torch.save`` pickles tensors: ``_rebuild_tensor_v2`` over a
    persistent ``('storage', <dtype>Storage, key, 'cpu', numel)``; no tensor data is needed."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, _TensorStub):
            import torch

            return torch._utils._rebuild_tensor_v2, (obj.storage, obj.offset, obj.shape, obj.stride, False,
                                                     OrderedDict())
        return NotImplemented

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageId):
            return ("storage", _storage_type(obj.dtype), obj.key, "cpu", obj.numel)
        return None


def _zip_record(zf: zipfile.ZipFile, name: str, data: Any) -> None:
    """One stored record whose data starts on a 64-byte boundary (padding in the local header's extra
    field, as torch pads it), so torch can memory-map the storages."""
    view = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else data
    info = zipfile.ZipInfo(f"{ARCHIVE}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = info.compress_size = len(view)
    info.CRC = 0  # (zipfile computes it while writing; FileHeader needs a value to measure its length)
    zip64 = info.file_size > zipfile.ZIP64_LIMIT * 0.9
    header = len(info.FileHeader(zip64))
    pad = -(zf.fp.tell() + header + 4) % ALIGN
    info.extra = b"FB" + pad.to_bytes(2, "little") + b"Z" * pad
    with zf.open(info, "w", force_zip64=zip64) as f:
        f.write(view)


def write_pt(path: str, infos: list[TensorInfo], reader: StorageReader) -> None:
    """A ``torch.save`` zip of the flat state dict ``{name: tensor}``: ties stay shared storages."""
    keys: dict[Hashable, _StorageId] = {}
    state: dict[str, _TensorStub] = {}
    for t in infos:
        if t.storage not in keys:
            nbytes = reader.nbytes(t.storage)
            if _storage_type(t.dtype) is None:
                raise ParamtoolError(f"this torch cannot save {t.dtype} tensors ('{t.name}')")
            keys[t.storage] = _StorageId(str(len(keys)), t.dtype, nbytes // itemsize(t.dtype))
        state[t.name] = _TensorStub(keys[t.storage], t.offset, tuple(t.shape), tuple(t.stride))
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(state)
    from .stream import _ahead, _as_bytes

    with open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        _zip_record(zf, "data.pkl", buf.getvalue())
        _zip_record(zf, ".format_version", b"1")
        _zip_record(zf, ".storage_alignment", str(ALIGN).encode())
        _zip_record(zf, "byteorder", b"little")
        for key, data in _ahead(list(keys), reader.read):
            _zip_record(zf, f"data/{keys[key].key}", _as_bytes(data))
            reader.recycle(key, data)
            del data
        _zip_record(zf, "version", b"3\n")
        _zip_record(zf, ".data/serialization_id", uuid.uuid4().hex.encode()[:40].ljust(40, b"0"))


# --- entry point ----------------------------------------------------------------------------------------


def convert_streamed(src: Any, listing: Any, output: Any, drop_extra: bool,
                     non_tensor: Callable[[Any], list[str]], verify: Callable[[str], None],
                     emit: Callable[[Any, Callable[[str], None]], None]) -> bool:
    """Write ``listing`` as ``output`` storage by storage; False when the source cannot be streamed (the
    caller then loads it whole). ``non_tensor``, ``verify`` and ``emit`` are the writer's own rules."""
    if output.format not in ("pt", "safetensors") or os.name != "posix":
        return False
    if output.format == "pt" and src.kind == "file" and src.format == "pt":
        return False  # same format: the patched copy keeps every byte (the caller's streamed path)
    infos = listing.infos()
    if output.format == "safetensors":
        dropped = non_tensor(listing)
        if dropped and not drop_extra:
            shown = ", ".join(dropped[:6]) + (f" and {len(dropped) - 6} more" if len(dropped) > 6 else "")
            raise ParamtoolError(
                f"safetensors cannot hold non-tensor entries ({shown}); pass --drop-extra to write the tensors only")
    elif any(_storage_type(t.dtype) is None for t in infos):
        return False
    reader = open_reader(src, listing)
    if reader is None:
        return False
    try:
        def write(path: str) -> None:
            try:
                if output.format == "safetensors":
                    write_safetensors(path, infos, listing.metadata, reader)
                else:
                    write_pt(path, infos, reader)
            except MemoryError:
                raise ParamtoolError("out of memory while converting (one storage at a time did not fit)") from None
            except RuntimeError as e:  # torch's allocator: "DefaultCPUAllocator: can't allocate memory"
                if "allocate" not in str(e):
                    raise
                raise ParamtoolError("out of memory while converting (one storage at a time did not fit)") from None
            verify(path)

        emit(output, write)
    finally:
        reader.close()
    return True

"""``convert`` one storage at a time, for every pair of formats: pt <-> safetensors, sharded -> one file,
DCP -> one file.

Both writers need only the listing (names, shapes, dtypes, storages, ties) to lay the output out, so the
header (safetensors) or the pickle (torch zip) is written first and the storages follow, each read from
the source, written, and freed before the next (with one read ahead). A checkpoint larger than memory
converts; memory stays near two storages.

- safetensors: the header is ``safetensors_fmt.layout``'s, the one ``safetensors_fmt.save`` writes (ties,
  order, format metadata).
- torch zip: the pickle is what ``torch.save`` writes for the container the loaded path would save
  (``writer.pt_root``), made by ``formats.pt.pickle_with_storages`` over the stand-ins; records are written
  by ``formats.pt.write_zip``. Where the stand-ins cannot say what the loaded container holds (a DCP
  checkpoint's non-tensor entries), the caller loads it whole instead.
"""
from __future__ import annotations

import errno
import os
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .errors import FormatError, ParamtoolError
from .records import dataclass, replace
from .toc import TensorInfo, contiguous_stride, itemsize

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .sources import Source
    from .commit import Output


@dataclass
class StorageReader:
    """The storages of a listing, read one at a time: ``read(key)`` gives a 1-D tensor of the storage's
    dtype, ``nbytes(key)`` its size without reading it."""

    read: Callable[[Hashable], Any]
    nbytes: Callable[[Hashable], int]
    close: Callable[[], None]
    recycle: Callable[[Hashable, Any], None] = lambda key, t: None  # written: its memory serves the next read
    # where storages are byte ranges of files: their bytes as they are, without torch
    chunks: Callable[[Hashable], Any] | None = None  # ``formats.storage.Chunks``, read through a small buffer
    copy: Callable[[Hashable, Any], None] | None = None  # appended to a file by the kernel
    dtype: Callable[[Hashable], str] | None = None  # the storage's dtype as stored (a cast compares with it)


# --- readers --------------------------------------------------------------------------------------------


def _file_reader(listing: Checkpoint) -> StorageReader | None:
    from .formats.storage import open_storage_file

    sf = open_storage_file(listing)
    if sf is None:
        return None
    return StorageReader(sf.map_storage, lambda k: sf.spans[k].nbytes, sf.close,  # mapped, copy-on-write
                         chunks=sf.chunks, copy=sf.copy_storage, dtype=lambda k: sf.spans[k].dtype)


def _sharded_reader(listing: Checkpoint) -> StorageReader | None:
    """Keys are ``(shard, key in shard)``, as the sharded listing names them."""
    files: dict[str, StorageReader] = {}
    for shard, part in listing.parts.items():
        if not part.byte_ranges:
            for r in files.values():
                r.close()
            return None
        files[shard] = _file_reader(part)

    def close() -> None:
        for r in files.values():
            r.close()

    return StorageReader(lambda k: files[k[0]].read(k[1]), lambda k: files[k[0]].nbytes(k[1]), close,
                         lambda k, t: files[k[0]].recycle(k[1], t), lambda k: files[k[0]].chunks(k[1]),
                         lambda k, out: files[k[0]].copy(k[1], out), lambda k: files[k[0]].dtype(k[1]))


def _entry_reader(entries: Any) -> StorageReader:
    """One entry at a time, from a format that reads its storages so (``Format.open_entries``: DCP's tensor
    entries, GGUF's tensors dequantized)."""
    return StorageReader(entries.read_storage, entries.nbytes, entries.close, dtype=entries.dtype)


def reader_of(listing: Checkpoint) -> StorageReader:
    """The reader of a listing with byte ranges: one file's, or a sharded checkpoint's over every shard."""
    return _sharded_reader(listing) if getattr(listing, "parts", None) else _file_reader(listing)


def open_reader(src: Source, listing: Checkpoint) -> StorageReader | None:
    """A storage reader for sources with byte ranges (zip torch files, safetensors, their shards, DCP);
    None where the data can only be loaded whole (legacy torch files, models built in Python)."""
    layout = src.layout
    if layout is None:
        return None
    if src.is_file and layout.byte_ranges:
        return _file_reader(listing) if listing.byte_ranges else None
    if layout.split:
        return _sharded_reader(listing)
    entries = layout.open_entries(listing)
    return _entry_reader(entries) if entries is not None else None


# --- safetensors ----------------------------------------------------------------------------------------


def write_safetensors(path: str, stored: list[TensorInfo], meta: dict[str, str] | None, reader: StorageReader,
                      cast: Cast | None = None) -> None:
    """A safetensors file of ``stored`` (as ``safetensors_fmt.layout`` lays a checkpoint out, with its header
    metadata ``meta``): the header, then each tensor. One whose storage it is whole, in the same dtype, is
    copied as the bytes it is (``reader.copy``: the kernel, no torch); one whose storage it is whole in another
    dtype is cast as it is read where it can be (``cast.chunks``: surgery's ``Cast``); the others are read
    (``cast.cast`` where the dtype changes) and cut to their view, the next one on a worker thread while this
    one is written, one storage in memory at a time."""
    from .formats import safetensors_fmt
    from .formats.storage import produce_ahead, as_bytes

    bad = next((t for t in stored if t.dtype not in safetensors_fmt.CODES), None)
    if bad is not None:
        raise ParamtoolError(f"safetensors cannot hold {bad.dtype} tensors ('{bad.name}')")
    as_is = {t.name for t in stored if reader.copy is not None and not _changes(t, reader) and _whole(t, reader)}
    chunked = _cast_chunks({t.name: t for t in stored if t.name not in as_is and _whole(t, reader)}, reader, cast)
    todo = [t for t in stored if t.name not in as_is and t.name not in chunked]

    def produce(t: TensorInfo) -> Any:
        storage = _storage(t.storage, t.dtype, reader, cast)
        if _whole(t, reader):
            return storage
        view = storage.as_strided(t.shape, t.stride, t.offset).contiguous()
        reader.recycle(t.storage, storage)
        return view

    made = produce_ahead(todo, produce)
    with _reading_ahead(todo), open(path, "wb") as out:
        out.write(safetensors_fmt.header([(t.name, t.dtype, tuple(t.shape)) for t in stored], meta))
        for t in stored:
            if t.name in as_is:
                reader.copy(t.storage, out)
            elif t.name in chunked:
                for part in chunked[t.name]:
                    out.write(part)
            else:
                _, data = next(made)
                out.write(as_bytes(data))
                reader.recycle(t.storage, data)
                del data


def _cast_chunks(candidates: dict[Hashable, Any], reader: StorageReader, cast: Cast | None) -> dict[Hashable, Any]:
    """Of ``candidates`` (whole storages, or tensors that are their whole storage, by key), those whose dtype
    changes and can be cast as they are read: their cast bytes (``cast.chunks``) by key."""
    if cast is None:
        return {}
    out = {}
    for key, t in candidates.items():
        if _changes(t, reader):
            chunks = cast.chunks(t.storage if isinstance(t, TensorInfo) else key, t.dtype)
            if chunks is not None:
                out[key] = chunks
    return out


def _changes(t: Any, reader: StorageReader) -> bool:
    """Is ``t`` (a tensor or an output storage) written in another dtype than its storage holds?"""
    return reader.dtype is not None and reader.dtype(t.storage if isinstance(t, TensorInfo) else t.source) != t.dtype


def _storage(key: Hashable, dtype: str, reader: StorageReader, cast: Cast | None) -> Any:
    """Storage ``key`` as a 1-D tensor in ``dtype``: read, and cast (``cast.cast``) where its dtype is another."""
    if cast is not None and reader.dtype is not None and reader.dtype(key) != dtype:
        return cast.cast(key, dtype)
    return reader.read(key)


@contextmanager
def _reading_ahead(todo: list) -> Iterator[None]:
    """Around a write that reads (and casts) ``todo`` one ahead on a worker thread: torch is imported here, not
    by the worker (an import that runs out of memory in a worker thread, whose stack and malloc arena take
    address space of their own, fails in odd places), and its intra-op threads are lowered so the writing
    thread and the worker each have their share of the cores (``pipeline.torch_threads``). Nothing to read:
    torch is not imported at all."""
    if not todo:
        yield
        return
    import torch  # noqa: F401

    from .pipeline import torch_threads

    with torch_threads(2):  # two streams: this thread writes, the worker reads (and casts)
        yield


def _whole(t: TensorInfo, reader: StorageReader) -> bool:
    """Is ``t`` its whole storage, laid out contiguously (so its bytes are the storage's, as they are)?"""
    stored_dtype = reader.dtype(t.storage) if reader.dtype is not None else t.dtype
    return t.offset == 0 and tuple(t.stride) == contiguous_stride(t.shape) and \
        t.numel * itemsize(stored_dtype) == reader.nbytes(t.storage)


# --- torch zip ------------------------------------------------------------------------------------------


def sharded_root(listing: Checkpoint) -> dict[str, Any]:
    """The merged flat state dict (``pt_root``'s for shards) with each stand-in's storage keyed as the sharded
    reader names it, ``(shard, key in shard)``; one stand-in stays one (a tie within a shard)."""
    done: dict[int, Any] = {}
    out: dict[str, Any] = {}
    for name, path in listing.names.items():
        ft = listing.tensor(name)
        if id(ft) not in done:
            done[id(ft)] = replace(ft, storage=replace(ft.storage, key=(path[0], ft.storage.key)))
        out[name] = done[id(ft)]
    return out


def write_pt(path: str, root: Any, reader: StorageReader, cast: Cast | None = None) -> None:
    """``torch.save(root)`` without the data in memory: the pickle of the stand-in container (``formats.pt``'s,
    the one torch.save gets), then each storage: its bytes as they are where its dtype stays (``reader.chunks``,
    no torch), else cast as they are read where they can be (``cast.chunks``: surgery's ``Cast``), else read
    and cast by torch (``cast.cast``), the next one on a worker thread while this one is written."""
    from .formats import pt
    from .formats.storage import produce_ahead, as_bytes

    pickled, storages = pt.pickle_with_storages(root)
    as_is = {key for key, out in storages.items() if reader.chunks is not None and not _changes(out, reader)}
    chunked = _cast_chunks({key: out for key, out in storages.items() if key not in as_is}, reader, cast)
    todo = [key for key in storages if key not in as_is and key not in chunked]
    made = produce_ahead(todo, lambda key: _storage(key, storages[key].dtype, reader, cast))

    def records() -> Any:
        for key, out in storages.items():
            if key in as_is or key in chunked:
                data = chunked[key] if key in chunked else reader.chunks(key)
                _check_size(out, len(data))
                yield out.key, data
                continue
            _, data = next(made)
            _check_size(out, data.numel() * data.element_size())
            yield out.key, as_bytes(data)
            reader.recycle(key, data)
            del data

    with _reading_ahead(todo):
        pt.write_zip(path, pickled, records())


def _check_size(out: Any, nbytes: int) -> None:
    if nbytes != out.nbytes:
        raise FormatError(f"storage of '{out.source}' holds {nbytes} bytes, not the {out.nbytes} its tensors need")


# --- out of memory ------------------------------------------------------------------------------------


@contextmanager
def memory_bound() -> Iterator[None]:
    """Running out of memory (or address space) while writing storage by storage is one error line: Python's
    MemoryError, torch's allocator ("DefaultCPUAllocator: can't allocate memory"), a mapping or a read-ahead
    thread that cannot be made."""
    try:
        yield
    except MemoryError:
        raise ParamtoolError(_OUT_OF_MEMORY) from None
    except RuntimeError as e:
        if "allocate" not in str(e) and "new thread" not in str(e):
            raise
        raise ParamtoolError(_OUT_OF_MEMORY) from None
    except OSError as e:
        if e.errno != errno.ENOMEM:
            raise
        raise ParamtoolError(_OUT_OF_MEMORY) from None


_OUT_OF_MEMORY = "out of memory while converting (one storage at a time did not fit)"


# --- entry point ----------------------------------------------------------------------------------------


def convert_streamed(src: Source, listing: Checkpoint, output: Output, drop_extra: bool, narrow: bool) -> bool:
    """Write ``listing`` as ``output`` storage by storage; False when the source cannot be streamed, or when
    the streamed file would differ from the loaded path's (the caller then loads it whole). What goes in, and
    the check of what was written, are the loaded path's own (``writer``); ``narrow``: only the ``--key``
    sub-tree is written."""
    from . import writer
    from .commit import emit

    if not output.layout.single_file or os.name != "posix":
        return False
    if src.is_file and src.layout.can_patch(output.layout) and output.layout.pickled:
        return False  # same format: the patched copy keeps every byte (the caller's streamed path)
    infos = listing.infos()
    if not output.layout.holds_non_tensors:  # safetensors
        writer.refuse_non_tensors(listing, drop_extra)
    else:
        root = sharded_root(listing) if src.layout.split else writer.pt_root(listing, narrow, drop_extra)[0]
        if not src.layout.streams_root(listing, root):
            return False  # (DCP: non-tensor entries are placeholders here; a --key load reads only its sub-tree)
    reader = open_reader(src, listing)
    if reader is None:
        return False
    try:
        def write(path: str) -> None:
            with memory_bound():
                if not output.layout.holds_non_tensors:
                    from .formats.safetensors_fmt import layout

                    write_safetensors(path, *layout(infos, listing.metadata), reader)
                else:
                    write_pt(path, root, reader)
            writer.verify_file(listing, output.format, path, narrow, drop_extra)

        emit(output, write)
    finally:
        reader.close()
    return True


class Cast:
    """A cast of the storages whose dtype changes, for ``convert_stream``'s writers (which call it only
    for those; storages that keep their dtype are copied as they are), the overflows counted by storage:
    ``chunks`` where the input's bytes can be cast as they are read (``numeric.cast_values``, no torch), else
    the input's (mapped) storage cast by torch (``cast``)."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader
        self.overflows: dict[Hashable, int] = {}

    def chunks(self, key: Hashable, dtype: str) -> Any:
        """Storage ``key``'s bytes cast to ``dtype`` as they are written (``formats.storage.CastChunks``), or
        None where they cannot be (the reader has no byte ranges, or numpy cannot cast these dtypes)."""
        from .numeric import can_cast

        if self.reader.chunks is None or not can_cast(self.reader.dtype(key), dtype):
            return None
        return self.reader.chunks(key).cast(self.reader.dtype(key), dtype,
                                            lambda n: self.overflows.__setitem__(key, n))

    def cast(self, key: Hashable, dtype: str) -> Any:
        """Storage ``key`` read whole and cast by torch."""
        flat = self.reader.read(key)
        out, overflow = cast_storage(flat, dtype)
        self.reader.recycle(key, flat)
        if overflow:
            self.overflows[key] = overflow
        return out


def cast_storage(flat: Any, dtype: str) -> tuple[Any, int]:
    """A 1-D storage cast to ``dtype``, and how many finite values became infinite (overflow).

    One extra pass over the result, not over the input: its min and max (``aminmax``, no temporary tensor)
    are finite unless an inf or a NaN is there, and only then are the overflows counted exactly."""
    import math

    import torch

    from .formats.dtypes import torch_dtype

    out = flat.to(torch_dtype(dtype))
    overflow = 0
    if out.numel() and torch.finfo(out.dtype).max < torch.finfo(flat.dtype).max:
        lo, hi = torch.aminmax(out)
        if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):  # the rare case: count exactly
            step = 1 << 22  # in chunks: three bool tensors of a chunk, not of the storage
            overflow = sum(int((torch.isinf(out[i:i + step]) & torch.isfinite(flat[i:i + step])).sum())
                           for i in range(0, out.numel(), step))
    return out, overflow

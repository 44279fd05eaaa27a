"""Tensor data one storage at a time, straight from the file's byte ranges.

A torch zip file stores each storage as an uncompressed record; a safetensors file stores each tensor as a
byte range. ``StorageFile`` reads one storage into fresh memory on request (so memory is bounded by the
largest storage, never the checkpoint), and ``patch`` writes a copy of the file in which only the changed
storages are replaced: the pickle, the header, the metadata and every untouched byte stay exactly as they
were.
"""
from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Hashable

from ..errors import FormatError, first_line
from ..fsops import guard_mappings
from ..numeric import crc32
from ..records import dataclass
from ..toc import TensorInfo, Toc, contiguous_stride, itemsize
from .dtypes import torch_dtype
from .pins import opened, short_read

COPY_CHUNK = 1 << 24


@dataclass(frozen=True)
class Span:
    offset: int  # absolute file offset of the storage's first byte
    nbytes: int
    dtype: str
    record: str | None = None  # zip record name ("data/0") for torch files


class Chunks:
    """A storage's bytes as chunks read one after another into one small reused buffer (``os.preadv``), for
    writers that must see the bytes as they go (a zip record's CRC-32). Each chunk is valid until the next.

    Reading through a small buffer costs a fraction of faulting in a mapping of the same bytes: writing 1 GiB
    into a zip took 0.6-0.9 s this way and 2-3.7 s from a mapping on this project's VMs."""

    SIZE = 1 << 22

    def __init__(self, fd: int, offset: int, nbytes: int, path: str) -> None:
        self.fd, self.offset, self.nbytes, self.path = fd, offset, nbytes, path

    def __len__(self) -> int:
        return self.nbytes

    def __iter__(self) -> Iterator[memoryview]:
        view = memoryview(bytearray(min(self.SIZE, self.nbytes)))
        for done in range(0, self.nbytes, len(view) or 1):
            n = min(len(view), self.nbytes - done)
            if _pread_into(self.fd, view[:n], self.offset + done) != n:
                raise short_read(self.path, "a storage")
            yield view[:n]

    def cast(self, src: str, dst: str, counted: Callable[[int], None]) -> CastChunks:
        """These bytes (``src`` values) as ``dst`` values, cast without torch (``numeric.cast_values``)."""
        return CastChunks(self, src, dst, counted)


class CastChunks(Chunks):
    """A storage's values cast to another floating-point dtype, chunk by chunk, as torch casts them
    (``numeric.cast_values``): two worker threads each read (``os.preadv``) and cast a chunk ahead while the
    caller writes the current one, three chunk buffers in all. ``counted`` is told how many finite values
    became infinite, once all chunks are through."""

    VALUES = 1 << 20  # per chunk: 4 MiB of float32 read, 2 MiB of bfloat16 written

    def __init__(self, source: Chunks, src: str, dst: str, counted: Callable[[int], None]) -> None:
        super().__init__(source.fd, source.offset, source.nbytes, source.path)
        self.src, self.dst, self.counted = src, dst, counted
        self.values = source.nbytes // itemsize(src)

    def __len__(self) -> int:
        return self.values * itemsize(self.dst)

    def __iter__(self) -> Iterator[memoryview]:
        from concurrent.futures import ThreadPoolExecutor

        from .. import numeric

        step = self.VALUES
        starts = range(0, self.values, step)
        size = itemsize(self.src)
        with _CAST_LOCK:
            sets = _CAST_BUFFERS.pop() if _CAST_BUFFERS else [{}, {}, {}]

        def cast(i: int) -> tuple[Any, int]:
            bufs = sets[i % 3]
            n = min(step, self.values - starts[i]) * size
            view = numeric.sized(bufs, "in", n, "u1")
            if _pread_into(self.fd, view, self.offset + starts[i] * size) != n:
                raise short_read(self.path, "a storage")
            return numeric.cast_values(view, self.src, self.dst, bufs)

        overflow = 0
        if len(starts) <= 1:  # one chunk (most biases and norms): no threads to start for it
            for i in range(len(starts)):
                data, overflow = cast(i)
                yield memoryview(data)
        else:
            with ThreadPoolExecutor(max_workers=2) as pool:
                pending = [pool.submit(cast, i) for i in range(2)]
                for i in range(len(starts)):
                    data, k = pending.pop(0).result()
                    if i + 2 < len(starts):  # buffers (i + 2) % 3 were written last time round: free now
                        pending.append(pool.submit(cast, i + 2))
                    overflow += k
                    yield memoryview(data)
        with _CAST_LOCK:  # the next storage's chunks reuse these buffers (fresh ones cost a page fault a page)
            _CAST_BUFFERS.append(sets)
        if overflow:
            self.counted(overflow)


_CAST_BUFFERS: list[list[dict[str, Any]]] = []  # CastChunks' chunk buffers, three sets at a time, free
_CAST_LOCK = threading.Lock()


DIRECT_ALIGN = 4096  # O_DIRECT: file offset, length and memory address each a multiple of the device's block


class DirectWriter:
    """Writes of new storage bytes into an output file that skip the page cache (``O_DIRECT``), beside the
    ordinary file object that writes everything else.

    A buffered write of 1 GiB cost 2.7 s of system time on this project's VMs (page-cache pages allocated,
    copied into, written back, then ``fsync`` waited for), an ``O_DIRECT`` write of the same bytes 0.1 s and
    0.6 s in all, after which the ``fsync`` before the rename has nothing left to flush. The whole blocks of
    a storage go directly (from its own memory when ``StorageFile.empty_storage`` placed it to match the file
    offset, else through one aligned bounce buffer); the partial blocks at either end, which share a block
    with neighbouring bytes, go through the file object. Linux keeps the two coherent (a direct write
    flushes and drops cached pages of its range). Where the filesystem refuses ``O_DIRECT`` (tmpfs, some
    network filesystems), every byte goes through the file object, as before."""

    BOUNCE = 1 << 23

    def __init__(self, path: str) -> None:
        try:
            self.fd: int | None = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except (OSError, AttributeError):  # no O_DIRECT here (tmpfs; not Linux)
            self.fd = None
        self._bounce: Any = None

    def __enter__(self) -> "DirectWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop writing directly (the file object writes whatever comes next)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None

    def write(self, out: Any, raw: Any) -> None:
        """Append ``raw`` (a contiguous numpy byte array) at ``out``'s position; ``out``'s position advances."""
        if self.fd is None or raw.nbytes < 4 * DIRECT_ALIGN:
            out.write(raw)
            return
        out.flush()
        pos = out.tell()
        head = (-pos) % DIRECT_ALIGN
        whole = (raw.nbytes - head) // DIRECT_ALIGN * DIRECT_ALIGN
        out.write(raw[:head])
        out.flush()
        done = self._direct(raw[head:head + whole], pos + head)
        out.seek(pos + head + done)
        out.write(raw[head + done:])

    def _direct(self, raw: Any, offset: int) -> int:
        """Write whole blocks of ``raw`` at ``offset`` with ``O_DIRECT``: how many bytes were written (fewer
        than asked where the file system refused, after which this writer writes nothing directly)."""
        import mmap

        fd = self.fd
        aligned = raw.ctypes.data % DIRECT_ALIGN == 0
        done = 0
        while done < raw.nbytes and fd is not None:
            n = min(raw.nbytes - done, 1 << 30 if aligned else self.BOUNCE)
            if aligned:
                data = raw[done:done + n]
            else:
                if self._bounce is None:
                    self._bounce = mmap.mmap(-1, self.BOUNCE)  # anonymous: page-aligned
                data = memoryview(self._bounce)[:n]
                data[:] = raw[done:done + n]
            try:
                wrote = os.pwrite(fd, data, offset + done)
            except OSError as e:
                if e.errno != errno.EINVAL:  # ENOSPC, EIO, ...: the write fails, as a buffered one would
                    raise
                wrote = 0
            finally:
                del data
            if wrote % DIRECT_ALIGN or wrote <= 0:  # refused, or a short write off a block: the file object goes on
                self.close()
                fd = None
                done += max(wrote, 0) // DIRECT_ALIGN * DIRECT_ALIGN
                break
            done += wrote
        return done


def release_freed_memory() -> None:
    """Make glibc give large freed blocks back to the system at once.

    glibc raises its mmap threshold after the first large free, after which 16 MiB storages come from the
    heap and fragment it: peak memory can then reach twice the checkpoint. A fixed threshold keeps every
    storage-sized block in its own mapping, returned on free, so memory stays at one storage at a time.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


class StorageFile:
    """Random access to the storages of one checkpoint file, described by its table of contents."""

    def __init__(self, path: str, toc: Toc, spans: dict[Hashable, Span]) -> None:
        self.path = path
        self.toc = toc
        self.spans = spans
        self.infos = {t.name: t for t in toc.tensors}
        self._file = open(path, "rb")
        opened(path, self._file.fileno())
        self._spare: list[Any] = []  # finished storages' buffers, reused: no fresh pages to fault in
        self._lock = threading.Lock()  # pool threads read and recycle at once

    SPARES = 4  # buffers kept: the pool's workers + the one read ahead, and one being written

    def _buffer(self, nbytes: int, phase: int | None = None) -> Any:
        """``nbytes`` of memory: the smallest spare buffer that holds them, else a fresh one.

        Faulting in fresh pages costs more than reading the bytes (on this project's VMs, 4x), so storages
        are read into the same few buffers over and over. With ``phase`` (a file offset), the memory starts
        at that offset's place in a block (``DIRECT_ALIGN``), so ``DirectWriter`` can hand it to the disk
        as it is."""
        import torch

        def shift(b: Any) -> int:
            return 0 if phase is None else (phase - b.data_ptr()) % DIRECT_ALIGN

        with self._lock:
            fits = [i for i, b in enumerate(self._spare) if b.numel() >= nbytes + shift(b)]
            if fits:
                b = self._spare.pop(min(fits, key=lambda i: self._spare[i].numel()))
                return b[shift(b):shift(b) + nbytes]
        b = torch.empty(nbytes + (0 if phase is None else DIRECT_ALIGN), dtype=torch.uint8)
        return b[shift(b):shift(b) + nbytes]

    def recycle(self, tensor: Any) -> None:
        """Hand back a storage (or any view of it) once nothing uses it any more: a later read reuses its
        memory. Only the largest few are kept."""
        import torch

        whole = torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage())
        with self._lock:
            self._spare.append(whole)
            if len(self._spare) > self.SPARES:
                self._spare.pop(min(range(len(self._spare)), key=lambda i: self._spare[i].numel()))

    def close(self) -> None:
        self._file.close()

    def _span(self, key: Hashable) -> Span:
        """``key``'s span, refused (one line) when it ends beyond the file: a mapping or a read of it would not."""
        span = self.spans[key]
        if span.offset + span.nbytes > os.fstat(self._file.fileno()).st_size:
            raise short_read(self.path, f"storage {key!r}")
        return span

    def read_storage(self, key: Hashable) -> Any:
        """The storage's bytes in fresh memory, as a 1-D tensor of its dtype.

        Positional reads (no shared file position), so pool threads may read different storages at once."""
        span = self.spans[key]
        buf = self._buffer(span.nbytes)
        if span.nbytes and _pread_into(self._file.fileno(), buf.numpy(), span.offset) != span.nbytes:
            raise short_read(self.path, f"storage {key!r}")
        return buf.view(torch_dtype(span.dtype)) if span.nbytes % itemsize(span.dtype) == 0 else buf

    def map_storage(self, key: Hashable) -> Any:
        """The storage's bytes mapped from the page cache (copy-on-write), as a 1-D tensor of its dtype.

        No copy and no fresh pages, which on this project's VMs reads 2-3x faster than copying into memory;
        the mapping goes when the tensor does, so memory stays bounded by the storages in use. A write into
        it gets a private copy of the page and never reaches the file."""
        import mmap

        import torch

        span = self._span(key)
        if span.nbytes == 0:
            return torch.empty(0, dtype=torch_dtype(span.dtype))
        base = span.offset - span.offset % mmap.ALLOCATIONGRANULARITY
        guard_mappings()
        mm = mmap.mmap(self._file.fileno(), span.offset + span.nbytes - base, flags=mmap.MAP_PRIVATE,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
        raw = torch.frombuffer(mm, dtype=torch.uint8, count=span.nbytes, offset=span.offset - base)
        return raw.view(torch_dtype(span.dtype)) if span.nbytes % itemsize(span.dtype) == 0 else raw

    def raw(self, name: str) -> Any:
        """The bytes of tensor ``name`` as a read-only memoryview of a mapping, without torch; None when the
        tensor is not its whole storage laid out contiguously (then only torch can say what its bytes are).

        Lets ``diff`` and ``ties --values`` compare and checksum bytes with no torch import at all."""
        info = self.infos[name]
        return self.raw_storage(info.storage) if self.covers(info) else None

    def samples(self, name: str, spans: list[tuple[int, int]]) -> list[bytes] | None:
        """The bytes of tensor ``name`` at ``spans`` (offset, length within them), read alone where the medium
        reads so (a remote object: ``RemoteStorage``); None here, where slices of ``raw`` cost no more."""
        return None

    def raw_storage(self, key: Hashable) -> Any:
        """A storage's bytes as a read-only memoryview of a mapping, without torch (a conversion writes them
        as they are). The view ends where its mapping ends (``numeric.drop_mapped`` relies on it)."""
        import mmap

        span = self._span(key)
        if span.nbytes == 0:
            return memoryview(b"")
        base = span.offset - span.offset % mmap.ALLOCATIONGRANULARITY
        guard_mappings()
        mm = mmap.mmap(self._file.fileno(), span.offset + span.nbytes - base, flags=mmap.MAP_SHARED,
                       prot=mmap.PROT_READ, offset=base)
        return memoryview(mm)[span.offset - base : span.offset - base + span.nbytes]

    def chunks(self, key: Hashable) -> Chunks:
        """A storage's bytes as ``Chunks`` (read through one small buffer), without torch."""
        span = self._span(key)
        return Chunks(self._file.fileno(), span.offset, span.nbytes, self.path)

    def copy_storage(self, key: Hashable, out: Any) -> None:
        """Append a storage's bytes to the file ``out`` as they are, copied by the kernel (see ``_copy``)."""
        span = self.spans[key]
        self.copy_range(span.offset, out, span.nbytes)

    def copy_range(self, offset: int, out: Any, n: int) -> None:
        """Append ``n`` bytes of this file from ``offset`` to the file ``out`` (``_copy``)."""
        with self._lock:  # the file position is shared
            self._file.seek(offset)
            _copy(self._file, out, n)

    def mapped_tensor(self, name: str) -> Any:
        """``tensor(name)`` over mapped, copy-on-write memory (see ``map_storage``)."""
        info = self.infos[name]
        return self.view(self.map_storage(info.storage), info)

    def empty_storage(self, key: Hashable) -> Any:
        """Memory for a storage that will be written whole, placed for ``DirectWriter`` (see ``_buffer``)."""
        span = self.spans[key]
        phase = span.offset % DIRECT_ALIGN
        aligned = phase % itemsize(span.dtype) == 0 and span.nbytes % itemsize(span.dtype) == 0
        buf = self._buffer(span.nbytes, phase if aligned else None)
        return buf.view(torch_dtype(span.dtype)) if span.nbytes % itemsize(span.dtype) == 0 else buf

    @staticmethod
    def view(storage: Any, info: TensorInfo) -> Any:
        """Tensor ``info`` over ``storage`` (a 1-D tensor of the whole storage, which may itself start past its
        memory's first element: ``empty_storage``)."""
        return storage.as_strided(info.shape, info.stride, storage.storage_offset() + info.offset)

    def tensor(self, name: str) -> Any:
        info = self.infos[name]
        return self.view(self.read_storage(info.storage), info)

    def covers(self, info: TensorInfo) -> bool:
        """Does this view cover every element of its storage (so overwriting it needs no old bytes)?"""
        span = self.spans[info.storage]
        return info.offset == 0 and info.nbytes == span.nbytes and tuple(info.stride) == contiguous_stride(info.shape)

    def patch(self, out_path: str, changed: Iterable[Hashable], produce: Callable[[Hashable], Any],
              workers: int = 1) -> None:
        """Write a copy of this file to ``out_path`` where each storage in ``changed`` is replaced by
        ``produce(key)`` (a contiguous 1-D tensor holding the whole storage, from ``empty_storage`` or
        ``read_storage``), produced ahead of the write and written one at a time (``workers``: how many
        may be produced at once, see ``produce_ahead``)."""
        raise NotImplementedError

    def _nbytes(self, key: Hashable) -> int:
        return self.spans[key].nbytes


class ZipStorageFile(StorageFile):
    """A torch zip checkpoint (or a TorchScript archive): storages by byte range; a patched copy keeps every
    other byte, alignment included."""

    @classmethod
    def open(cls, path: str, toc: Toc, root: Any, located: dict[Hashable, tuple[int | None, str]],
             zip_prefix: Callable[[Any, str], str]) -> "ZipStorageFile":
        """``located``: each storage's data offset and record, as the listing's zip reading found them (no torch);
        ``zip_prefix(archive, path)``: the archive prefix as torch takes it (``torchfile.zip_prefix``)."""
        from ..tree import walk

        spans: dict[Hashable, Span] = {}
        for _, fake in walk(root):
            ref = fake.storage
            if ref.key not in spans:
                offset, record = located[ref.key]
                if offset is None:  # (callers ask Checkpoint.byte_ranges first: such a file is loaded whole)
                    raise FormatError(f"{path}: storage record '{record}' is compressed: it has no byte range")
                # the record's own name without the archive prefix, as torch's reader lists it (any case)
                spans[ref.key] = Span(offset, ref.nbytes, ref.dtype, record.split("/", 1)[-1])
        self = cls(path, toc, spans)
        self.zip_prefix = zip_prefix
        return self

    def patch(self, out_path: str, changed: Iterable[Hashable], produce: Callable[[Hashable], Any],
              workers: int = 1) -> None:
        """A byte-for-byte copy of the archive in which only the changed storages' bytes and their CRC-32 fields
        differ, written in one pass: the unchanged stretches copied by the kernel (``_copy``), each changed
        storage written as it is produced (the next one, and its CRC-32, computed meanwhile: ``produce_ahead``), then its
        CRC-32s.
        Rewriting every record through torch's zip writer instead cost a third more time on a 1 GiB ``init``
        (its CRC and its writes through a Python file object)."""
        import struct

        by_record: dict[str, list[Hashable]] = {}
        for key, span in self.spans.items():
            by_record.setdefault(span.record, []).append(key)
        order = sorted(changed, key=lambda k: self.spans[k].offset)
        shared = next((self.spans[k].record for k in order if len(by_record[self.spans[k].record]) > 1), None)
        if shared is not None:  # storages '0' and 0: torch reads one record as two storages
            raise FormatError(f"{self.path}: record '{shared}' holds two storages (keys '0' and 0): it cannot be "
                              "changed for one of them alone")
        fields = self._crc_fields([self.spans[k].record for k in order])
        size = os.fstat(self._file.fileno()).st_size
        crcs: dict[str, int] = {}

        def made(key: Hashable) -> tuple[Any, int]:  # on the worker thread (the CRC-32 releases the GIL)
            data = produce(key)
            return data, crc32(as_bytes(data))

        with open(out_path, "wb") as out, DirectWriter(out_path) as direct:
            pos = 0
            for key, (data, crc) in produce_ahead(order, made, workers, self._nbytes):
                span = self.spans[key]
                raw = as_bytes(data)
                if raw.nbytes != span.nbytes:  # (an edit never resizes a storage: the plan keeps shapes)
                    raise FormatError(f"{self.path}: storage {key!r} would change size; nothing was written")
                self.copy_range(pos, out, span.offset - pos)
                direct.write(out, raw)
                crcs[span.record] = crc
                pos = span.offset + span.nbytes
                self.recycle(data)
                del data, raw
            self.copy_range(pos, out, size - pos)
            for record, crc in crcs.items():
                for at in fields[record]:
                    out.seek(at)
                    out.write(struct.pack("<I", crc))


    def _crc_fields(self, records: list[str]) -> dict[str, list[int]]:
        """Where each record's CRC-32 is written in the file: its local header (unless a data descriptor
        carries it and the header holds 0), its data descriptor, and its central directory entry. Each is
        checked to hold the record's CRC now, so a field is never written where something else is."""
        import struct
        import zipfile

        with zipfile.ZipFile(self.path) as z:
            infos = {i.filename: i for i in z.infolist()}
            prefix = self.zip_prefix(z, self.path)
            start = z.start_dir
        f = self._file
        out: dict[str, list[int]] = {}
        wanted = {prefix + r: r for r in records}

        def at(offset: int, n: int) -> bytes:
            return os.pread(f.fileno(), n, offset)

        for name, record in wanted.items():
            info = infos[name]
            old = struct.pack("<I", info.CRC)
            places = []
            local = at(info.header_offset + 14, 4)
            if local == old and (not info.flag_bits & 0x08 or local != bytes(4)):  # (0 there: the descriptor has it)
                places.append(info.header_offset + 14)
            if info.flag_bits & 0x08:  # a data descriptor follows the data
                after = self.spans[next(k for k, s in self.spans.items() if s.record == record)]
                end = after.offset + info.compress_size
                head = at(end, 8)
                if head[:4] == b"PK\x07\x08" and head[4:] == old:
                    places.append(end + 4)
                elif head[:4] == old:
                    places.append(end)
                else:
                    raise FormatError(f"{self.path}: record '{name}' has no data descriptor where its header says")
            elif not places:
                raise FormatError(f"{self.path}: record '{name}' has no CRC-32 in its local header")
            out[record] = places
        pos = start  # the central directory: one entry per record, in order
        while at(pos, 4) == b"PK\x01\x02":
            entry = at(pos, 46)
            name_len, extra_len, comment_len = struct.unpack("<HHH", entry[28:34])
            name = at(pos + 46, name_len).decode("utf-8", "surrogateescape")
            if name in wanted:
                if entry[16:20] != struct.pack("<I", infos[name].CRC):
                    raise FormatError(f"{self.path}: the central directory entry of '{name}' disagrees with the record")
                out[wanted[name]].append(pos + 16)
            pos += 46 + name_len + extra_len + comment_len
        if any(len(v) < 2 for v in out.values()):
            raise FormatError(f"{self.path}: a changed record has no central directory entry")
        return out



class ArchiveStorageFile(ZipStorageFile):
    """A TorchScript archive's storages by byte range (``formats.torchscript`` locates them); written as any
    torch zip is (``ZipStorageFile.patch``)."""


class SafetensorsStorageFile(StorageFile):
    """A safetensors file: every stored tensor is its own storage; the header is copied verbatim."""

    @classmethod
    def open(cls, path: str, toc: Toc, spans: dict[Hashable, tuple[int, int, str]], data_start: int,
             header: Callable[[str], bytes | None]) -> "SafetensorsStorageFile":
        """``spans``: each stored tensor's (offset, size, dtype) as its header says (``safetensors_fmt``);
        ``header(path)``: the header a patched copy is written with, None to copy it as is."""
        self = cls(path, toc, {key: Span(*span) for key, span in spans.items()})
        self.data_start, self.header = data_start, header
        return self

    def patch(self, out_path: str, changed: Iterable[Hashable], produce: Callable[[Hashable], Any],
              workers: int = 1) -> None:
        changed = set(changed)
        ordered = sorted(self.spans.items(), key=lambda kv: kv[1].offset)
        produced = produce_ahead([k for k, _ in ordered if k in changed], produce, workers, self._nbytes)
        header = self.header(self.path)  # every safetensors file written says "format": "pt"
        with open(out_path, "wb") as out, DirectWriter(out_path) as direct:
            self._file.seek(0)
            if header is None:
                _copy(self._file, out, self.data_start)
            else:
                out.write(header)
            pos = self.data_start
            for key, span in ordered:
                if span.offset > pos:  # padding between ranges, if any
                    self._file.seek(pos)
                    _copy(self._file, out, span.offset - pos)
                if key in changed:
                    _, data = next(produced)
                    direct.write(out, as_bytes(data))
                    self.recycle(data)
                    del data
                else:
                    self._file.seek(span.offset)
                    _copy(self._file, out, span.nbytes)
                pos = span.offset + span.nbytes
            self._file.seek(0, 2)
            end = self._file.tell()
            self._file.seek(pos)
            _copy(self._file, out, end - pos)


AHEAD_BYTES = 1 << 29  # produce_ahead with several workers: storages in memory at once, at most (one at least)


def produce_ahead(keys: list[Hashable], produce: Callable[[Hashable], Any], workers: int = 1,
                  size: Callable[[Hashable], int] = lambda key: 0) -> Iterator[tuple[Hashable, Any]]:
    """``(key, produce(key))`` in order, computing the next storage on a worker thread while the caller
    writes the current one (torch releases the GIL): generation and I/O overlap, two storages at most.

    With ``workers`` > 1 (producers that share no state: each init draws from its own seeded generator),
    up to that many storages are computed at once while the caller writes, as long as those and the one
    being written come to at most ``AHEAD_BYTES`` (``size`` gives each one's bytes): a 1 GiB ``init`` of
    64 MiB storages generates on both cores of this project's VMs, while a 512 MiB storage still has one
    other beside it at most."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    if not keys:
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        queued = [0, 0]  # keys submitted, their bytes not yet yielded

        def fill(held: int) -> None:
            while queued[0] < len(keys) and len(pending) < workers:
                nbytes = size(keys[queued[0]])
                if pending and held + queued[1] + nbytes > AHEAD_BYTES:
                    return
                pending.append(pool.submit(produce, keys[queued[0]]))
                queued[0] += 1
                queued[1] += nbytes

        fill(0)
        for key in keys:
            value = pending.popleft().result()
            queued[1] -= size(key)
            fill(size(key))
            yield key, value
            del value


def _pread_into(fd: int, buf: Any, offset: int) -> int:
    """Fill ``buf`` (a writable byte array) from ``offset``; the byte count read (short only at end of file).
    ``fd`` may be a ``blob.Blob`` (a remote object), which reads itself."""
    from ..blob import pread_into

    return pread_into(fd, buf, offset) if isinstance(fd, int) else fd.pread_into(buf, offset)




def as_bytes(t: Any) -> Any:
    """A zero-copy byte view of a contiguous CPU tensor, for file.write."""
    import torch

    return t.reshape(-1).view(torch.uint8).numpy()


def _copy(src: Any, dst: Any, n: int) -> None:
    """Copy ``n`` bytes from ``src``'s position to ``dst``'s, both positions advancing.

    The kernel copies (``os.copy_file_range``: no trip through user space, and a reflink on filesystems
    that share extents), and holes of a sparse source stay holes (``SEEK_DATA``/``SEEK_HOLE``), so a write
    costs what it changes; where the kernel cannot (another filesystem, an old kernel, a pipe), bytes go
    through a buffer as before.
    """
    if n <= 0:
        return
    src_off = src.tell()
    dst.flush()
    dst_off = dst.tell()
    try:
        _kernel_copy(src.fileno(), dst.fileno(), src_off, dst_off, n)
    except (OSError, AttributeError, ValueError):  # no kernel copy here: the plain loop, from the start
        src.seek(src_off)
        dst.seek(dst_off)
        _buffered_copy(src, dst, n)
        return
    src.seek(src_off + n)
    dst.seek(dst_off + n)


def _kernel_copy(src_fd: int, dst_fd: int, src_off: int, dst_off: int, n: int) -> None:
    """``copy_file_range`` over the data segments of ``[src_off, src_off + n)``; holes are skipped and the
    destination is extended over a trailing one, so it reads back the same."""
    end = src_off + n
    pos = src_off
    while pos < end:
        try:
            data = os.lseek(src_fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:  # only a hole from here to the end of the file
                raise
            data = end
        data = min(data, end)
        if data >= end:
            break
        hole = min(os.lseek(src_fd, data, os.SEEK_HOLE), end)
        off = data
        while off < hole:
            done = os.copy_file_range(src_fd, dst_fd, hole - off, off, dst_off + (off - src_off))
            if done <= 0:
                if os.fstat(src_fd).st_size >= hole:  # the bytes are there: the destination took none (full?)
                    raise OSError(errno.EIO, "the kernel copy stopped")  # -> ``_copy`` writes them itself
                raise short_read(_name_of(src_fd), "a byte range being copied")
            off += done
        pos = hole
    if os.fstat(dst_fd).st_size < dst_off + n:
        os.ftruncate(dst_fd, dst_off + n)


def _name_of(fd: int) -> str:
    """The path an open file was opened by, for a message (the kernel's name for it)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "the input file"


def _buffered_copy(src: Any, dst: Any, n: int) -> None:
    while n > 0:
        chunk = src.read(min(COPY_CHUNK, n))
        if not chunk:
            raise short_read(getattr(src, "name", None) or _name_of(src.fileno()), "a byte range being copied")
        dst.write(chunk)
        n -= len(chunk)


def open_storage_file(listing: Any) -> StorageFile | None:
    """A streaming reader over a file's listing (its stand-in tree, already read), as its format opens one:
    zip torch files and safetensors; None for formats without byte ranges."""
    release_freed_memory()
    return listing.layout.open_storages(listing)


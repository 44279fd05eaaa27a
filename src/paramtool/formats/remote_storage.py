"""A ``formats.storage.StorageFile`` whose file is a remote object: its storages read by byte range.

What a storage file does with a local file's descriptor (positional reads, mappings, kernel copies) is done
here through the remote medium (``remote.RemoteBlob``), with memory bounded as on a local file:

- ``raw_storage`` and ``map_storage`` (the value commands: ``stats``, ``diff``, ``ties --values``, ``show``,
  a conversion's unchanged storages): a storage of ``remote.SPILL`` bytes or more is fetched into a spill file
  and mapped (``RemoteBlob.mapped``), so the process holds the few chunks being computed, as with a mapped
  local file; a smaller one is read into memory. A consumer that reads a storage once, in order
  (``numeric.streamed``: ``stats`` without histograms) gets a large one as it arrives (``remote.Stream``) and
  computes on each part while the next ones are received: no spill file, transfer and computation overlap;
- ``chunks`` and ``copy_storage`` (a conversion's cast or copied storages): a ``remote.Stream``, a few parts
  in memory at a time;
- ``read_storage`` (an edit's storage, changed in memory): the storage in fresh memory, as locally.

The storages a value command asks for next, in the object's order, are read ahead while it computes
(``_read_ahead``), at most ``AHEAD`` bytes beyond the one asked for.
"""
from __future__ import annotations

import threading
from typing import Any, Hashable

from ..blob import is_remote
from ..blobio import LocalHeader
from ..errors import FormatError
from .dtypes import torch_dtype
from .storage import Chunks

AHEAD = 32 << 20  # storage bytes read ahead of the one asked for
STREAMED = 64 << 20  # a storage at least this large, asked for within ``numeric.streamed``, is computed on as it
# arrives (``remote.Stream``), not read whole first (its parts hold whole chunks of ``numeric.values``)
_SMALL = 1 << 16  # a storage below this is not read ahead (one small request: not worth a thread)
RAW_SPARE = 6  # storage buffers kept for reuse per object (the pools hold three at once, and those read ahead)

_CLASSES: dict[type, type] = {}


def storage_class(cls: type, path: str) -> type:
    """``cls``, a ``formats.storage.StorageFile`` class, as it reads storages where ``path`` lives."""
    if not is_remote(path):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Remote{cls.__name__}", (RemoteStorage, cls), {})
    return _CLASSES[cls]


class RemoteStorage:
    """The storages of a remote object (mixed in before a ``StorageFile`` class by ``storage_class``)."""

    def __init__(self, path: str, toc: Any, spans: dict) -> None:
        from .. import remote  # (imported for remote objects only: a local file's start-up does without it)

        # (``StorageFile.__init__``'s attributes, without its open(): keep the two alike)
        self.path, self.toc, self.spans = path, toc, spans
        self.infos = {t.name: t for t in toc.tensors}
        self.blob = remote.open_blob(path)
        self._file = self.blob.file()  # (a patched copy reads the untouched bytes through it)
        self._spare: list[Any] = []
        self._lock = threading.Lock()
        # (``raw_storage``: buffers for reuse, storages read ahead, those asked for, the object's order)
        self._raw_spare: list[Any] = []
        self._ahead: dict[Any, Any] = {}
        self._asked: set[Any] = set()
        self._order: list[Any] | None = None
        self._next = 0
        self._streamed = False  # the last storage was asked for within ``numeric.streamed``

    def close(self) -> None:
        with self._lock:
            for job in self._ahead.values():
                job.cancel()
            self._ahead.clear()
        self._file.close()

    @property
    def reader(self) -> Any:
        """torch's zip reader over the object (a patched copy of a zip copies records with torch's writer)."""
        if getattr(self, "_reader", None) is None:
            import torch

            try:
                self._reader = torch._C.PyTorchFileReader(self.blob.file())
            except RuntimeError as e:
                from ..errors import first_line

                raise FormatError(f"{self.path}: corrupt torch zip file ({first_line(e, 160)})") from None
        return self._reader

    def _span(self, key: Hashable) -> Any:
        span = self.spans[key]
        if isinstance(span.offset, LocalHeader):  # a zip record not located by the listing: read its header
            from ..records import replace

            span = replace(span, offset=self._locate(span.offset, key))
            with self._lock:
                self.spans[key] = span
        if span.offset + span.nbytes > self.blob.size:
            raise FormatError(f"{self.path}: truncated: storage {key!r} ends beyond the object")
        return span

    def _locate(self, header: int, key: Hashable) -> int:
        """Where the zip record whose local header starts at ``header`` has its data (as ``zipfile`` finds it)."""
        import struct

        head = bytearray(30)
        if self.blob.pread_into(head, header, ahead=False) != 30 or head[:4] != b"PK\x03\x04":
            raise FormatError(f"{self.path}: bad local header for the zip record of storage {key!r}")
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        return header + 30 + name_len + extra_len

    def read_storage(self, key: Hashable) -> Any:
        from ..toc import itemsize

        span = self._span(key)
        buf = self._buffer(span.nbytes)
        self._read_into(key, span, buf.numpy())
        return buf.view(torch_dtype(span.dtype)) if span.nbytes % itemsize(span.dtype) == 0 else buf

    def map_storage(self, key: Hashable) -> Any:
        """The storage over copy-on-write memory: a large one mapped from a spill file (``RemoteBlob.mapped``)."""
        import torch

        from ..toc import itemsize

        from .. import remote

        span = self._span(key)
        if span.nbytes < remote.SPILL:
            return self.read_storage(key)
        raw = torch.frombuffer(self.blob.mapped(span.offset, span.nbytes, private=True), dtype=torch.uint8)
        return raw.view(torch_dtype(span.dtype)) if span.nbytes % itemsize(span.dtype) == 0 else raw

    def raw_storage(self, key: Hashable) -> Any:
        """The storage's bytes, read-only: a large one mapped from a spill file, a small one in memory; asked
        within ``numeric.streamed``, a large one as it arrives (a ``remote.Stream``, whose ``parts()`` the
        value kernels compute on while the next parts are received: no spill file, no wait for the whole)."""
        from .. import numeric

        streamed = numeric.takes_parts()
        with self._lock:  # (asked and taken in one step: a storage being asked for is never read ahead too)
            ahead = self._ahead.pop(key, None)
            self._asked.add(key)
            self._streamed = streamed
        if ahead is not None:
            self._read_ahead()
            return memoryview(ahead.result()).toreadonly()
        span = self._span(key)
        if streamed and span.nbytes >= STREAMED:
            stream = self.blob.stream(span.offset, span.nbytes).begin()
            self._read_ahead()
            return stream
        data = self._fetch(key)  # (its parts asked before those of the storages read ahead)
        self._read_ahead()
        return memoryview(data).toreadonly()

    def _read_ahead(self) -> None:
        """Start reading the next storages in the object (by offset) in the background, while the one asked
        for is computed on: at most ``AHEAD`` bytes read and not yet asked for (at least one storage).
        Value commands ask for storages in the object's order, so the transfer overlaps the computation; a
        storage read ahead and never asked for (a selection) costs its bytes, within that bound."""
        with self._lock:
            ahead, asked = self._ahead, self._asked
            if self._order is None:
                self._order = sorted(self.spans, key=lambda k: int(self.spans[k].offset))
            order = self._order
            pending = sum(self.spans[k].nbytes for k in ahead)
            while self._next < len(order) and (pending < AHEAD or not ahead):
                k = order[self._next]
                self._next += 1
                if k in asked or k in ahead or self.spans[k].nbytes < _SMALL \
                        or (self._streamed and self.spans[k].nbytes >= STREAMED):  # (streamed when asked)
                    continue
                ahead[k] = _ahead_pool().submit(self._fetch, k)
                pending += self.spans[k].nbytes

    def _fetch(self, key: Hashable) -> Any:
        from .. import remote

        span = self._span(key)
        if span.nbytes >= remote.SPILL:
            return self.blob.mapped(span.offset, span.nbytes)
        data = self._raw_buffer(span.nbytes)
        self._read_into(key, span, data)
        return data

    def _raw_buffer(self, nbytes: int) -> Any:
        """``nbytes`` of memory for ``raw_storage``: a buffer an earlier storage used that nothing refers to any
        more (fresh pages cost a fault each, more than receiving the bytes), else a new one (a ``bytearray``:
        no numpy import before the first request, which then goes out while numpy is imported). At most
        ``RAW_SPARE`` buffers are kept."""
        import sys

        with self._lock:
            spare = self._raw_spare
            for buf in spare:
                # (referred to only by this list, the loop and getrefcount's argument: free to reuse)
                if len(buf) >= nbytes and sys.getrefcount(buf) <= 3:
                    return memoryview(buf)[:nbytes]
            buf = bytearray(nbytes)
            if len(spare) < RAW_SPARE:
                spare.append(buf)
            return memoryview(buf)

    def _read_into(self, key: Hashable, span: Any, buf: Any) -> None:
        """A storage's bytes into ``buf``, as asked (no read-ahead: values cost their own bytes)."""
        if span.nbytes and self.blob.pread_into(buf, span.offset, ahead=False) != span.nbytes:
            raise FormatError(f"{self.path}: truncated: storage {key!r} ends beyond the object")

    def samples(self, name: str, spans: list[tuple[int, int]]) -> list[bytes] | None:
        """Those bytes of tensor ``name`` only: a ranged read each, all at once (``RemoteBlob.read_spans``)."""
        info = self.infos[name]
        if not self.covers(info):
            return None
        start = self._span(info.storage).offset
        return self.blob.read_spans([(start + offset, n) for offset, n in spans])

    def chunks(self, key: Hashable) -> Chunks:
        span = self._span(key)
        return Chunks(self.blob.stream(span.offset, span.nbytes), span.offset, span.nbytes, self.path)

    def copy_storage(self, key: Hashable, out: Any) -> None:
        span = self._span(key)
        for part in self.blob.stream(span.offset, span.nbytes).parts():
            out.write(part)


_POOL: Any = None


def _ahead_pool() -> Any:
    """The threads that read storages ahead (one pool per run; each read splits into its own parts)."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="paramtool-ahead")
    return _POOL

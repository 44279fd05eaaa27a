"""What every medium's bytes are: a ``Blob`` (one object's bytes, read by position) and its file view.

No medium here: a local file is ``blob.LocalBlob``, a remote object ``remote.RemoteBlob``; ``blob.py`` is the
seam that picks one for a path. Both media build on this module, so neither imports the other's.
"""
from __future__ import annotations

import io
import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any, BinaryIO, Callable


class Blob:
    """Read-only random access to one object's bytes."""

    name: str
    size: int

    def pread_into(self, buf: Any, offset: int) -> int:
        """Fill ``buf`` (a writable byte buffer) from ``offset``; the byte count read (short only at the end)."""
        raise NotImplementedError

    def read_some(self, buf: Any, offset: int) -> int:
        """Fill at least part of ``buf`` from ``offset`` (a file view's read, which may be short)."""
        return self.pread_into(buf, offset)

    def pread(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes from ``offset`` (fewer only at the end)."""
        buf = bytearray(max(0, min(n, self.size - offset)))
        got = self.pread_into(buf, offset) if buf else 0
        return bytes(buf[:got])

    def will_read(self, spans: list[tuple[int, int]]) -> None:
        """A hint: these ``(start, end)`` spans are read next (a remote medium fetches them at once)."""

    def file(self) -> BinaryIO:
        """A seekable, buffered file object over the bytes (its own position; closing it leaves the blob open)."""
        return io.BufferedReader(BlobFile(self), 1 << 16)

    def close(self) -> None:
        pass

    def __enter__(self) -> Blob:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def pread_into(fd: int, buf: Any, offset: int) -> int:
    """Fill ``buf`` from ``offset`` of the open file ``fd``; the byte count read (short only at end of file)."""
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done : done + (1 << 30)]], offset + done)
        if n <= 0:
            break
        done += n
    return done


class BlobFile(io.RawIOBase):
    """A blob as a raw, seekable file: each read is one positional read of the blob."""

    def __init__(self, blob: Blob) -> None:
        self.blob, self.pos = blob, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), max(0, self.blob.size - self.pos))
        got = self.blob.read_some(memoryview(b)[:n], self.pos) if n else 0
        self.pos += got
        return got

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self.pos, self.blob.size)[whence]
        if base + offset < 0:
            raise OSError(22, "negative seek position")
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    @property
    def name(self) -> str:
        return self.blob.name


class LocalHeader(int):
    """Where a zip record's local header starts, standing in for where its data starts until it is read: a
    remote listing does not fetch every record's header (``formats.remote_storage`` reads it with the record)."""


_WATCHER: Callable[[int], None] | None = None


def watch_transfers(watcher: Callable[[int], None] | None) -> None:
    """Have ``watcher(n)`` called with the bytes each transfer of a remote medium moved (the command line's
    progress on a terminal); None: nobody watches."""
    global _WATCHER
    _WATCHER = watcher


def transferred(n: int) -> None:
    """A medium moved ``n`` bytes (a ranged read's part, a window)."""
    watcher = _WATCHER
    if watcher is not None and n:
        watcher(n)

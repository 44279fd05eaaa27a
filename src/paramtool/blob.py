"""The one byte seam: a checkpoint's bytes wherever they live, read by position.

A ``Blob`` is one object's bytes, read-only: its ``size``, ``pread_into`` (fill a buffer from an offset) and
``file()``, a seekable file object over it for readers that want one (``zipfile``, the unpickler). A local
file is a ``LocalBlob``; ``http(s)://``, ``s3://`` and ``hf://`` objects are the remote module's
(``remote.py``, imported only for them, with the optional extra ``paramtool[remote]``).

The path functions below (``isdir``, ``isfile``, ``listdir``, ``read_bytes``) are what the readers of
directories (sharded indexes, DCP, model directories) ask instead of ``os``, so that a bucket prefix or a Hub
repository resolves as a local directory does. Remote paths are joined and split as POSIX paths
(``os.path.join``/``dirname``/``basename`` work on them), never made absolute or resolved through links.
"""
from __future__ import annotations

import io
import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any, BinaryIO

REMOTE_PREFIXES = ("http://", "https://", "s3://", "hf://")


def is_remote(path: Any) -> bool:
    """Does ``path`` name an object in a remote medium (HTTP, S3, the Hugging Face Hub)?"""
    return isinstance(path, str) and path.startswith(REMOTE_PREFIXES)


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


class LocalBlob(Blob):
    """A local file."""

    def __init__(self, path: str) -> None:
        from .formats.pins import opened

        self.name = path
        self._f = open(path, "rb")
        opened(path, self._f.fileno())  # pinned: the same file for the whole command (issue 23)
        self.size = os.fstat(self._f.fileno()).st_size

    def pread_into(self, buf: Any, offset: int) -> int:
        return pread_into(self._f.fileno(), buf, offset)

    def file(self) -> BinaryIO:
        return open(self.name, "rb")

    def close(self) -> None:
        self._f.close()


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
    remote listing does not fetch every record's header (``remote.RemoteStorage`` reads it with the record)."""


def deferred_offset(f: Any, header_offset: int) -> LocalHeader | None:
    """A ``LocalHeader`` when ``f`` reads a remote object (its records are located when read), else None."""
    raw = getattr(f, "raw", None)
    return LocalHeader(header_offset) if isinstance(raw, BlobFile) and is_remote(raw.blob.name) else None


def open_blob(path: str) -> Blob:
    """The bytes ``path`` names: a local file, or a remote object (``remote.open_blob``)."""
    if is_remote(path):
        from . import remote

        return remote.open_blob(path)
    return LocalBlob(path)


def prefetch(paths: list[str]) -> None:
    """Open remote objects concurrently (each one's first ranged read: its size and head), so that reading
    many shards' headers takes the wall time of about one round trip; local files need nothing."""
    remote_paths = [p for p in paths if is_remote(p)]
    if len(remote_paths) > 1:
        from concurrent.futures import ThreadPoolExecutor

        from . import remote

        with ThreadPoolExecutor(max_workers=min(16, len(remote_paths))) as pool:
            list(pool.map(remote.open_blob, remote_paths))


def open_file(path: str) -> BinaryIO:
    """A seekable binary file object over ``path``'s bytes (``open(path, "rb")`` for a local file)."""
    return open_blob(path).file() if is_remote(path) else open(path, "rb")


def size(path: str) -> int:
    if is_remote(path):
        return open_blob(path).size
    return os.path.getsize(path)


def read_bytes(path: str, limit: int | None = None) -> bytes:
    """A whole (small) object's bytes; ``limit`` is checked against its size before anything is read."""
    from .errors import FormatError

    with open_blob(path) as b:
        if limit is not None and b.size > limit:
            raise FormatError(f"{path}: {b.size} bytes, above the {limit} byte limit")
        return b.pread(0, b.size)


def isdir(path: str) -> bool:
    if is_remote(path):
        from . import remote

        return remote.isdir(path)
    return os.path.isdir(path)


def isfile(path: str) -> bool:
    if is_remote(path):
        from . import remote

        return remote.isfile(path)
    return os.path.isfile(path)


def exists(path: str) -> bool:
    return isfile(path) or isdir(path)


def listdir(path: str) -> list[str]:
    """The names of the entries directly in a directory (a bucket prefix, a Hub repository's top level)."""
    if is_remote(path):
        from . import remote

        return remote.listdir(path)
    return os.listdir(path)


def storage_class(cls: type, path: str) -> type:
    """``cls``, a ``formats.storage.StorageFile`` class, as it reads storages where ``path`` lives."""
    if not is_remote(path):
        return cls
    from . import remote

    return remote.storage_class(cls)


def check_output(source: str | None, out: str | None, in_place: bool) -> None:
    """Refuse (a usage error) to write where paramtool does not write: HTTP servers and the Hub are read-only
    (a bucket's writes were taken to a local path by ``stage`` before this is asked)."""
    from .errors import UsageError

    if in_place and is_remote(source):
        raise UsageError(f"--in-place on {source}: HTTP and Hub sources are read-only; give -o PATH")
    if is_remote(out):
        kind = "this command writes to a local path" if out.startswith("s3://") else "HTTP and Hub sources are read-only"
        raise UsageError(f"-o {out}: {kind}; write to a local path")


def _same_object(out: str | None, source: str | None) -> bool:
    return isinstance(out, str) and isinstance(source, str) and out.rstrip("/") == source.rstrip("/")


def stage(out: str | None, in_place: bool = False, src: Any = None) -> tuple[str | None, bool, Any]:
    """Where to write ``-o out`` (or ``--in-place``), whether that is still in place, and the commit to run once
    the write is complete (it returns the name to report): a write to a bucket (``-o s3://...``, or
    ``--in-place`` / ``-o`` naming an ``s3://`` source) is written to a local temporary path and uploaded by the
    commit (``remote.stage``); anything else is written where it is."""
    source = getattr(src, "path", None)
    if isinstance(source, str) and source.startswith("s3://") and (in_place or _same_object(out, source)
                                                                   or _same_object(out, src.text)):
        from . import remote
        from .errors import UsageError

        if in_place and out is not None and not (_same_object(out, source) or _same_object(out, src.text)):
            raise UsageError("give either -o PATH or --in-place, not both")
        local, commit = remote.stage(source, replace=src)
        return local, False, commit
    if isinstance(out, str) and out.startswith("s3://"):
        from . import remote

        local, commit = remote.stage(out)
        return local, in_place, commit
    return out, in_place, lambda label: label


def copy_to(path: str, target: str) -> None:
    """Copy the object ``path`` names to the local file ``target``, a few MiB in memory at a time."""
    step = 1 << 26
    with open_blob(path) as b, open(target, "wb") as out:
        for offset in range(0, b.size, step):
            out.write(b.pread(offset, step))

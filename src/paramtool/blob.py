"""The one byte seam: a checkpoint's bytes wherever they live, read by position.

A ``Blob`` (``blobio.py``) is one object's bytes, read-only: its ``size``, ``pread_into`` (fill a buffer from an
offset) and ``file()``, a seekable file object over it for readers that want one (``zipfile``, the unpickler).
A local file is a ``LocalBlob``; ``http(s)://``, ``s3://`` and ``hf://`` objects are the remote medium's
(``remote.py``, imported only for them, with the optional extra ``paramtool[remote]``). Nothing here knows a
format: a remote object's storages are ``formats.remote_storage``'s, a write to a bucket ``remote_io``'s.

The path functions below (``isdir``, ``isfile``, ``listdir``, ``read_bytes``) are what the readers of
directories (sharded indexes, DCP, model directories) ask instead of ``os``, so that a bucket prefix or a Hub
repository resolves as a local directory does. Remote paths are joined and split as POSIX paths
(``os.path.join``/``dirname``/``basename`` work on them), never made absolute or resolved through links.
"""
from __future__ import annotations

import os

from .blobio import Blob, BlobFile, LocalHeader, pread_into

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any, BinaryIO

REMOTE_PREFIXES = ("http://", "https://", "s3://", "hf://")


def is_remote(path: Any) -> bool:
    """Does ``path`` name an object in a remote medium (HTTP, S3, the Hugging Face Hub)?"""
    return isinstance(path, str) and path.startswith(REMOTE_PREFIXES)


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
    many shards' headers takes the wall time of about one round trip; local files need nothing. A failure is
    the business of the read that needs the object (which then opens it, or finds it missing, itself)."""
    remote_paths = [p for p in paths if is_remote(p)]
    if len(remote_paths) > 1:
        from concurrent.futures import ThreadPoolExecutor

        from . import remote
        from .errors import ParamtoolError

        def opened(path: str) -> None:
            try:
                remote.open_blob(path)
            except ParamtoolError:
                pass

        with ThreadPoolExecutor(max_workers=min(16, len(remote_paths))) as pool:
            list(pool.map(opened, remote_paths))


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


def check_output(source: str | None, out: str | None, in_place: bool) -> None:
    """Refuse (a usage error) to write where paramtool does not write: HTTP servers and the Hub are read-only
    (a bucket's writes were taken to a local path by ``stage`` before this is asked)."""
    from .errors import UsageError

    if in_place and is_remote(source):
        raise UsageError(f"--in-place on {source}: HTTP and Hub sources are read-only; give -o PATH")
    if is_remote(out):
        kind = "this command writes to a local path" if out.startswith("s3://") else "HTTP and Hub sources are read-only"
        raise UsageError(f"-o {out}: {kind}; write to a local path")


def copy_to(path: str, target: str) -> None:
    """Copy the object ``path`` names to the local file ``target``, a few MiB in memory at a time (a remote
    object's parts fetched concurrently: ``remote.Stream``)."""
    with open(target, "wb") as out:
        if is_remote(path):
            from . import remote

            b = remote.open_blob(path)
            for part in b.stream(0, b.size).parts():
                out.write(part)
        else:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    out.write(chunk)

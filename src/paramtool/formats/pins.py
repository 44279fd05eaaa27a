"""The input files of one command, pinned: what was read is what is written from, or nothing is written.

Readers open their files by path, sometimes more than once (the first bytes to sniff, the header or the
pickle, then the storages). Each open reports the file here (``opened``): the first one pins it (an open
descriptor is kept, so its identity, device and inode, cannot be reused by another file, and its size and
modification time are recorded); every later open of the same path must find the same file, or the command
ends with one line, ``PATH changed while being read``. A write verifies every pin just before its commit
(``verify``): an input replaced (a rename over it), rewritten in place (size or modification time moved) or
truncated since it was first read fails the write, and nothing is written. Once a commit replaces a pinned
path itself (``--in-place``), its pin is dropped (``forget``): the new file is this command's own output.

Temporaries of paramtool's own writes (their names carry ``fsops.TMP_TAG``) are read back to check them, and
never pinned.
"""
from __future__ import annotations

import os
import stat
import threading

from ..errors import ParamtoolError
from ..fsops import TMP_TAG, on_bus_error_name


class InputChanged(ParamtoolError):
    """An input file changed (was replaced, rewritten or truncated) while the command read it."""


_lock = threading.Lock()
_pins: dict[str, tuple[int, os.stat_result, int | None]] = {}  # real path -> (kept descriptor or -1, its stat and
# its ends' checksum (``_ends``) when first read)
KEPT = 256  # descriptors kept open at most (a checkpoint of thousands of shards must not run out of them); past
# these, a file is pinned by its stat alone (its inode could then, in principle, be reused once it is deleted)


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _contents(st: os.stat_result) -> tuple[int, int]:
    return st.st_size, st.st_mtime_ns


ENDS = 4096  # bytes at each end of a pinned file checksummed (``_ends``)


def _ends(fd: int, size: int) -> int | None:
    """A checksum of the file's first and last ``ENDS`` bytes (headers, a zip's directory): a rewrite of the
    same size within one tick of the clock that stamps modification times leaves size and time as they were,
    not these bytes."""
    import zlib

    try:
        return zlib.crc32(os.pread(fd, ENDS, max(0, size - ENDS)), zlib.crc32(os.pread(fd, ENDS, 0)))
    except OSError:
        return None


def opened(path: str, fd: int | None = None) -> None:
    """``path`` was opened (as ``fd``, when given) to be read: pin it the first time, else check it is the
    file pinned."""
    if TMP_TAG in path:
        return
    try:
        st = os.fstat(fd) if fd is not None else os.stat(path)
    except OSError:
        return  # (the reader reports what it cannot open)
    if not stat.S_ISREG(st.st_mode):  # only regular files: a FIFO or a device is read once anyway
        return
    real = os.path.realpath(path)
    with _lock:
        pinned = _pins.get(real)
        if pinned is None:
            if len(_pins) >= KEPT:
                _pins[real] = (-1, st, None)
                return
            try:
                keep = os.dup(fd) if fd is not None else os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return
            os.set_inheritable(keep, False)
            first = os.fstat(keep)
            _pins[real] = (keep, first, _ends(keep, first.st_size))
            return
    if _identity(st) != _identity(pinned[1]):
        raise changed(path, "replaced by another file")


def changed(path: str, how: str) -> InputChanged:
    return InputChanged(f"{path} changed while being read ({how}); run the command again")


def _change(real: str, keep: int, first: os.stat_result, ends: int | None) -> str | None:
    """How the pinned file at ``real`` changed since it was first read, or None."""
    try:
        now = os.fstat(keep) if keep >= 0 else os.stat(real)
    except FileNotFoundError:
        return "removed"
    except OSError:
        return None
    if now.st_size < first.st_size:
        return "truncated"
    if _contents(now) != _contents(first) or (ends is not None and _ends(keep, now.st_size) != ends):
        return "rewritten"
    try:
        there = os.stat(real)
    except FileNotFoundError:
        return "removed"
    except OSError:
        return None
    if _identity(there) != _identity(first):
        return "replaced by another file"
    return None


def verify() -> None:
    """Before a commit: every pinned input is still the file that was read, unchanged (else InputChanged)."""
    with _lock:
        pins = list(_pins.items())
    for real, pin in pins:
        how = _change(real, *pin)
        if how is not None:
            raise changed(real, how)


def pinned(path: str) -> bool:
    """Was ``path`` read before in this command?"""
    with _lock:
        return os.path.realpath(path) in _pins


def cause(e: BaseException) -> BaseException:
    """The error to report for ``e``: an input that changed meanwhile is what made a read fail (a header
    that no longer matches the listing, a record gone), so that is what the line says. A rewrite in place
    shows in its first and last bytes (``_ends``) even while the file's size and modification time are those
    it was pinned with; one under way when a read tripped over it (its first bytes written, its last not yet,
    the file pinned when its first bytes already were) is asked about again a moment (20 ms) later."""
    import time

    for wait in (0.0, 0.02):
        time.sleep(wait)
        try:
            verify()
        except InputChanged as changed_input:
            return changed_input
    return e


def unchanged(path: str) -> bool:
    """Is ``path`` still the file pinned for it, as it was (True too when it was never pinned)?"""
    with _lock:
        pinned = _pins.get(os.path.realpath(path))
    return pinned is None or _change(os.path.realpath(path), *pinned) is None


def short_read(path: str, what: str) -> ParamtoolError:
    """The error for a read that ended before the bytes the file's own listing promised: the file changed
    under us (it was pinned bigger), or it was cut short to begin with."""
    from ..errors import FormatError

    with _lock:
        pinned = _pins.get(os.path.realpath(path))
    how = _change(os.path.realpath(path), *pinned) if pinned is not None else None
    if how is not None:
        return changed(path, how)
    return FormatError(f"{path}: truncated: {what} ends beyond the file")


def shrunk() -> str | None:
    """A pinned input that is now shorter than when it was first read (a mapping of it faults past its new
    end), for the message of a bus error; None when there is none. Only system calls: it runs in the
    SIGBUS handler."""
    for real, (keep, first, _) in list(_pins.items()):
        try:
            if (os.fstat(keep) if keep >= 0 else os.stat(real)).st_size < first.st_size:
                return real
        except OSError:
            continue
    return None


on_bus_error_name(shrunk)


def reset() -> None:
    """Forget every pin: a new command begins (in a process that runs several, a test's)."""
    with _lock:
        keeps = [pin[0] for pin in _pins.values() if pin[0] >= 0]
        _pins.clear()
    for keep in keeps:
        try:
            os.close(keep)
        except OSError:
            pass


def forget(path: str) -> None:
    """``path`` (a file, or a directory and everything under it) was replaced by this command's own commit."""
    real = os.path.realpath(path)
    with _lock:
        for p in [p for p in _pins if p == real or p.startswith(real.rstrip(os.sep) + os.sep)]:
            keep = _pins.pop(p)[0]
            if keep >= 0:
                try:
                    os.close(keep)
                except OSError:
                    pass

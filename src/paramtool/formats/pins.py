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
_pins: dict[str, tuple[int, os.stat_result]] = {}  # real path -> (kept descriptor or -1, its stat when first read)
KEPT = 256  # descriptors kept open at most (a checkpoint of thousands of shards must not run out of them); past
# these, a file is pinned by its stat alone (its inode could then, in principle, be reused once it is deleted)


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _contents(st: os.stat_result) -> tuple[int, int]:
    return st.st_size, st.st_mtime_ns


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
                _pins[real] = (-1, st)
                return
            try:
                keep = os.dup(fd) if fd is not None else os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return
            os.set_inheritable(keep, False)
            _pins[real] = (keep, os.fstat(keep))
            return
    if _identity(st) != _identity(pinned[1]):
        raise changed(path, "replaced by another file")


def changed(path: str, how: str) -> InputChanged:
    return InputChanged(f"{path} changed while being read ({how}); run the command again")


def _change(real: str, keep: int, first: os.stat_result) -> str | None:
    """How the pinned file at ``real`` changed since it was first read, or None."""
    try:
        now = os.fstat(keep) if keep >= 0 else os.stat(real)
    except FileNotFoundError:
        return "removed"
    except OSError:
        return None
    if now.st_size < first.st_size:
        return "truncated"
    if _contents(now) != _contents(first):
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
    for real, (keep, first) in pins:
        how = _change(real, keep, first)
        if how is not None:
            raise changed(real, how)


def pinned(path: str) -> bool:
    """Was ``path`` read before in this command?"""
    with _lock:
        return os.path.realpath(path) in _pins


def cause(e: BaseException) -> BaseException:
    """The error to report for ``e``: an input that changed meanwhile is what made a read fail (a header
    that no longer matches the listing, a record gone), so that is what the line says. Asked on the way out
    of a failure only, a moment later: a rewrite in place under way when a read tripped over it (its first bytes
    written, the file not yet extended, its modification time within the same clock tick as the pin) has shown
    by then."""
    import time

    time.sleep(0.01)
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
    for real, (keep, first) in list(_pins.items()):
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
        keeps = [keep for keep, _ in _pins.values() if keep >= 0]
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
            keep, _ = _pins.pop(p)
            if keep >= 0:
                try:
                    os.close(keep)
                except OSError:
                    pass

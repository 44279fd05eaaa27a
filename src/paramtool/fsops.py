"""The filesystem steps of a write, and what makes a write survive faults.

Every step that changes the disk (create, fsync, rename, exchange, link, unlink, remove) goes through this
module, for three reasons:

- temporaries carry one recognisable name, ``.paramtool-tmp-<pid>-<token>-<name>``, so the next write into a
  directory can remove those whose process is gone (``clean_stale``);
- the temporaries of this process are remembered, so an interrupt (Ctrl-C, SIGTERM, a closed pipe) removes them
  before the process ends, and a commit that spans several steps runs with those signals held (``critical``);
- the steps are counted, so tests can stop a write at any one of them: ``PARAMTOOL_FAULT_AT=N`` kills the
  process with SIGKILL at the N-th step (``PARAMTOOL_FAULT=enospc``: raises "No space left on device" there
  instead; ``int``/``term``: sends itself SIGINT/SIGTERM), and ``PARAMTOOL_FAULT_COUNT=FILE`` records how many steps a run took.

It also holds what keeps concurrent writers apart (``lock_for_write``: one writer of a target at a time) and
what ends a process whose mapped input was cut short under it (``guard_mappings``: one ``error:`` line, not a
SIGBUS crash).
"""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import signal
import stat
import threading
from collections.abc import Callable, Iterator

TMP_TAG = ".paramtool-tmp-"
OLD_MARK = "old~"  # a temporary holding the previous version of a directory that was moved aside

_lock = threading.RLock()
_live: dict[str, None] = {}  # temporaries of this process, in creation order
_steps = 0
_critical = 0
_pending_signal: int | None = None
_ending: int | None = None  # the thread ending the process after an interrupt (``_abort``), once one is
_signal_handled = threading.Event()
FAILURE = [1]  # the exit status of a failure no exception carries (a bus error): 1, but 2 for diff (as cmp)


def _ending_elsewhere() -> bool:
    """Is another thread ending the process? Then this one must not create or rename anything more: the
    temporaries are being removed, and one made after that would be left behind. Ask with ``_lock`` held."""
    return _ending is not None and _ending != threading.get_ident()


def shard_workers() -> int:
    """Threads that write shards at once: two, or one while the fault hook injects an interrupt. An interrupt
    removes the temporaries in the main thread while the other writer may still be opening its own (a window
    of a few instructions that a real signal almost never hits, but an injected one, sent at a step, can); with
    one writer, every step of the injection test is exact."""
    return 1 if os.environ.get("PARAMTOOL_FAULT") in ("int", "term") else 2


def _park() -> None:
    """Stop this (worker) thread for good, ``_lock`` not held: the process is ending in another thread."""
    threading.Event().wait()


def step(what: str) -> None:
    """Count one filesystem step; the fault-injection hook acts here (see the module docstring)."""
    global _steps
    with _lock:
        ending = _ending_elsewhere()
        _steps += 1
        n = _steps
    if ending:
        _park()
    count_file = os.environ.get("PARAMTOOL_FAULT_COUNT")
    if count_file:
        with open(count_file, "w") as f:
            f.write(f"{n}\n")
    at = os.environ.get("PARAMTOOL_FAULT_AT")
    if at and at.isdigit() and int(at) == n:
        fault = os.environ.get("PARAMTOOL_FAULT", "kill")
        if fault == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.kill(os.getpid(), {"int": signal.SIGINT, "term": signal.SIGTERM}.get(fault, signal.SIGKILL))
        if threading.current_thread() is not threading.main_thread():
            _signal_handled.wait(10)  # as if the signal came now: the main thread handles it before this one goes on
            with _lock:
                ending = _ending_elsewhere()
            if ending:  # it is removing the temporaries now: this thread must not go on to (re)create one
                _park()


def write_error(exc: BaseException, path: str) -> OSError | None:
    """The operating-system error behind a library's failed write, if there is one. torch's zip writer
    reports a short write (a full disk) as a RuntimeError, "unexpected pos": the chained exceptions, then the
    filesystem of ``path`` tell what happened."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    try:
        fs = os.statvfs(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
        full = fs.f_bavail * fs.f_frsize < (1 << 20)
    except OSError:
        full = False
    if full:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if "unexpected pos" in str(exc):  # a short write on a filesystem with room: a quota, most likely
        return OSError(errno.EIO, "the write was cut short (disk quota exceeded?)")
    return None


def temp_name(directory: str, name: str) -> str:
    """A fresh temporary path in ``directory`` that names this process and what it will become."""
    return os.path.join(directory, f"{TMP_TAG}{os.getpid()}-{os.urandom(4).hex()}-{name[:120]}")


def is_temp(name: str) -> bool:
    return os.path.basename(name).startswith(TMP_TAG)


def final_name(name: str) -> str:
    """The name a temporary stands for: ``.paramtool-tmp-12-ab01cd23-x.bin`` -> ``x.bin``."""
    base = os.path.basename(name)
    return base[len(TMP_TAG):].split("-", 2)[2] if is_temp(base) and base.count("-") >= 4 else base


def owner_pid(name: str) -> int | None:
    parts = os.path.basename(name)[len(TMP_TAG):].split("-", 1)
    return int(parts[0]) if is_temp(name) and parts[0].isdigit() else None


def register(path: str) -> None:
    """Remember a temporary of this process, removed if the process is interrupted or the write fails."""
    with _lock:
        _live[path] = None


def forget(path: str) -> None:
    """``path`` is no longer a temporary (it was renamed into place, or removed)."""
    with _lock:
        _live.pop(path, None)


def _rmtree(path: str, ignore_errors: bool = False) -> None:
    """``shutil.rmtree``, imported on first use: the fast ``--json`` listing path imports this module."""
    import shutil

    shutil.rmtree(path, ignore_errors=ignore_errors)


def discard(path: str) -> None:
    """Remove a temporary of this process, file or directory, if it is still there (no step: cleanup)."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            _rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        return
    forget(path)


def create_file(path: str, mode: int = 0o666) -> None:
    """Create an empty temporary file (by default 0666 less the umask, as any new file; 0600 for one in a
    shared $TMPDIR)."""
    register(path)
    step("create")
    with _lock:  # created before ``_abort`` lists the temporaries (and so removed by it), or not at all
        ending = _ending_elsewhere()
        if not ending:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode))
    if ending:
        _park()


def make_dir(path: str) -> None:
    """Create a temporary directory (mode 0777 less the umask, unlike mkdtemp's 0700)."""
    register(path)
    step("mkdir")
    os.mkdir(path, 0o777)


def fsync(path: str) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    step("fsync")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """fsync a directory after a rename in it. The rename has happened: a directory that cannot be flushed
    (some network filesystems refuse) does not make the write a failure."""
    try:
        fsync(path)
    except OSError:
        pass


def fsync_tree(root: str) -> None:
    """fsync every file and directory under ``root``, deepest first, so a rename of ``root`` publishes data."""
    for here, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync(os.path.join(here, name))
        fsync_dir(here)


def rename(src: str, dst: str) -> None:
    step("rename")
    os.rename(src, dst)


def link(src: str, dst: str) -> None:
    register(dst)
    step("link")
    os.link(src, dst)


def unlink(path: str) -> None:
    step("unlink")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    forget(path)


def remove_tree(path: str) -> None:
    step("rmtree")
    _rmtree(path, ignore_errors=True)
    forget(path)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: str, b: str) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``). False where the kernel, the
    C library or the filesystem cannot; the caller then falls back to two renames."""
    import ctypes  # here: the listing commands' fast start-up imports this module for its signal handling

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    step("exchange")
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def copy_owner_and_mode(path: str, st: os.stat_result, uid: int | None = None, gid: int | None = None) -> None:
    """Give ``path`` the mode, owner and group of ``st`` (what it replaces), as far as this user may;
    ``uid``/``gid`` override the owner and group."""
    uid, gid = st.st_uid if uid is None else uid, st.st_gid if gid is None else gid
    os.chmod(path, stat.S_IMODE(st.st_mode))
    if (os.stat(path).st_uid, os.stat(path).st_gid) == (uid, gid):
        return
    for uid, gid in ((uid, gid), (-1, gid)):
        try:
            os.chown(path, uid, gid)
            break
        except PermissionError:
            continue
    os.chmod(path, stat.S_IMODE(st.st_mode))  # chown clears set-id bits


_held: dict[tuple[int, int], int] = {}  # (device, inode) of what this process holds locked -> its descriptor


def lock_for_write(path: str) -> None:
    """Hold, until the command is done (``release_locks``) or the process ends, the exclusive lock of the
    target ``path`` that a write will replace or change: two paramtool writes of one target run one after the other, each reading what the previous one
    committed. The lock is ``flock`` on the target itself (a file, or a sharded, DCP or model directory; for a
    ``*.index.json``, its directory), so nothing is created for it; a second writer waits, saying so once on
    stderr. A target replaced by the holder's commit is a new file: a waiter that wakes on the old one locks
    the new one instead (and then reads it). A target that does not exist yet, or is no regular file or
    directory (``/dev/null``, a FIFO), has nothing to protect and is not locked."""
    import fcntl

    target = (os.path.dirname(path) or ".") if path.endswith(".index.json") and os.path.isfile(path) else path
    waited = False
    while True:
        try:
            st = os.stat(target)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                return
            fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # none yet, or unreadable: the write itself reports what is wrong
            return
        if (os.fstat(fd).st_dev, os.fstat(fd).st_ino) in _held:
            os.close(fd)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not waited:
                import sys

                shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in path)  # no control characters
                sys.stderr.write(f"waiting for another paramtool writing {shown} to finish\n")
                sys.stderr.flush()
                waited = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a filesystem without flock: go on unlocked, as before
            os.close(fd)
            return
        mine = os.fstat(fd)
        try:
            now = os.stat(target)
        except OSError:
            now = None
        if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
            _held[(mine.st_dev, mine.st_ino)] = fd
            return
        os.close(fd)  # replaced while we waited: lock what is there now


def release_locks() -> None:
    """Let go of every write lock this process holds (its command is done; the process may run another)."""
    for key in list(_held):
        with contextlib.suppress(OSError):
            os.close(_held.pop(key))


def holds_lock(path: str) -> bool:
    """Does this process hold ``path``'s write lock (``lock_for_write``)?"""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) in _held


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def referenced_by_indexes(directory: str) -> set[str]:
    """Files named by a sharded index in ``directory``: a temporary name an index points to is in use."""
    names: set[str] = set()
    for path in glob.glob(os.path.join(glob.escape(directory), "*.index.json")):
        try:
            with open(path, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map") or {}
            names.update(os.path.normpath(os.path.join(directory, v)) for v in weight_map.values())
        except (OSError, ValueError, AttributeError, TypeError):
            continue
    return names


def stale_temporaries(directory: str) -> list[str]:
    """Temporaries in ``directory`` left by paramtool processes that no longer run."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    found = []
    for name in names:
        pid = owner_pid(name)
        if pid is not None and not process_alive(pid):
            found.append(os.path.join(directory, name))
    return found


def clean_stale(directory: str) -> None:
    """Remove what killed writes left in ``directory``; never a file that an index there points to, and a
    directory moved aside whose replacement never arrived is moved back."""
    stale = stale_temporaries(directory)
    if not stale:
        return
    in_use = referenced_by_indexes(directory)
    for path in stale:
        if os.path.normpath(path) in in_use:
            continue
        base = final_name(path)
        home = os.path.join(directory, base[len(OLD_MARK):])
        if base.startswith(OLD_MARK) and not os.path.lexists(home):
            with contextlib.suppress(OSError):  # killed between two renames: put the old version back
                os.rename(path, home)
            continue
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                    _rmtree(path)
            else:
                os.unlink(path)
        except OSError:
            pass


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGPIPE while a commit of several steps runs; act on them after it."""
    global _critical, _pending_signal
    with _lock:
        _critical += 1
    try:
        yield
    finally:
        with _lock:
            _critical -= 1
            pending = _pending_signal if _critical == 0 else None
            if pending is not None:
                _pending_signal = None
        if pending is not None:
            _abort(pending)


def _on_signal(signum: int, frame: object) -> None:
    global _pending_signal
    if _critical:
        _pending_signal = signum
        return
    _abort(signum)


def _abort(signum: int) -> None:
    """End the process now: temporaries removed; a closed pipe quietly (141, as SIGPIPE would), an interrupt
    with one ``error: interrupted`` line and 128 + the signal's number (130 Ctrl-C, 143 SIGTERM)."""
    global _ending
    with _lock:
        _ending = threading.get_ident()
        live = list(_live)
    _signal_handled.set()
    for path in reversed(live):
        discard(path)
    if signum == signal.SIGPIPE:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os._exit(141)
    with contextlib.suppress(OSError):
        os.write(2, b"error: interrupted\n")
    os._exit(128 + signum)


def _on_bus_error(signum: int) -> None:
    """SIGBUS: a mapped input file was cut short by another process, and a read touched a page past its new
    end. The faulting read cannot go on, so the process ends here, as an interrupt does (temporaries
    removed), with one ``error:`` line naming the input instead of a crash."""
    with _lock:
        live = list(_live)
    for path in reversed(live):
        discard(path)
    which = _shrunk_input[0]()
    what = f"{which} changed while being read (truncated)" if which else "an input file changed while being read (truncated)"
    with contextlib.suppress(OSError):
        os.write(2, f"error: {what}; run the command again\n".encode("utf-8", "replace"))
    os._exit(FAILURE[0])


_shrunk_input: list[Callable[[], str | None]] = [lambda: None]  # which input was cut short (``on_bus_error_name``)


def on_bus_error_name(find: Callable[[], str | None]) -> None:
    """Name the input a bus error reports with ``find()`` (an input that is now shorter than when read; None:
    unknown). ``formats.pins``, which knows the inputs, registers itself here, so this module imports nothing
    of the formats. ``find`` runs inside the SIGBUS handler: system calls only."""
    _shrunk_input[0] = find


_bus_handler = None  # the C-callable SIGBUS handler, kept alive for the life of the process
_bus_wanted = False  # set by the command line (``install_signal_handlers``)


def guard_mappings() -> None:
    """Called before an input file is mapped: from then on a bus error ends the process through
    ``_on_bus_error`` (when the command line asked for it). Installed on the first mapping, not at start-up,
    so the listing commands, which map nothing, do not import ctypes."""
    if _bus_wanted and _bus_handler is None:
        with _lock:
            if _bus_handler is None:
                _install_bus_handler()


def _install_bus_handler() -> None:
    """Route SIGBUS to ``_on_bus_error``. Python's own ``signal.signal`` cannot: its handler runs between
    bytecodes, after the faulting instruction, which a bus error re-runs forever. A C-level handler (ctypes)
    runs at the fault itself, on whichever thread touched the page, and never returns."""
    global _bus_handler
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        kind = ctypes.CFUNCTYPE(None, ctypes.c_int)
        libc.signal.restype = ctypes.c_void_p
        libc.signal.argtypes = [ctypes.c_int, kind]
        _bus_handler = kind(_on_bus_error)
        libc.signal(signal.SIGBUS, _bus_handler)
    except (AttributeError, OSError):  # no C library to ask: a bus error stays a crash
        _bus_handler = False


def install_signal_handlers() -> None:
    """For the command line only (not for a library user's process): interrupts and a closed pipe end the
    process through ``_abort``, whatever typer, click or rich would do with the exception; a bus error (an
    input truncated under a mapping) through ``_on_bus_error`` (``guard_mappings``)."""
    global _bus_wanted
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(signum, _on_signal)
    _bus_wanted = True

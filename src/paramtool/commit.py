"""Every write's commit: a file, a stream (stdout, a device, a FIFO), a directory (a DCP checkpoint, a model
directory, a PEFT adapter, a new sharded checkpoint) or a sharded checkpoint in place (through its index:
``shard_commit``) appears complete or not at all.

A write goes to a temporary beside the target, is read back and checked by the caller's ``write``/``build``,
flushed to disk, and only then renamed over the target (or exchanged with it). Any failure removes the
temporary and leaves the target untouched; the inputs the output was built from must not have changed since
they were read (``formats.pins``).
"""
from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import fsops, shard_commit
from .errors import ParamtoolError
from .formats import pins

if TYPE_CHECKING:
    from .writer import Output


def _failure(target: str, e: OSError) -> ParamtoolError:
    """One readable line naming the target and the reason (ENOSPC, EIO, EDQUOT, EROFS, EACCES, ...)."""
    return ParamtoolError(f"cannot write {target}: {e.strerror or e}")


def atomic_write(target: str, write: Callable[[str], None]) -> None:
    """Write via ``write(tmp_path)`` to a temporary file beside ``target``, then rename it over ``target``.

    A symlink is kept and the file it names is rewritten; a target that is not a regular file (a device, a
    FIFO) is written into, never replaced. An existing file keeps its mode, owner and group (as far as this
    user may set them); a new one gets 0666 less the umask. On any failure, or an interrupt, the temporary
    file is removed and the target is as it was.
    """
    try:
        st = os.stat(target)  # through symlinks: /dev/stdout and /proc/self/fd/1 name a pipe, not a path
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise _failure(target, e) from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise ParamtoolError(f"cannot write {target}: it is a directory")
    if st is not None and not stat.S_ISREG(st.st_mode):
        _write_through(target, write, lambda: open(target, "wb"))
        return
    real = os.path.realpath(target)
    directory = os.path.dirname(real)
    fsops.clean_stale(directory)
    tmp = fsops.temp_name(directory, os.path.basename(real))
    try:
        fsops.create_file(tmp)
        write(tmp)
        if st is not None:
            fsops.copy_owner_and_mode(tmp, st)
        fsops.fsync(tmp)
        pins.verify()  # built from the inputs as they were read, or not at all
        fsops.rename(tmp, real)
        fsops.forget(tmp)
        pins.forget(real)
        fsops.fsync_dir(directory)
    except BaseException as e:
        fsops.discard(tmp)
        if isinstance(e, OSError) and not isinstance(e, BrokenPipeError):
            raise _failure(target, e) from None
        raise


def _write_through(label: str, write: Callable[[str], None], open_dest: Callable[[], Any]) -> None:
    """Make the whole file in a temporary file under ``$TMPDIR``, then copy it into a stream (stdout, a device,
    a FIFO): nothing reaches the destination unless the file was complete and verified."""
    directory = tempfile.gettempdir()
    fsops.clean_stale(directory)
    tmp = fsops.temp_name(directory, "out")
    try:
        try:
            fsops.create_file(tmp, 0o600)
            write(tmp)
        except OSError as e:
            raise ParamtoolError(f"cannot write {label}: {e.strerror or e} (temporary file in {directory})") from None
        pins.verify()
        with open(tmp, "rb") as f:
            dest = open_dest()
            try:
                shutil.copyfileobj(f, dest, 1 << 20)
                dest.flush()
            finally:
                if dest is not sys.stdout.buffer:
                    dest.close()
    except OSError as e:
        if isinstance(e, BrokenPipeError):
            raise
        raise _failure(label, e) from None
    finally:
        fsops.discard(tmp)


def emit(output: Output, write: Callable[[str], None]) -> None:
    """Run ``write(path)`` for ``output``: atomically onto a file, or through a temporary file to stdout."""
    if output.temporary:  # (a shard of an in-place sharded write): no temporary of the temporary
        try:
            fsops.create_file(output.path)
            write(output.path)
            fsops.fsync(output.path)
        except OSError as e:  # the caller removes the temporary
            raise e if isinstance(e, BrokenPipeError) else _failure(output.path, e) from None
        return
    if output.path is not None:
        atomic_write(output.path, write)
        return
    sys.stdout.flush()
    _write_through("the checkpoint to stdout", write, lambda: sys.stdout.buffer)


def commit_in_place(index: Any, build: Callable[[str], dict[str, str]], started: list[str],
                    final: Callable[[], dict | None] = lambda: None) -> None:
    """Write the changed shards beside the old ones and commit them through the index (``shard_commit``);
    ``final()`` (asked once the shards are written): the new index document, when the index changes."""
    fsops.clean_stale(index.directory)
    try:
        pending = build(index.directory)
        shard_commit.commit(index.path, index.raw, pending, final())
    except BaseException as e:
        for tmp in started:  # (none of them once committed: the commit swallows its own cleanup errors)
            fsops.discard(tmp)
        if isinstance(e, OSError) and not isinstance(e, BrokenPipeError):
            raise _failure(index.directory, e) from None
        raise


def commit_directory(final: str, build: Callable[[str], Any]) -> None:
    """Build a directory beside ``final`` and make it ``final`` in one atomic step: a rename when ``final``
    does not exist, else an exchange of the two (``renameat2(RENAME_EXCHANGE)``) after which the old tree
    is removed. A reader sees the old directory or the complete new one, never a half-written or missing one.
    The new directory has 0777 less the umask, or the mode, owner and group of the directory it replaces."""
    label = final
    final = os.path.realpath(final)  # a symlink to the directory is kept; the directory it names is replaced
    parent = os.path.dirname(final)
    try:
        st = os.stat(final)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise _failure(label, e) from None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise ParamtoolError(f"cannot write {label}: it exists and is not a directory")
    if not os.path.isdir(parent):
        raise ParamtoolError(f"cannot write {label}: the directory {parent} does not exist")
    fsops.clean_stale(parent)
    work = fsops.temp_name(parent, os.path.basename(final))
    try:
        fsops.make_dir(work)
        if st is not None:
            fsops.copy_owner_and_mode(work, st)
        build(work)
        if st is not None:
            _inherit(work, final, st)
        fsops.fsync_tree(work)
        pins.verify()
        with fsops.critical():
            old = _swap_in(work, final, st is not None)
            fsops.forget(work)
            pins.forget(final)
            fsops.fsync_dir(parent)
            if old is not None:
                try:  # the new directory is in place: what is left is cleanup, which cannot fail the write
                    fsops.remove_tree(old)
                except OSError:
                    pass  # a stale temporary now, for the next write into ``parent``
    except BaseException as e:
        fsops.discard(work)
        if isinstance(e, OSError) and not isinstance(e, BrokenPipeError):
            raise _failure(label, e) from None
        raise


def _inherit(work: str, final: str, st: os.stat_result) -> None:
    """Files of a directory written in place keep the mode, owner and group of the files they replace; new
    ones get the directory's owner and group."""
    for here, _, files in os.walk(work):
        for name in files:
            path = os.path.join(here, name)
            try:
                old = os.stat(os.path.join(final, os.path.relpath(path, work)))
            except OSError:
                old = None
            if old is not None:
                fsops.copy_owner_and_mode(path, old)
            else:
                fsops.copy_owner_and_mode(path, os.stat(path), st.st_uid, st.st_gid)


def _swap_in(work: str, final: str, exists: bool) -> str | None:
    """The commit of ``commit_directory``; returns where the old tree now is, to be removed."""
    if not exists:
        fsops.rename(work, final)
        return None
    if fsops.exchange(work, final):
        return work  # a kill from here on leaves the old tree to clean_stale
    # no RENAME_EXCHANGE on this kernel or filesystem: two renames, with a moment where ``final`` is absent
    old = fsops.temp_name(os.path.dirname(final), fsops.OLD_MARK + os.path.basename(final))
    fsops.register(old)
    fsops.rename(final, old)
    try:
        fsops.rename(work, final)
    except BaseException:
        os.rename(old, final)
        fsops.forget(old)
        raise
    return old



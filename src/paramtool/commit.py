"""Every write's commit: a file, a stream (stdout, a device, a FIFO), a directory (a DCP checkpoint, a model
directory, a PEFT adapter, a new sharded checkpoint) or a sharded checkpoint in place (through its index:
``commit_index``, below) appears complete or not at all.

A write goes to a temporary beside the target, is read back and checked by the caller's ``write``/``build``,
flushed to disk, and only then renamed over the target (or exchanged with it). Any failure removes the
temporary and leaves the target untouched; the inputs the output was built from must not have changed since
they were read (``formats.pins``).
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from . import formats, fsops
from .errors import ParamtoolError
from .formats import pins
from .records import dataclass

if TYPE_CHECKING:
    from .formats import Format



@dataclass(frozen=True)
class Output:
    path: str | None  # None: standard output
    format: str  # "pt" | "torchscript" (an edited archive) | "safetensors" | "sharded" | "dcp" | "directory" (a model directory, see formats.modeldir)
    in_place: bool = False
    weights_format: str | None = None  # "directory": the format of the weight files
    max_shard_size: int | None = None  # "directory": reshard to at most this many bytes per file
    temporary: bool = False  # path is already a temporary of this process's write: written directly

    @property
    def label(self) -> str:
        return self.path or "-"

    @property
    def layout(self) -> Format:
        """The format written, as the object to ask (``formats.base.Format``)."""
        return formats.by_name(self.format)


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
    """Write the changed shards beside the old ones and commit them through the index (``commit_index``);
    ``final()`` (asked once the shards are written): the new index document, when the index changes."""
    fsops.clean_stale(index.directory)
    try:
        pending = build(index.directory)
        commit_index(index.path, index.raw, pending, final())
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


# ---------------------------------------------------------------- a sharded checkpoint's index as the commit point
#
# Installing a set of new files into a sharded checkpoint's directory in one atomic step, the index.
#
# A reader finds shards through the index only, so the index is the commit point:
#
# 1. the new shards are written under temporary names beside the old ones (flushed, fsynced); until the next
#    step the index names the old shards, and a kill leaves the old checkpoint plus stale temporaries;
# 2. an index naming the new shards by their temporary names is renamed over the index: the commit. From here
#    a reader sees the complete new checkpoint;
# 3. each new shard is hard-linked to its own name (link + rename, replacing the old shard, which no index
#    names any more), the index with the library's own names is renamed over the index again, and the
#    temporary names are unlinked. Every state in between is the complete new checkpoint.
#
# A kill inside step 3 leaves a valid new checkpoint whose index names some temporaries; the next paramtool
# write into that directory (``recover``) finishes step 3. ``fsops.clean_stale`` never removes a file an index
# points to.
#
# The index itself may change too (surgery renames names, drops a whole shard, changes ``total_size``): the
# commit then installs the new document rather than the old bytes, and the shards it no longer names are
# removed in step 3.
#
# The index written in step 2 carries a journal (``JOURNAL_KEY``): the temporaries this commit created and the
# old shards it is to remove, each with its identity (device, inode, size, modification time) taken when the
# commit began. ``recover`` touches only what the journal names, found inside the directory (no ``..``, no
# absolute path, no symlinked directory on the way, the entry itself never followed) and still that very file:
# an index from elsewhere cannot make it delete or overwrite anything (its journal cannot name a file's
# identity before the file exists), and an index without a journal is left as it is.

JOURNAL_KEY = "paramtool.journal"  # step 2's index only: {"created": {temporary: id}, "unlink": {shard: id}}


def _identity(path: str) -> list[int]:
    """What makes a file this file and no other: device, inode, size, modification time (of the entry itself,
    not of what a symlink names; ``link`` changes a file's ctime, not these)."""
    st = os.lstat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def _proven(directory: str, name: Any, identity: Any) -> str | None:
    """``directory/name`` when it is inside ``directory`` (symlinks resolved) and still the file ``identity``
    recorded; else None."""
    from .errors import FormatError
    from .formats.dcp import resolve_inside

    try:
        path = resolve_inside(directory, name, "journal entry", entry=True)
        return path if _identity(path) == identity else None
    except (FormatError, OSError, TypeError, ValueError):
        return None


def _dumps(doc: dict) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode("utf-8")


def _install(path: str, data: bytes) -> None:
    """Atomically replace ``path`` by ``data`` (temporary, fsync, rename), keeping its mode and owner."""
    directory = os.path.dirname(path)
    tmp = fsops.temp_name(directory, os.path.basename(path))
    try:
        fsops.create_file(tmp)
        with open(tmp, "wb") as f:
            f.write(data)
        if os.path.exists(path):
            fsops.copy_owner_and_mode(tmp, os.stat(path))
        fsops.fsync(tmp)
        fsops.rename(tmp, path)
        fsops.forget(tmp)
        fsops.fsync_dir(directory)
    except BaseException:
        fsops.discard(tmp)
        raise


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    """One commit at a time in a directory: two writers' steps 2-3 never interleave (a reader could see one
    writer's shards beside the other's). A command writing the directory in place holds its lock already
    (``fsops.lock_for_write``, from before it read the checkpoint): then there is nothing more to take."""
    if fsops.holds_lock(directory):
        yield
        return
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def commit_index(index_path: str, raw: dict, pending: dict[str, str], final: dict | None = None) -> None:
    """Make ``pending`` (shard name as the index has it -> absolute path of its new, complete file) the
    checkpoint: steps 2 and 3 above, with interrupts held until done.

    ``final``: the new index document, when it changes (its shards may be fewer than ``raw``'s: those it no
    longer names are removed); None (or ``raw`` itself) keeps the index as it is, byte for byte."""
    if final == raw:
        final = None  # the same document: its bytes are kept
    if not pending and final is None:
        return
    directory = os.path.dirname(os.path.abspath(index_path))
    doc = raw if final is None else final
    relative = {shard: os.path.relpath(tmp, directory) for shard, tmp in pending.items()}
    removed = sorted(set(raw["weight_map"].values()) - set(doc["weight_map"].values()) - set(pending))
    interim = dict(doc)
    interim["weight_map"] = {name: relative.get(shard, shard) for name, shard in doc["weight_map"].items()}
    interim[JOURNAL_KEY] = {
        "created": {rel: _identity(pending[shard]) for shard, rel in relative.items()},
        "unlink": {s: _identity(os.path.join(directory, s)) for s in removed
                   if os.path.lexists(os.path.join(directory, s))},
    }
    with fsops.critical(), _locked(directory):
        pins.verify()  # the shards kept and the ones rewritten are all of the checkpoint that was read
        if final is None:
            with open(index_path, "rb") as f:
                index_bytes = f.read()  # written back byte for byte once the shards have their names again
        else:
            index_bytes = _dumps(final)
        _install(index_path, _dumps(interim))  # the commit
        pins.forget(directory)
        for tmp in pending.values():
            fsops.forget(tmp)  # now part of the checkpoint: never removed as a temporary
        try:
            _finish(directory, index_path, index_bytes, relative, removed)
        except OSError as e:  # the checkpoint is complete and valid; the next write into this directory finishes
            import sys

            sys.stderr.write(f"warning: {directory}: the new shards are committed, but giving them back their "
                             f"names failed ({e.strerror or e}); the next paramtool write there finishes it\n")


def _finish(directory: str, index_path: str, index_bytes: bytes, relative: dict[str, str],
            removed: list[str] = ()) -> None:
    """Step 3: give the new shards their own names back, remove the shards the index dropped, then drop
    the temporary names."""
    for shard, rel in relative.items():
        new, final = os.path.join(directory, rel), os.path.join(directory, shard)
        if os.path.exists(final) and os.path.samefile(new, final):
            continue  # done before a kill (rename() of two links to one file would do nothing)
        link = fsops.temp_name(os.path.dirname(final), os.path.basename(final))
        try:
            fsops.link(new, link)
            fsops.rename(link, final)
        except OSError:
            fsops.discard(link)
            raise
        fsops.forget(link)
    for shard in removed:
        if os.path.lexists(os.path.join(directory, shard)):  # (gone already when a recovery repeats this)
            fsops.unlink(os.path.join(directory, shard))
    fsops.fsync_dir(directory)
    _install(index_path, index_bytes)
    for rel in relative.values():
        fsops.unlink(os.path.join(directory, rel))


def recover(directory: str) -> bool:
    """Finish a commit that a killed process left inside step 3 (its index names temporaries); True if
    there was one. Only what the index's journal names, proven to be those files, is linked or removed."""
    recovered = False
    for index_path in glob.glob(os.path.join(glob.escape(directory), "*.index.json")):
        try:
            with open(index_path, encoding="utf-8") as f:
                doc = json.load(f)
            weight_map = doc["weight_map"]
            journal = doc.get(JOURNAL_KEY)
            if not isinstance(journal, dict):
                continue  # no journal: nothing here is provably paramtool's to finish
            created, unlink = journal.get("created") or {}, journal.get("unlink") or {}
            relative = {}
            for rel in dict.fromkeys(weight_map.values()):
                pid = fsops.owner_pid(rel)
                if (pid is not None and not fsops.process_alive(pid) and rel in created
                        and _proven(directory, rel, created[rel]) is not None):
                    relative[os.path.join(os.path.dirname(rel), fsops.final_name(rel))] = rel
            removed = [s for s, ident in unlink.items()
                       if s not in weight_map.values() and _proven(directory, s, ident) is not None]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if relative or removed or unlink:
            back = {v: k for k, v in relative.items()}
            raw = {k: v for k, v in doc.items() if k != JOURNAL_KEY}
            raw["weight_map"] = {name: back.get(rel, rel) for name, rel in weight_map.items()}
            with fsops.critical(), _locked(directory):
                _finish(directory, index_path, _dumps(raw), relative, removed)
            pins.forget(directory)  # the index (and shards) read before this are replaced by their finished state
            recovered = True
    return recovered

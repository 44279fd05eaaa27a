"""Installing a set of new files into a sharded checkpoint's directory in one atomic step, the index.

A reader finds shards through the index only, so the index is the commit point:

1. the new shards are written under temporary names beside the old ones (flushed, fsynced); until the next
   step the index names the old shards, and a kill leaves the old checkpoint plus stale temporaries;
2. an index naming the new shards by their temporary names is renamed over the index: the commit. From here
   a reader sees the complete new checkpoint;
3. each new shard is hard-linked to its own name (link + rename, replacing the old shard, which no index
   names any more), the index with the library's own names is renamed over the index again, and the
   temporary names are unlinked. Every state in between is the complete new checkpoint.

A kill inside step 3 leaves a valid new checkpoint whose index names some temporaries; the next paramtool
write into that directory (``recover``) finishes step 3. ``fsops.clean_stale`` never removes a file an index
points to.

The index itself may change too (surgery renames names, drops a whole shard, changes ``total_size``): the
commit then installs the new document rather than the old bytes, and the shards it no longer names are
removed in step 3.

The index written in step 2 carries a journal (``JOURNAL_KEY``): the temporaries this commit created and the
old shards it is to remove, each with its identity (device, inode, size, modification time) taken when the
commit began. ``recover`` touches only what the journal names, found inside the directory (no ``..``, no
absolute path, no symlinked directory on the way, the entry itself never followed) and still that very file:
an index from elsewhere cannot make it delete or overwrite anything (its journal cannot name a file's
identity before the file exists), and an index without a journal is left as it is.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
from collections.abc import Iterator
from typing import Any

from . import fsops

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


def commit(index_path: str, raw: dict, pending: dict[str, str], final: dict | None = None) -> None:
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
    from .formats import pins

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
            from .formats import pins

            pins.forget(directory)  # the index (and shards) read before this are replaced by their finished state
            recovered = True
    return recovered

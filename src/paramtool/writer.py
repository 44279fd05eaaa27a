"""Writing checkpoints: where the output goes, in which format, and the atomic replace.

A write goes to a temporary file beside the target, is read back and checked, flushed to disk, and only
then renamed over the target. Any failure removes the temporary file and leaves the target untouched.
"""
from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

from . import formats, fsops, shard_commit, tree
from .checkpoint import Checkpoint
from .errors import ParamtoolError, UsageError
from .formats import Format, pins
from .records import dataclass
from .sources import Source


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


def plan_output(src: Source, out: str | None, in_place: bool, fmt: str | None,
                max_shard_size: str | None = None, convert: bool = False) -> Output:
    """Apply the contract's OUTPUT rules: ``-o``, ``--in-place``, or stdout when it is not a terminal.

    An edit of a TorchScript archive (``values_only``) writes the archive again where a torch file is asked
    for; ``convert`` writes its state dict."""
    if fmt is not None and not getattr(formats.find(fmt), "single_file", False):
        raise UsageError(f"--format must be pt or safetensors, not '{fmt}'")
    _refuse_foreign(out, fmt)
    from .formats import modeldir

    from .blob import check_output

    check_output(src.path, out, in_place)  # remote sources and targets (``blob``)
    directory = modeldir.plan_output(src, out, in_place, fmt, max_shard_size)
    if directory is not None:
        return Output(directory[0], formats.DIRECTORY.name, weights_format=directory[1], max_shard_size=directory[2])
    if src.layout is not None and src.layout.is_container:
        return _plan_directory_output(src, out, in_place, fmt)
    is_input_file = src.kind == "file" and src.text != "-"
    if out == "-":
        out = None
        if in_place:
            raise UsageError("-o - (stdout) and --in-place contradict each other")
    elif out is not None and is_input_file and os.path.exists(out) and os.path.samefile(out, src.path):
        in_place = True  # -o naming the input (any of its names: a hard link too) counts as --in-place
    elif out is not None and in_place:
        raise UsageError("give either -o PATH or --in-place, not both")
    if in_place:
        if not is_input_file:
            raise UsageError(f"--in-place needs a checkpoint file as SOURCE, not '{src.text}'")
        if src.directory and os.path.islink(src.path):  # a Hugging Face snapshot's link to a shared blob
            raise ParamtoolError(f"{src.path} is a symlink to {os.path.realpath(src.path)}: --in-place would rewrite "
                                 "the file it links to (other snapshots may share it); write with -o DIR, or "
                                 "name the weights file itself as SOURCE to rewrite it there")
        if fmt is not None and src.layout is not None and formats.by_name(fmt).pickled != src.layout.pickled:
            raise UsageError(f"--in-place keeps {src.path} a {src.layout.name} file: to write {fmt}, "
                             "give -o PATH with a new name")
        out = out or src.path  # the name given is the one replaced (and the one the summary names)
    if out is None and not in_place and sys.stdout.isatty():
        raise UsageError("refusing to write a checkpoint to a terminal: use -o PATH, --in-place, or a pipe")
    default = src.layout if src.layout is not None and src.layout.single_file else formats.PT
    chosen = formats.by_name(fmt) if fmt else formats.for_output_path(out, default)
    if src.layout is not None and src.layout.values_only and not convert and not fmt and chosen.pickled:
        chosen = src.layout  # an edited archive stays an archive, whatever -o's extension
    return Output(out, chosen.name, in_place)


# output extensions of formats paramtool does not write: a torch zip under such a name would mislead
FOREIGN_EXTENSIONS = {".gguf": "GGUF", ".onnx": "ONNX", ".npy": "numpy", ".npz": "numpy", ".h5": "HDF5",
                      ".hdf5": "HDF5", ".keras": "Keras", ".pb": "TensorFlow", ".tflite": "TensorFlow Lite"}


def _refuse_foreign(out: str | None, fmt: str | None) -> None:
    """``-o model.gguf`` is refused unless ``--format`` says what to write under that name."""
    ext = os.path.splitext(out or "")[1].lower()
    if fmt is None and ext in FOREIGN_EXTENSIONS:
        raise UsageError(f"-o {out}: paramtool does not write {FOREIGN_EXTENSIONS[ext]} files; name a .safetensors or "
                         f".pt file (or give --format pt|safetensors to write that format under this name)")


def _plan_directory_output(src: Source, out: str | None, in_place: bool, fmt: str | None) -> Output:
    """A sharded or DCP checkpoint is written in its own layout into a directory (``-o DIR``, or
    ``--in-place``), or merged into one file by ``-o FILE.safetensors|.pt``."""
    if in_place and out is not None:
        raise UsageError("give either -o PATH or --in-place, not both")
    if in_place:
        return Output(src.path, src.kind, True)
    if out is None or out == "-":
        raise UsageError(f"a {src.kind} checkpoint is written to a directory: use -o DIR, --in-place, "
                         "or -o FILE.safetensors (or .pt) to merge it into one file")
    if os.path.exists(out) and os.path.isdir(src.path) and not os.path.isdir(out) and \
            os.path.commonpath([os.path.realpath(src.path), os.path.realpath(out)]) == os.path.realpath(src.path):
        raise UsageError(f"-o {out} is a file of the {src.kind} checkpoint being read: choose a path outside it, "
                         "or use --in-place")
    if (fmt is None or src.layout.split) and (os.path.isdir(out) or not os.path.splitext(out)[1]):
        # (a sharded source's -o DIR in another format or resharded is a model directory: formats.modeldir)
        if os.path.isdir(out) and os.listdir(out):
            raise UsageError(f"{out} is a directory that is not empty: choose a new one, or use --in-place")
        return Output(out, src.kind)
    return Output(out, fmt or formats.for_output_path(out, formats.PT).name)


def non_tensor_entries(ckpt: Checkpoint) -> list[str]:
    """What a safetensors file cannot hold: non-tensor entries and tensors outside the listed names."""
    if tree.is_module(ckpt.root):
        return []
    base = _key_base(ckpt)  # with --key, only the sub-tree goes to the file: what is outside does not matter
    sub = tree.get_path(ckpt.root, base)
    listed = {p[len(base):] for p in ckpt.names.values()}
    extra = [".".join(str(p) for p in path) for path, _ in tree.walk(sub) if path not in listed]

    def plain(obj, path=()):
        if tree.is_tensor(obj):
            return
        if isinstance(obj, Mapping):
            for k, v in obj.items():
                yield from plain(v, path + (k,))
        elif isinstance(obj, (list, tuple)) and obj:
            for i, v in enumerate(obj):
                yield from plain(v, path + (i,))
        else:
            yield ".".join(str(p) for p in path) or "(root)"

    return list(plain(sub)) + extra


def _key_base(ckpt: Checkpoint) -> tree.Path:
    """Where the ``--key`` sub-tree sits in the container (``()``: no --key, the whole container)."""
    return tree.find_key(ckpt.root, ckpt.key) if ckpt.key and not tree.is_module(ckpt.root) else ()


def _pt_root(ckpt: Checkpoint, narrow: bool, drop_extra: bool) -> tuple[Any, tree.Path | None]:
    """What a torch file gets, and where it sits in ``ckpt.root`` (None: a flat ``{name: tensor}`` dict).

    ``--drop-extra`` keeps only the listed tensors, as safetensors would (ties stay shared storage);
    ``narrow`` (convert with ``--key``) keeps only the sub-tree; else the whole container goes back as it
    came, a DCP checkpoint's optimizer state and nesting included.
    """
    root = ckpt.root
    if ckpt.layout.in_memory and tree.is_module(root):  # an nn: or factory model: its state dict
        return root.state_dict(), None
    if drop_extra or (ckpt.layout.is_container and ckpt.layout.flat):  # merged shards: one flat state dict
        return ckpt.tensors(), None
    if narrow and ckpt.key:
        base = _key_base(ckpt)
        return tree.get_path(root, base), base
    return root, ()


def _write_to(ckpt: Checkpoint, fmt: str, path: str, drop_extra: bool, narrow: bool = False) -> None:
    layout = formats.by_name(fmt)
    if not layout.holds_non_tensors:  # safetensors
        dropped = non_tensor_entries(ckpt)
        if dropped and not drop_extra:
            # (the CLI escapes the whole error line before it reaches a terminal)
            shown = ", ".join(dropped[:6]) + (f" and {len(dropped) - 6} more" if len(dropped) > 6 else "")
            raise ParamtoolError(
                f"safetensors cannot hold non-tensor entries ({shown}); pass --drop-extra to write the tensors only"
            )
        layout.save(ckpt.tensors(), ckpt.metadata, path)
    else:
        layout.save(_pt_root(ckpt, narrow, drop_extra)[0], None, path)


def verify_written(ckpt: Checkpoint, written: Source, key: str | None) -> None:
    """Read what was written back (its table of contents): every name must be there, same shape and dtype."""
    from .sources import open_listing

    got = {i.name: (i.shape, i.dtype) for i in open_listing(written, key).infos()}
    bad = next((i.name for i in ckpt.infos() if got.get(i.name) != (i.shape, i.dtype)), None)
    if bad is not None:
        raise ParamtoolError(f"verification of the written checkpoint failed at '{bad}'; nothing was replaced")


def verify_file(ckpt: Checkpoint, fmt: str, path: str, narrow: bool = False, drop_extra: bool = False) -> None:
    """Read back the file just written at ``path`` as ``fmt`` and check it holds ``ckpt`` as written."""
    from .sources import sniff_file

    written = Source(path, "file", path, sniff_file(path))
    base = _pt_root(ckpt, narrow, drop_extra)[1] if formats.by_name(fmt).holds_non_tensors and ckpt.layout.holds_non_tensors else None
    _verify_at(ckpt, written, base)


def _verify_at(ckpt: Checkpoint, written: Source, base: tree.Path | None) -> None:
    """Verify ``written``, which holds ``ckpt``'s container (``base == ()``), its sub-tree at ``base``, or
    (None) its tensors by name."""
    from .sources import open_listing

    if base:  # a sub-tree on its own: its names may read differently, so compare tensor by tensor by path
        got = {p: (tuple(t.shape), t.dtype) for p, t in tree.walk(open_listing(written).root)}
        bad = next((i.name for i in ckpt.infos() if got.get(i.path[len(base):]) != (i.shape, i.dtype)), None)
        if bad is not None:
            raise ParamtoolError(f"verification of the written checkpoint failed at '{bad}'; nothing was replaced")
        return
    verify_written(ckpt, written, ckpt.key if base == () else None)  # the same container: the same key


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


def write_checkpoint(ckpt: Checkpoint, output: Output, drop_extra: bool = False, narrow: bool = False) -> None:
    """Write a loaded ``ckpt`` as ``output`` says: a file (atomically) or standard output."""

    def write(path: str) -> None:
        _write_to(ckpt, output.format, path, drop_extra, narrow)
        verify_file(ckpt, output.format, path, narrow, drop_extra)

    emit(output, write)


def write_streamed(storage_file: Any, listing: Checkpoint, plan: Any, output: Output) -> None:
    """Write a same-format copy of the input in which only the storages the plan touches are rewritten,
    one storage in memory at a time; a storage the plan overwrites whole is never read."""
    import torch

    infos = {i.name: i for i in listing.infos()}
    by_key: dict[Any, list] = {}
    for action in plan.actions:
        by_key.setdefault(infos[action.name].storage, []).append(action)

    def produce(key: Any) -> Any:
        actions = by_key[key]
        first = actions[0]
        if first.overwrites and storage_file.covers(infos[first.name]):
            storage = storage_file.empty_storage(key)
        else:
            storage = storage_file.read_storage(key)
        with torch.no_grad():
            for action in actions:
                action.apply(storage_file.view(storage, infos[action.name]))
        return storage

    def write(path: str) -> None:
        storage_file.patch(path, list(by_key), produce)
        verify_file(listing, output.format, path)

    emit(output, write)


def write_plan(src: Source, listing: Checkpoint, plan: Any, output: Output, drop_extra: bool = False) -> None:
    """Carry out ``plan`` and write the result: streamed when input and output are the same byte-range
    format and the plan keeps the structure, else through a full load."""
    from .plan import apply
    from .sources import load
    from .formats.storage import open_storage_file

    if output.layout.split:
        _write_sharded(src, listing, plan, output)
        return
    if output.layout.placeholder_values:  # DCP
        ckpt = load(src, listing.key)
        apply(plan, ckpt)
        write_dcp(ckpt, output, plan.narrow)
        return
    same_format = src.layout is not None and src.layout.can_patch(output.layout)
    narrow = plan.narrow and listing.key is not None
    whole = not narrow and not (drop_extra and output.layout.holds_non_tensors)  # else the container is cut down
    if src.kind == "file" and same_format and listing.byte_ranges and not plan.untie and whole:
        storage_file = open_storage_file(listing)
        try:
            write_streamed(storage_file, listing, plan, output)
        finally:
            storage_file.close()
        return
    if not plan.actions and not plan.untie and src.layout is not None:  # a conversion: streamed
        from .convert_stream import convert_streamed

        if convert_streamed(src, listing, output, drop_extra, non_tensor_entries,
                            lambda c: _pt_root(c, narrow, drop_extra)[0],
                            lambda path: verify_file(listing, output.format, path, narrow, drop_extra), emit):
            return
    ckpt = listing if listing.layout.in_memory else load(src, listing.key)
    apply(plan, ckpt)
    write_checkpoint(ckpt, output, drop_extra, narrow)


def _write_sharded(src: Source, listing: Any, plan: Any, output: Output) -> None:
    """Each shard the plan touches is rewritten (streamed, in its own format), two at a time; the others are
    kept (in place) or copied, and the index goes along. Either way the new files become the checkpoint in
    one atomic step: the index (in place), or the whole directory (``-o DIR``)."""
    from concurrent.futures import ThreadPoolExecutor

    from .formats.sharded import write_index
    from .sources import sniff_file

    if output.in_place and shard_commit.recover(listing.index.directory):
        from .sources import open_listing

        listing = open_listing(src, listing.key)  # the shards have their own names back: list them again
    index = listing.index
    shard_of = {n: p[0] for n, p in listing.names.items()}
    started: list[str] = []  # in place: the new shards' temporary names, as each write begins

    def one(shard: str, work: str) -> str | None:
        """Write ``shard`` into ``work``; in place, under a temporary name, which is returned."""
        sub = plan.within({n for n, s in shard_of.items() if s == shard})
        path = os.path.join(index.directory, shard)
        if sub.actions or sub.untie:
            def write(target: str, fmt: str) -> None:
                shard_src = Source(path, "file", path, sniff_file(path))
                write_plan(shard_src, listing.parts[shard], sub, Output(target, fmt, output.in_place,
                                                                         temporary=output.in_place))

            target = write_shard(index, shard, work, output.in_place, started, write)
            return target if output.in_place else None
        if not output.in_place:
            os.makedirs(os.path.dirname(os.path.join(work, shard)), exist_ok=True)
            copy_file(path, os.path.join(work, shard))
        return None

    def build(work: str) -> dict[str, str]:
        import torch  # noqa: F401 - imported once here: two threads importing it at once can see it half-made

        with ThreadPoolExecutor(max_workers=fsops.shard_workers()) as pool:  # shards are independent
            jobs = {shard: pool.submit(one, shard, work) for shard in listing.parts}
            written = {shard: job.result() for shard, job in jobs.items()}
        if work != index.directory:
            write_index(index, work)
            copy_shard_sidecars(src, listing, work)
        return {shard: tmp for shard, tmp in written.items() if tmp is not None}

    if output.in_place:
        commit_in_place(index, build, started)
    else:
        commit_directory(output.path, build)


def copy_file(path: str, target: str) -> None:
    """Copy the file ``path`` (a local file, or a remote object: ``blob.copy_to``) to the local ``target``."""
    from .blob import copy_to, is_remote

    if is_remote(path):
        from .remote import kept

        if not kept(path, target):  # (a shard an in-place rewrite of its bucket prefix keeps is not downloaded)
            copy_to(path, target)
    else:
        shutil.copyfile(path, target)


def write_shard(index: Any, shard: str, work: str, in_place: bool, started: list[str],
                write: Callable[[str, str], Any]) -> str:
    """Rewrite one shard of a sharded checkpoint with ``write(target, fmt)`` (in the shard's own format) and
    return the target: ``work/shard`` for a new directory, or, in place, a temporary name beside the shard
    (registered, and listed in ``started`` for cleanup) that ``shard_commit`` makes the shard. Errors name
    the shard, not its temporary."""
    path, target = os.path.join(index.directory, shard), os.path.join(work, shard)
    if in_place:
        target = fsops.temp_name(os.path.dirname(path), os.path.basename(shard))
        fsops.register(target)
        started.append(target)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        fmt = formats.sniff_file(path)
        write(target, (fmt if fmt.single_file else formats.PT).name)
    except ParamtoolError as e:
        raise ParamtoolError(str(e).replace(target, path)) from None
    if in_place and os.path.exists(target):
        fsops.copy_owner_and_mode(target, os.stat(path))
    return target


def copy_shard_sidecars(src: Source, listing: Any, work: str, replaced: dict[str, bytes] | None = None) -> None:
    """A sharded model directory written to a new directory: config.json, tokenizer files, ... go along
    (``replaced``: sidecars written with new contents, e.g. a config.json whose vocab_size changed)."""
    if src.directory:
        from .formats.modeldir import copy_sidecars, weight_files

        shards = [os.path.join(listing.index.directory, s) for s in listing.parts]
        copy_sidecars(src.directory, weight_files(src.directory, shards), work, replaced)


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


def write_dcp(ckpt: Checkpoint, output: Output, narrow: bool = False) -> None:
    """Write ``ckpt`` as a ``torch.distributed.checkpoint`` directory at ``output``, atomically."""
    from .formats import dcp

    root, base = _pt_root(ckpt, narrow, False)  # the whole container, or (convert --key) the sub-tree
    if not isinstance(root, Mapping):
        raise ParamtoolError(f"--key {ckpt.key} is a {type(root).__name__}; a DCP checkpoint holds a mapping")

    def build(work: str) -> None:
        dcp.save(root, work)
        _verify_at(ckpt, Source(work, "dcp", work), base)
        if output.in_place:
            _carry_over(output.path, work)

    commit_directory(output.path, build)


def _carry_over(old: str, new: str) -> None:
    """Whatever else the old DCP directory held (a config, notes) comes along into the new one, as hard links
    (no copy); the old ``.metadata`` and ``*.distcp`` files are what the new ones replace."""
    for name in os.listdir(old):
        src, dst = os.path.join(old, name), os.path.join(new, name)
        if name == ".metadata" or name.endswith(".distcp") or fsops.is_temp(name) or os.path.lexists(dst):
            continue
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _link_or_copy(src: str, dst: str) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)

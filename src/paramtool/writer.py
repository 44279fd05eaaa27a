"""Writing checkpoints: where the output goes and in which format (``plan_output``), what a file of each
format holds, the read-back check, and two of the executor's strategies: a loaded checkpoint written whole
(``write_checkpoint``, ``write_dcp``) and a patched copy of a file (``write_patched``).

Every write is committed atomically by ``commit``: a temporary beside the target, read back and checked,
flushed, then renamed over the target.
"""
from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from typing import Any

from . import formats, fsops, tree
from .checkpoint import Checkpoint
from .commit import Output, commit_directory, emit
from .errors import ParamtoolError, UsageError
from .records import dataclass
from .sources import Source

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from .plan import Plan


def plan_output(src: Source, out: str | None, in_place: bool, fmt: str | None,
                max_shard_size: str | None = None, convert: bool = False) -> Output:
    """Apply the contract's OUTPUT rules: ``-o``, ``--in-place``, or stdout when it is not a terminal.

    An edit of a TorchScript archive writes the archive again where a torch file is asked for
    (``Format.written_as``); ``convert`` writes its state dict."""
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
    is_input_file = src.is_file and src.text != "-"
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
    if src.layout is not None:
        chosen = src.layout.written_as(chosen, asked=convert or bool(fmt))  # (an edited archive stays an archive)
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


def pt_root(ckpt: Checkpoint, narrow: bool, drop_extra: bool) -> tuple[Any, tree.Path | None]:
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


def refuse_non_tensors(ckpt: Checkpoint, drop_extra: bool) -> None:
    """A checkpoint with non-tensor entries goes into safetensors only with ``--drop-extra``."""
    dropped = non_tensor_entries(ckpt)
    if dropped and not drop_extra:
        # (the CLI escapes the whole error line before it reaches a terminal)
        shown = ", ".join(dropped[:6]) + (f" and {len(dropped) - 6} more" if len(dropped) > 6 else "")
        raise ParamtoolError(
            f"safetensors cannot hold non-tensor entries ({shown}); pass --drop-extra to write the tensors only"
        )


def _write_to(ckpt: Checkpoint, fmt: str, path: str, drop_extra: bool, narrow: bool = False) -> None:
    layout = formats.by_name(fmt)
    if not layout.holds_non_tensors:  # safetensors
        refuse_non_tensors(ckpt, drop_extra)
        layout.save(ckpt.tensors(), ckpt.metadata, path)
    else:
        layout.save(pt_root(ckpt, narrow, drop_extra)[0], None, path)


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
    base = pt_root(ckpt, narrow, drop_extra)[1] if formats.by_name(fmt).holds_non_tensors and ckpt.layout.holds_non_tensors else None
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


def write_checkpoint(ckpt: Checkpoint, output: Output, drop_extra: bool = False, narrow: bool = False) -> None:
    """Write a loaded ``ckpt`` as ``output`` says: a file (atomically) or standard output."""

    def write(path: str) -> None:
        _write_to(ckpt, output.format, path, drop_extra, narrow)
        verify_file(ckpt, output.format, path, narrow, drop_extra)

    emit(output, write)


def write_patched(storage_file: Any, listing: Checkpoint, plan: Plan, output: Output) -> None:
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

    # storages produced two at a time when no action draws from torch's global generator (whose draws
    # would then depend on the threads' timing)
    workers = 1 if any(a.global_rng for a in plan.actions) else min(2, os.cpu_count() or 1)

    def write(path: str) -> None:
        storage_file.patch(path, list(by_key), produce, workers)
        verify_file(listing, output.format, path)

    emit(output, write)


def write_dcp(ckpt: Checkpoint, output: Output, narrow: bool = False) -> None:
    """Write ``ckpt`` as a ``torch.distributed.checkpoint`` directory at ``output``, atomically."""
    from .formats import dcp

    root, base = pt_root(ckpt, narrow, False)  # the whole container, or (convert --key) the sub-tree
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

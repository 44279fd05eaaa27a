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
from dataclasses import dataclass
from typing import Any

from . import tree
from .checkpoint import Checkpoint
from .errors import ParamtoolError, UsageError
from .sources import Source

PT_EXTENSIONS = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".tar")


@dataclass(frozen=True)
class Output:
    path: str | None  # None: standard output
    format: str  # "pt" | "safetensors"
    in_place: bool = False

    @property
    def label(self) -> str:
        return self.path or "-"


def plan_output(src: Source, out: str | None, in_place: bool, fmt: str | None) -> Output:
    """Apply the contract's OUTPUT rules: ``-o``, ``--in-place``, or stdout when it is not a terminal."""
    if fmt is not None and fmt not in ("pt", "safetensors"):
        raise UsageError(f"--format must be pt or safetensors, not '{fmt}'")
    if src.kind in ("sharded", "dcp"):
        return _plan_directory_output(src, out, in_place, fmt)
    is_input_file = src.kind == "file" and src.text != "-"
    if out == "-":
        out = None
        if in_place:
            raise UsageError("-o - (stdout) and --in-place contradict each other")
    elif out is not None and is_input_file and os.path.exists(out) and os.path.samefile(out, src.path):
        in_place = True  # -o naming the input counts as --in-place
    elif out is not None and in_place:
        raise UsageError("give either -o PATH or --in-place, not both")
    if in_place:
        if not is_input_file:
            raise UsageError(f"--in-place needs a checkpoint file as SOURCE, not '{src.text}'")
        out = src.path
    if out is None and not in_place and sys.stdout.isatty():
        raise UsageError("refusing to write a checkpoint to a terminal: use -o PATH, --in-place, or a pipe")
    default = "safetensors" if src.format == "safetensors" else "pt"
    return Output(out, fmt or _format_of(out, default), in_place)


def _format_of(path: str | None, default: str) -> str:
    """The output format a path's extension names (``.safetensors``, ``.pt .pth .bin .ckpt ...``), else ``default``."""
    if path is not None and path.endswith(".safetensors"):
        return "safetensors"
    if path is not None and path.lower().endswith(PT_EXTENSIONS):
        return "pt"
    return default


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
    if fmt is None and (os.path.isdir(out) or not os.path.splitext(out)[1]):
        if os.path.isdir(out) and os.listdir(out):
            raise UsageError(f"{out} is a directory that is not empty: choose a new one, or use --in-place")
        return Output(out, src.kind)
    return Output(out, fmt or _format_of(out, "pt"))


def _non_tensor_entries(ckpt: Checkpoint) -> list[str]:
    """What a safetensors file cannot hold: non-tensor entries and tensors outside the listed names."""
    if tree.is_module(ckpt.root):
        return []
    listed = set(ckpt.names.values())
    extra = [".".join(str(p) for p in path) for path, _ in tree.walk(ckpt.root) if path not in listed]

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

    return list(plain(ckpt.root)) + extra


def _write_to(ckpt: Checkpoint, fmt: str, path: str, drop_extra: bool) -> None:
    if fmt == "safetensors":
        from .formats import safetensors_fmt

        dropped = _non_tensor_entries(ckpt)
        if dropped and not drop_extra:
            # (the CLI escapes the whole error line before it reaches a terminal)
            shown = ", ".join(dropped[:6]) + (f" and {len(dropped) - 6} more" if len(dropped) > 6 else "")
            raise ParamtoolError(
                f"safetensors cannot hold non-tensor entries ({shown}); pass --drop-extra to write the tensors only"
            )
        safetensors_fmt.save(ckpt.tensors(), ckpt.metadata, path)
    else:
        from .formats import pt

        root = ckpt.root
        if ckpt.format == "module" and tree.is_module(root):  # an nn: or factory model: its state dict
            root = root.state_dict()
        elif ckpt.format in ("sharded", "dcp"):  # merged into one flat state dict
            root = ckpt.tensors()
        pt.save(root, path)


def _verify(ckpt: Checkpoint, written: Source, key: str | None) -> None:
    """Read what was written back (its table of contents): every name must be there, same shape and dtype."""
    from .sources import open_listing

    got = {i.name: (i.shape, i.dtype) for i in open_listing(written, key).infos()}
    bad = next((i.name for i in ckpt.infos() if got.get(i.name) != (i.shape, i.dtype)), None)
    if bad is not None:
        raise ParamtoolError(f"verification of the written checkpoint failed at '{bad}'; nothing was replaced")


def _verify_file(ckpt: Checkpoint, fmt: str, path: str) -> None:
    from .sources import sniff_file

    key = ckpt.key if fmt == "pt" and ckpt.format in ("pt", "pt-legacy") else None  # same container, same key
    _verify(ckpt, Source(path, "file", path, sniff_file(path)), key)


def atomic_write(target: str, write: Callable[[str], None]) -> None:
    """Write via ``write(tmp_path)`` to a temporary file beside ``target``, then rename it over ``target``.

    Keeps an existing target's permission bits. On any failure the temporary file is removed.
    """
    target_dir = os.path.dirname(os.path.abspath(target))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".paramtool-tmp", dir=target_dir)
    except OSError as e:
        raise ParamtoolError(f"cannot write to {target_dir}: {e.strerror or e}") from None
    os.close(fd)
    try:
        write(tmp)
        if os.path.exists(target):
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise ParamtoolError(f"cannot write {target}: {e.strerror or e}") from None
        raise
    try:
        dfd = os.open(target_dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def emit(output: Output, write: Callable[[str], None]) -> None:
    """Run ``write(path)`` for ``output``: atomically onto a file, or through a temporary file to stdout."""
    if output.path is not None:
        atomic_write(output.path, write)
        return
    fd, tmp = tempfile.mkstemp(prefix="paramtool-out-")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            shutil.copyfileobj(f, sys.stdout.buffer, 1 << 20)
        sys.stdout.buffer.flush()
    except OSError as e:
        if isinstance(e, BrokenPipeError):
            raise
        raise ParamtoolError(f"cannot write the checkpoint: {e.strerror or e}") from None
    finally:
        os.unlink(tmp)


def write_checkpoint(ckpt: Checkpoint, output: Output, drop_extra: bool = False) -> None:
    """Write a loaded ``ckpt`` as ``output`` says: a file (atomically) or standard output."""

    def write(path: str) -> None:
        _write_to(ckpt, output.format, path, drop_extra)
        _verify_file(ckpt, output.format, path)

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
        _verify_file(listing, output.format, path)

    emit(output, write)


def write_plan(src: Source, listing: Checkpoint, plan: Any, output: Output, drop_extra: bool = False) -> None:
    """Carry out ``plan`` and write the result: streamed when input and output are the same byte-range
    format and the plan keeps the structure, else through a full load."""
    from . import ops
    from .sources import load
    from .stream import open_storage_file

    if output.format == "sharded":
        _write_sharded(src, listing, plan, output)
        return
    if output.format == "dcp":
        ckpt = load(src, listing.key)
        ops.execute(plan, ckpt)
        _write_dcp(ckpt, output)
        return
    same_format = src.format == output.format and src.format in ("pt", "safetensors")
    if src.kind == "file" and same_format and not plan.untie:
        storage_file = open_storage_file(listing)
        try:
            write_streamed(storage_file, listing, plan, output)
        finally:
            storage_file.close()
        return
    if not plan.actions and not plan.untie and src.kind in ("file", "sharded", "dcp"):  # a conversion: streamed
        from .convert_stream import convert_streamed

        if convert_streamed(src, listing, output, drop_extra, _non_tensor_entries,
                            lambda path: _verify_file(listing, output.format, path), emit):
            return
    ckpt = listing if listing.format == "module" else load(src, listing.key)
    ops.execute(plan, ckpt)
    write_checkpoint(ckpt, output, drop_extra)


def _write_sharded(src: Source, listing: Any, plan: Any, output: Output) -> None:
    """Each shard the plan touches is rewritten (streamed, in its own format), two at a time; the others are
    kept (in place) or copied, and the index goes along. A new directory appears only once complete."""
    from concurrent.futures import ThreadPoolExecutor

    from .formats.sharded import write_index
    from .ops import Plan
    from .sources import sniff_file

    index = listing.index
    shard_of = {n: p[0] for n, p in listing.names.items()}

    def one(shard: str, work: str) -> None:
        sub = Plan(plan.report, [a for a in plan.actions if shard_of[a.name] == shard],
                   [n for n in plan.untie if shard_of[n] == shard])
        path, target = os.path.join(index.directory, shard), os.path.join(work, shard)
        if sub.actions or sub.untie:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shard_src = Source(path, "file", path, sniff_file(path))
            fmt = "safetensors" if shard_src.format == "safetensors" else "pt"
            write_plan(shard_src, listing.parts[shard], sub, Output(target, fmt, output.in_place))
        elif not output.in_place:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(path, target)

    def build(work: str) -> None:
        with ThreadPoolExecutor(max_workers=2) as pool:  # shards are independent
            for done in [pool.submit(one, shard, work) for shard in listing.parts]:
                done.result()
        if work != index.directory:
            write_index(index, work)

    if output.in_place:
        build(index.directory)
    else:
        _replace_directory(output.path, build)


def _replace_directory(final: str, build: Callable[[str], None]) -> None:
    """Build a directory beside ``final`` and swap it in: ``final`` is never half-written."""
    final = os.path.abspath(final)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.", dir=os.path.dirname(final))
    old = None
    try:
        build(work)
        if os.path.isdir(final) and os.listdir(final):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old.", dir=os.path.dirname(final))
            os.rmdir(old)
            os.rename(final, old)
        elif os.path.isdir(final):
            os.rmdir(final)
        os.rename(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if old and not os.path.exists(final):
            os.rename(old, final)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _write_dcp(ckpt: Checkpoint, output: Output) -> None:
    from .formats import dcp

    def build(work: str) -> None:
        dcp.save(ckpt.root, work)
        _verify(ckpt, Source(work, "dcp", work), ckpt.key)

    _replace_directory(output.path, build)

"""Resolve a SOURCE string and read it: a table of contents without torch, or loaded tensors.

Order (the contract's): ``-``/stdin, ``nn:EXPR``, ``FILE.py:FUNC``/``module:FUNC``, a directory or
``*.index.json``, ``*.safetensors``, any other file sniffed from its bytes.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any

from . import tree
from .checkpoint import Checkpoint
from .errors import FormatError, ParamtoolError, UsageError
from . import formats
from .formats import Format
from .records import dataclass, fields, replace
from .toc import TensorInfo, Toc


@dataclass(frozen=True)
class Source:
    text: str  # as the user wrote it
    kind: str  # "file" | "nn" | "factory" | "sharded" | "dcp"
    path: str | None = None  # the file to read (stdin is spooled to a temporary file)
    format: str | None = None  # sniffed file format: "pt" | "pt-legacy" | "torchscript" | "safetensors"
    directory: str | None = None  # the model directory the weights sit in (beside config.json, tokenizer files)

    @property
    def label(self) -> str:
        return "-" if self.text == "-" else self.text

    @property
    def is_file(self) -> bool:
        """One file read as the format it is in (a path, stdin, a remote object, a model directory's weights
        file): not a container of part files, not a model built in Python."""
        return self.kind == "file"

    @property
    def layout(self) -> Format | None:
        """The on-disk format read (a file's sniffed format, or the container: sharded, DCP); None for a
        model built in Python."""
        return formats.find(self.format or self.kind)


def stdin_is_terminal() -> bool:
    """Is standard input a terminal? A closed one (``<&-``) is not: it reads as empty."""
    return sys.stdin is not None and sys.stdin.isatty()


def _spool_stdin() -> str:
    """Copy standard input to a temporary file (removed at exit, on an interrupt or a closed pipe; left by a
    kill, it is removed by the next paramtool run that uses $TMPDIR) so it can be sniffed and memory-mapped."""
    import atexit
    import shutil
    import tempfile

    from . import fsops

    directory = tempfile.gettempdir()
    fsops.clean_stale(directory)
    path = fsops.temp_name(directory, "stdin")
    fsops.create_file(path, 0o600)
    atexit.register(fsops.discard, path)
    with open(path, "wb") as out:
        if sys.stdin is not None:  # (closed: nothing to copy)
            shutil.copyfileobj(sys.stdin.buffer, out, 1 << 20)
    return path


def sniff_file(path: str) -> str:
    """The contract's format string for a file, from its first bytes (``formats.sniff_file``)."""
    return formats.sniff_file(path).name


def resolve(text: str | None) -> Source:
    """Decide what SOURCE names. ``None`` means stdin, allowed only when stdin is not a terminal."""
    if text is None or text == "-":
        if text is None and stdin_is_terminal():
            raise UsageError("missing SOURCE (give a file, '-', nn:EXPR or FILE.py:FUNC)")
        path = _spool_stdin()
        if os.path.getsize(path) == 0:
            raise FormatError("standard input is empty" if sys.stdin is not None else "standard input is closed")
        return Source("-", "file", path, sniff_file(path))
    if text.startswith("nn:"):
        return Source(text, "nn")
    from . import blob
    from .factory import is_factory_spec

    remote = blob.is_remote(text)  # read where it lives, by byte range (``blob``, ``remote``)
    if not remote and is_factory_spec(text):
        return Source(text, "factory")
    is_dir = blob.isdir(text)
    if remote:  # the index (or .metadata) and config.json, which resolving and listing read next: at once
        if is_dir:
            blob.prefetch([os.path.join(text, n) for n in blob.listdir(text)
                           if n.endswith(".index.json") or n in (".metadata", "config.json")])
        elif text.endswith(".index.json"):
            blob.prefetch([text, os.path.join(os.path.dirname(text), "config.json")])
    if is_dir or text.endswith(".index.json"):
        from .formats.dcp import resolve_inside

        if is_dir and blob.exists(os.path.join(text, ".metadata")):
            if not remote:  # (links that leave the directory are refused: issue 22)
                resolve_inside(text, ".metadata", "torch.distributed .metadata", file_link_ok=True)
            return Source(text, "dcp", text)
        from .formats.modeldir import find_weights
        from .formats.sharded import has_index

        if is_dir and not has_index(text):  # a model directory with one weights file
            weights = find_weights(text)
            if not remote:
                weights = resolve_inside(text, os.path.basename(weights), "weights file", file_link_ok=True)
            return Source(text, "file", weights, sniff_file(weights), directory=text)
        directory = text if is_dir else os.path.dirname(text) or "."
        if not is_dir and not blob.isfile(os.path.join(directory, "config.json")):
            directory = None  # an index in some directory that is not a model's: no sidecars to carry
        return Source(text, "sharded", text, directory=directory)
    if remote:  # an object: found (or not) by its first ranged read
        return Source(text, "file", text, sniff_file(text))
    if not os.path.exists(text):
        raise ParamtoolError(f"{text}: no such file")
    if not os.path.isfile(text):
        raise ParamtoolError(f"{text}: not a regular file")
    try:
        return Source(text, "file", text, sniff_file(text))
    except PermissionError:
        raise ParamtoolError(f"{text}: permission denied") from None


def describe(src: Source, ckpt: Checkpoint) -> Toc:
    """``ckpt``'s table of contents; in a model directory, with the ties its config.json declares."""
    return _with_config(src, ckpt.toc()) if src.directory else ckpt.toc()


def tree_paths_of(src: Source, ckpt: Checkpoint) -> list[str]:
    """The module paths the inspect tree shows for ``ckpt``, which positions count (``select.tree_paths``): with
    the names config.json ties and a model's parameterless modules."""
    from .select import tree_paths

    toc = describe(src, ckpt)
    return tree_paths([t.name for t in toc.tensors], toc.modules)


def _with_config(src: Source, toc: Toc) -> Toc:
    from .formats import modeldir

    return modeldir.annotate(toc, src.directory, single_file=src.is_file)


class ShardedCheckpoint(Checkpoint):
    """One checkpoint made of shard files; each part is a checkpoint of its own, read the same way."""

    parts: dict[str, Checkpoint] = {}
    index: Any = None

    def tensor(self, name: str) -> Any:
        return self.parts[self.names[name][0]].tensor(name)

    def raw_bytes(self, name: str) -> Any:
        return self.parts[self.names[name][0]].raw_bytes(name)

    def raw_samples(self, name: str, spans: list[tuple[int, int]]) -> list[bytes] | None:
        return self.parts[self.names[name][0]].raw_samples(name, spans)

    def infos(self) -> list[TensorInfo]:
        out = {}
        for shard, part in self.parts.items():
            for info in part.infos():
                out[info.name] = replace(info, storage=(shard, info.storage), path=(shard,) + info.path)
        return [out[n] for n in self.names]

    def replace(self, name: str, value: Any) -> None:
        self.parts[self.names[name][0]].replace(name, value)


SHARDED_TRIES = 5  # reads of a sharded checkpoint that other writes keep committing to, before giving up


def _sharded(src: Source, open_part: Any) -> ShardedCheckpoint:
    """The index and every shard it names, as of one moment: a commit (``commit.commit_index``) replaces the index
    first and the shards after, so shards opened while the index stayed the same file belong to it. If the
    index was replaced meanwhile (or a shard it named is gone), everything is read again; after
    ``SHARDED_TRIES`` attempts it is one ``error:`` line. Every shard stays open, so what is read later is
    what was opened here."""
    from .formats import pins
    from .formats.sharded import find_index, read_index

    index_path = find_index(src.path)
    again = pins.pinned(index_path)  # read before in this command (listed, now loaded): it must be the same
    for _ in range(SHARDED_TRIES):
        try:
            index = read_index(index_path)
            parts = _open_parts(index, open_part)
        except (ParamtoolError, OSError):  # (a shard the index names is gone: a commit removed it)
            if again or pins.unchanged(index_path):
                raise
            parts = None
        if parts is not None and (again or pins.unchanged(index_path)):
            return _sharded_from(src, index, parts)  # (read again: verified at the commit)
        pins.forget(os.path.dirname(os.path.abspath(index_path)))  # committed to while read: read again
    raise pins.InputChanged(f"{index_path}: the checkpoint changed while being read (other writes kept "
                            "committing to it); run the command again")


def _open_parts(index: Any, open_part: Any) -> dict[str, Checkpoint]:
    from .blob import prefetch

    prefetch([os.path.join(index.directory, shard) for shard in index.shards])  # remote shards: concurrently
    parts: dict[str, Checkpoint] = {}
    for shard in index.shards:
        path = os.path.join(index.directory, shard)
        parts[shard] = open_part(Source(path, "file", path, sniff_file(path)), None)
    return parts


def _sharded_from(src: Source, index: Any, parts: dict[str, Checkpoint]) -> ShardedCheckpoint:
    names: dict[str, tree.Path] = {}
    for name, shard in index.weight_map.items():
        if name not in parts[shard].names:
            raise FormatError(f"{index.path}: '{name}' is mapped to shard '{shard}', which does not hold it")
        names[name] = (shard,) + tuple(parts[shard].names[name])
    meta_ties = {n: t for p in parts.values() for n, t in p.meta_ties.items()}
    part_globals = [p.globals for p in parts.values() if p.globals is not None]
    metadata = {k: v for p in parts.values() for k, v in (p.metadata or {}).items()}  # the shards' own
    ckpt = ShardedCheckpoint(src.label, formats.SHARDED, {s: p.root for s, p in parts.items()}, names,
                             metadata or None, meta_ties, src.path)
    ckpt.parts, ckpt.index = parts, index
    ckpt.globals = sorted(set().union(*part_globals)) if part_globals else None
    return ckpt


def open_listing(src: Source, key: str | None = None) -> Checkpoint:
    """A file's checkpoint with stand-in tensors: names, shapes, storages and the container, no tensor data.

    Reads headers and pickles only; imports no torch.
    """
    if src.layout.split:  # a container over part files, each read as the file it is
        return _sharded(src, open_listing)
    return src.layout.read_listing(src.label, src.path, key)


def read_toc(src: Source, key: str | None = None) -> Toc:
    """The table of contents. For files this reads headers/pickles only: no torch, no tensor bytes."""
    if src.directory:  # a model directory: with the ties its config.json declares
        return _with_config(src, read_toc(replace(src, directory=None), key))

    if src.layout is not None:
        return src.layout.toc_of(open_listing(src, key), key)  # (DCP: a non-tensor --key from its data files)
    return load(src, key).toc()


def load(src: Source, key: str | None = None) -> Checkpoint:
    """Load tensor data (memory-mapped where the format allows)."""
    from .blob import is_remote

    if src.layout is not None and is_remote(src.path):  # loaded whole: from a local copy
        src = local_copy(src)
    if src.layout is not None:
        return _sharded(src, load) if src.layout.split else src.layout.load(src.label, src.path, key)
    if src.kind == "nn":
        from .nnspec import build_module

        module = build_module(src.text[3:])
        return _from_object(src, module, key)
    if src.kind == "factory":
        from .factory import call_factory

        return _from_object(src, call_factory(src.text), key)


def local_copy(src: Source) -> Source:
    """A remote source copied into a temporary directory (removed at exit), for what reads a checkpoint whole
    (a full load): the file, the index and its shards, or the DCP directory, with config.json beside them."""
    import atexit
    import shutil
    import tempfile

    from . import blob

    work = tempfile.mkdtemp(prefix="paramtool-remote-")
    atexit.register(shutil.rmtree, work, True)

    def fetch(path: str) -> str:
        target = os.path.join(work, os.path.basename(path))
        blob.copy_to(path, target)
        return target

    directory = src.directory
    files, main = src.layout.files_of(src.path)  # (the file, an index and its shards, a DCP directory's files)
    if main is None:  # read from the directory
        for path in files:
            fetch(path)
        return replace(src, path=work)
    if directory and blob.isfile(os.path.join(directory, "config.json")):
        fetch(os.path.join(directory, "config.json"))
    local = {path: fetch(path) for path in files}
    return replace(src, path=local[main], directory=work if directory else None)


def _from_object(src: Source, obj: Any, key: str | None) -> Checkpoint:
    if tree.is_module(obj) or isinstance(obj, Mapping):
        return Checkpoint(src.label, formats.MODULE, obj, tree.assign_names(obj, key))
    raise ParamtoolError(f"{src.text}: returned {type(obj).__name__}, not an nn.Module or a state dict")


class StreamedCheckpoint(Checkpoint):
    """A file checkpoint whose tensors are mapped one storage at a time (copy-on-write), on request."""

    storage_file: Any = None

    def tensor(self, name: str) -> Any:
        return self.storage_file.mapped_tensor(name)  # mapped, copy-on-write: the file never changes

    def raw_bytes(self, name: str) -> Any:
        return self.storage_file.raw(name)

    def raw_samples(self, name: str, spans: list[tuple[int, int]]) -> list[bytes] | None:
        got = self.storage_file.samples(name, spans)
        return got if got is not None else super().raw_samples(name, spans)


def load_lazy(src: Source, key: str | None = None) -> Checkpoint:
    """For reading values (show, stats, diff): streamed where the format has byte ranges or (DCP) entries
    read one at a time, else loaded."""
    if src.layout is not None and src.layout.split:
        return _sharded(src, load_lazy)
    lazy = src.layout.load_lazy(src.label, src.path, key) if src.layout is not None else None
    if lazy is not None:  # DCP, GGUF: one tensor entry at a time
        return lazy
    if src.is_file and src.layout.byte_ranges:
        from .formats.storage import open_storage_file

        listing = open_listing(src, key)
        if not listing.byte_ranges:
            return load(src, key)
        ckpt = StreamedCheckpoint(**{f: getattr(listing, f) for f in fields(listing)})
        ckpt.storage_file = open_storage_file(listing)
        return ckpt
    return load(src, key)


def open_for_plan(src: Source, key: str | None = None) -> Checkpoint:
    """What an edit is planned on: the stand-in listing for files (no data), the built model otherwise."""
    return open_listing(src, key) if src.layout is not None else load(src, key)


def values_of(src: Source, listing: Checkpoint, key: str | None = None) -> Checkpoint:
    """What to read a planned-on source's values from: the listing itself where it holds them (a model built in
    Python: building it again would draw other random values), else the lazy checkpoint (``load_lazy``)."""
    return listing if listing.layout.in_memory else load_lazy(src, key)

"""The one format interface: what paramtool asks of an on-disk format, instead of comparing format strings.

A ``Format`` is a descriptor: its ``name`` is the contract's JSON ``"format"`` string, its attributes say what
the format can do (hold non-tensor entries, give storages by byte range, be patched in place, hold parts), and
its methods do the format's own work, importing the reading module only when called, so that the listing path
stays free of torch. Modules outside ``formats/`` ask the object; adding a format is one module plus one line
in the registry (``formats/__init__.py``).
"""
from __future__ import annotations

from ..records import dataclass

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)

if TYPE_CHECKING:
    from typing import Any
    from ..checkpoint import Checkpoint
    from typing import BinaryIO, Callable

    from .dcp import Entries
    from .gguf import Pairing
    from .storage import StorageFile
    from .torchfile import TorchFile


@dataclass(frozen=True)
class Format:
    name: str  # the contract's JSON "format" string
    extensions: tuple[str, ...] = ()  # output paths ending so are written in this format (lower case)
    single_file: bool = False  # one file that -o/--format may name (a --format value)
    byte_ranges: bool = False  # storages located by byte range: streamed reads, patched copies
    holds_non_tensors: bool = False  # a container that may hold more than tensors (a training checkpoint)
    flat: bool = False  # one flat name -> tensor mapping: no nesting, so no --key
    pickled: bool = False  # a torch pickle, which may hold a whole nn.Module
    is_container: bool = False  # a directory of parts (shards, DCP data files, a model directory)
    split: bool = False  # one flat state dict split over part files by an index (shards)
    placeholder_values: bool = False  # non-tensor values are stand-ins in the listing, kept in the data files
    sidecars: bool = False  # weights beside config.json and tokenizer files (a model directory)
    in_memory: bool = False  # built in Python (nn:, a factory), never read from disk
    values_only: bool = False  # written only as a copy with tensor values changed in place (an archive's code reads it)
    dequantized: bool = False  # stored quantized: each tensor read as floats when asked for (GGUF), never written

    def sniff(self, head: bytes, size: int) -> bool:
        """Do the first bytes of a file (``head``, of a file of ``size`` bytes) say it is in this format?"""
        return False

    def sniff_path(self, path: str, head: bytes, size: int) -> bool:
        """Is the file at ``path`` in this format? Its first bytes (``sniff``) unless the format must look
        further (a TorchScript archive is a torch zip with a ``constants.pkl`` record)."""
        return self.sniff(head, size)

    def names_path(self, path: str) -> bool:
        """Does an output path's extension name this format?"""
        return bool(self.extensions) and path.lower().endswith(self.extensions)

    def can_patch(self, other: Format) -> bool:
        """Can a file in this format be written as ``other`` by copying its bytes and patching storages?"""
        return self.byte_ranges and other is self

    def reads_by_range(self, listing: Checkpoint) -> bool:
        """Are the storages of ``listing`` (read in this format) byte ranges of its file, read and patched in
        place?"""
        return self.byte_ranges

    def open_storages(self, listing: Checkpoint) -> StorageFile | Entries | None:
        """A reader of this file's storages by byte range (``formats.storage``: streamed reads, patched copies),
        made from the validated listing, which says where each storage is; None for formats without byte
        ranges (they are loaded whole)."""
        return None

    def read_listing(self, label: str, path: str, key: str | None) -> Checkpoint:
        """The checkpoint with stand-in tensors: names, shapes, storages, the container; no tensor data, no
        torch. (A container of part files, sharded, is read part by part by ``sources``.)"""
        raise NotImplementedError(f"{self.name} has no reader of its own")

    def load(self, label: str, path: str, key: str | None) -> Checkpoint:
        """The checkpoint with its tensor data (memory-mapped where the format allows)."""
        raise NotImplementedError(f"{self.name} has no reader of its own")

    def pairing(self, ckpt: Checkpoint, names: list[str]) -> Pairing | None:
        """How the tensors of ``ckpt`` (read in this format) pair with the tensors ``names`` of a checkpoint it
        was made from, where the format stores them otherwise (GGUF: renamed, reordered, quantized:
        ``gguf.Pairing``); None where tensors pair by name, as stored."""
        return None

    def save(self, root: Any, metadata: dict[str, str] | None, path: str) -> None:
        """Write ``root`` (a flat state dict where not ``holds_non_tensors``) to ``path`` as one file. The
        writer decides what goes in, and makes the write atomic (``writer.py``)."""
        raise NotImplementedError(f"{self.name} is not written as one file")


class SafetensorsFormat(Format):
    def open_storages(self, listing: Checkpoint) -> StorageFile:
        from .remote_storage import storage_class
        from .storage import SafetensorsStorageFile

        return storage_class(SafetensorsStorageFile, listing.path).open(listing.path, listing.toc())

    def names_path(self, path: str) -> bool:
        return path.endswith(self.extensions)  # as written, ".safetensors"

    def sniff(self, head: bytes, size: int) -> bool:
        from .safetensors_fmt import sniff

        return sniff(head, size)

    def read_listing(self, label: str, path: str, key: str | None) -> Checkpoint:
        from ..checkpoint import Checkpoint
        from .safetensors_fmt import read_tree

        _flat_only(key)
        root, metadata, meta_ties = read_tree(path)
        return Checkpoint(label, self, root, {n: (n,) for n in root}, metadata, meta_ties, path)

    def load(self, label: str, path: str, key: str | None) -> Checkpoint:
        from ..checkpoint import Checkpoint
        from .safetensors_fmt import load

        _flat_only(key)
        tensors, metadata, meta_ties = load(path)
        return Checkpoint(label, self, tensors, {n: (n,) for n in tensors}, metadata, meta_ties, path)

    def save(self, root: Any, metadata: dict[str, str] | None, path: str) -> None:
        from .safetensors_fmt import save

        save(root, metadata, path)



def _flat_only(key: str | None, what: str = "a safetensors file") -> None:
    from ..errors import UsageError

    if key:
        raise UsageError(f"--key applies to torch.save files; {what} is one flat state dict")


class TorchFormat(Format):
    def reads_by_range(self, listing: Checkpoint) -> bool:
        """As its format says, unless a zip storage record is compressed (torch never writes one, but reads it:
        then it is loaded whole), or a tensor is more than a view of its bytes (``whole``: torch rebuilds it, as
        ``torch.load`` does)."""
        return self.byte_ranges and not listing.whole \
            and not any(offset is None for offset, _ in (listing.located or {}).values())

    def open_storages(self, listing: Checkpoint) -> StorageFile | None:
        if not self.byte_ranges:  # the legacy format: storages follow the pickle, read with it
            return None
        from .remote_storage import storage_class
        from .storage import ZipStorageFile

        return storage_class(ZipStorageFile, listing.path).open(listing.path, listing.toc(), listing.root, listing.located)

    def sniff(self, head: bytes, size: int) -> bool:
        from .torchfile import sniff_torch

        return sniff_torch(head) == self.name

    def read_listing(self, label: str, path: str, key: str | None) -> Checkpoint:
        listing, ckpt = self._read(label, path, key, None)
        ckpt.located = {k: (listing.data_offset.get(k), listing.records.get(k, "")) for k in listing.storages}
        ckpt.whole = listing.whole
        return ckpt

    def load(self, label: str, path: str, key: str | None) -> Checkpoint:
        from . import pt

        return self._read(label, path, key, pt.load)[1]

    def _read(self, label: str, path: str, key: str | None,
              load: Callable[[str, TorchFile], Any] | None) -> tuple[TorchFile, Checkpoint]:
        """The file read without running it (``TorchFile``: refuses a hostile pickle, locates every storage),
        and its checkpoint: stand-in tensors, or real ones from ``load(path, listing)``."""
        from ..checkpoint import named
        from .torchfile import read_torch

        listing = read_torch(path, self.name, _archive_listing)
        ckpt = named(label, self, listing.root if load is None else load(path, listing), path, key)
        ckpt.globals = sorted(listing.globals)
        return listing, ckpt

    def save(self, root: Any, metadata: dict[str, str] | None, path: str) -> None:
        """torch.save's zip format (``pt.save``); a pickle keeps no header metadata."""
        from . import pt

        pt.save(root, path)


def _archive_listing(path: str, fileobj: BinaryIO | None) -> TorchFile:
    """A TorchScript archive met where a torch zip was read: its state dict, as ``torch.load`` hands such a zip
    to ``torch.jit.load`` (``torchscript.read_archive``; imported only then)."""
    from .torchscript import read_archive

    return read_archive(path, fileobj)[0]


class TorchScriptFormat(TorchFormat):
    """A TorchScript archive (``torch.jit.save``): its state dict, read without running its code
    (``formats.torchscript``); written only as a copy with new values in its storages."""

    def sniff(self, head: bytes, size: int) -> bool:
        return False  # a zip like any torch file: the records decide (sniff_path)

    def sniff_path(self, path: str, head: bytes, size: int) -> bool:
        from .torchscript import is_archive

        return head.startswith(b"PK\x03\x04") and is_archive(path)

    def open_storages(self, listing: Checkpoint) -> StorageFile:
        from .storage import ArchiveStorageFile

        return ArchiveStorageFile.open(listing.path, listing.toc(), listing.root, listing.located)

    def _read(self, label: str, path: str, key: str | None,
              load: Callable[[str, TorchFile], Any] | None) -> tuple[TorchFile, Checkpoint]:
        from ..checkpoint import named
        from .torchscript import ScriptCheckpoint, read_archive

        listing, modules = read_archive(path)
        ckpt = named(label, self, listing.root if load is None else load(path, listing), path, key, ScriptCheckpoint)
        ckpt.globals, ckpt.modules = sorted(listing.globals), modules
        return listing, ckpt

    def save(self, root: Any, metadata: dict[str, str] | None, path: str) -> None:
        from .torchscript import refuse_structural

        raise refuse_structural("this write")


class DcpFormat(Format):
    def open_storages(self, listing: Checkpoint) -> Entries:
        """Not byte ranges: each tensor entry read whole, one at a time (``dcp.Entries``)."""
        from .dcp import Entries

        return Entries(listing.path)

    def load_lazy(self, label: str, path: str, key: str | None) -> Checkpoint:
        """The checkpoint ``load`` gives, with each tensor entry read only when asked for."""
        from .dcp import load_lazy

        return load_lazy(label, path, key, self)

    def read_listing(self, label: str, path: str, key: str | None) -> Checkpoint:
        from ..checkpoint import named
        from . import dcp

        return named(label, self, dcp.read_tree(path), path, key)

    def load(self, label: str, path: str, key: str | None, within: Checkpoint | None = None) -> Checkpoint:
        """``within``: a listing of this checkpoint whose ``--key`` sub-tree alone is read."""
        from .. import tree
        from ..checkpoint import named
        from . import dcp

        root = dcp.load(path) if within is None else dcp.load(path, tree.find_key(within.root, key))
        return named(label, self, root, path, key)


class GgufFormat(Format):
    """llama.cpp's GGUF, read through the ``gguf`` package (``formats/gguf.py``); not written."""

    def sniff(self, head: bytes, size: int) -> bool:
        return head[:4] == b"GGUF"  # (here: every file is sniffed, and the reading module imports typing)

    def read_listing(self, label: str, path: str, key: str | None) -> Checkpoint:
        from .gguf import open_checkpoint

        _flat_only(key, "a GGUF file")
        return open_checkpoint(label, path, self)  # (lists only: tensors are read when asked for)

    def load(self, label: str, path: str, key: str | None) -> Checkpoint:
        from .gguf import load

        _flat_only(key, "a GGUF file")
        return load(label, path, self)

    def pairing(self, ckpt: Checkpoint, names: list[str]) -> Pairing:
        from .gguf import pairing

        return pairing(ckpt, names)

    def load_lazy(self, label: str, path: str, key: str | None) -> Checkpoint:
        """Each tensor read and dequantized only when asked for."""
        from .gguf import open_checkpoint

        _flat_only(key, "a GGUF file")
        return open_checkpoint(label, path, self)

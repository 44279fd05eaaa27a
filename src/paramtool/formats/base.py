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
    from typing import Any, Callable, Protocol

    from ..plan import Plan
    from ..toc import Toc

    from ..checkpoint import Checkpoint
    from .storage import StorageFile

    class Pairing(Protocol):
        """How a format's stored tensors pair with those of the checkpoint they were made from (``gguf.Pairing``
        is one): the checkpoint's name -> the stored name, the stored name -> its quantization, and a
        checkpoint tensor arranged as the format stores it."""

        pairs: dict[str, str]
        quantization: dict[str, str]

        def arranged(self, name: str, tensor: Any) -> Any: ...


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

    def open_storages(self, listing: Checkpoint) -> StorageFile | None:
        """A reader of this file's storages by byte range (``formats.storage``: streamed reads, patched copies),
        made from the validated listing, which says where each storage is; None for formats without byte
        ranges (they are loaded whole)."""
        return None

    def open_entries(self, listing: Checkpoint) -> Any:
        """A reader of this checkpoint's storages one entry at a time, where the format reads them so rather than
        by byte range (DCP: tensor entries; GGUF: tensors dequantized): ``read_storage(key)`` (a 1-D tensor),
        ``nbytes(key)``, ``close()``, ``dtype`` (the storage's dtype as stored, by key, or None); None for
        other formats."""
        return None

    def streams_root(self, listing: Checkpoint, root: Any) -> bool:
        """Can ``root``, made from ``listing`` (its stand-ins), be written storage by storage, non-tensor entries
        as they are in it?"""
        return True

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

    def load_lazy(self, label: str, path: str, key: str | None) -> Checkpoint | None:
        """The checkpoint ``load`` gives, each tensor read only when asked for, where the format reads so on its
        own (DCP: one entry at a time; GGUF: dequantized one tensor at a time); None where values are read
        otherwise (by byte range, or loaded whole)."""
        return None

    def toc_of(self, listing: Checkpoint, key: str | None) -> Toc:
        """The table of contents of ``listing`` (read with ``--key``)."""
        return listing.toc()

    def files_of(self, path: str) -> tuple[list[str], str | None]:
        """The files a local copy of the checkpoint at ``path`` needs (a remote one, read whole), and the one it
        is read from (None: the directory that holds them)."""
        return [path], path

    def written_as(self, chosen: Format, asked: bool) -> Format:
        """The format an edit of a file in this format is written in, ``chosen`` by the output's name or the
        default (``asked``: by ``--format`` or ``convert``)."""
        return chosen

    def check_plan(self, plan: Plan) -> None:
        """Refuse a plan a file in this format cannot take (an archive takes only new values)."""

    def name_files_apart(self) -> Callable[[], None] | None:
        """Before a rewrite in place of a remote prefix: name the new part files apart from the old ones, and
        return what names them as usual again (None: the format's names need no care)."""
        return None

    def save(self, root: Any, metadata: dict[str, str] | None, path: str) -> None:
        """Write ``root`` (a flat state dict where not ``holds_non_tensors``) to ``path`` as one file. The
        writer decides what goes in, and makes the write atomic (``writer.py``)."""
        raise NotImplementedError(f"{self.name} is not written as one file")


def flat_only(key: str | None, what: str = "a safetensors file") -> None:
    """Refuse ``--key`` for a format that holds one flat state dict (``what``: the file, as the message names it)."""
    from ..errors import UsageError

    if key:
        raise UsageError(f"--key applies to torch.save files; {what} is one flat state dict")

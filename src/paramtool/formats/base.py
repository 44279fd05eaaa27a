"""The one format interface: what paramtool asks of an on-disk format, instead of comparing format strings.

A ``Format`` is a descriptor: its ``name`` is the contract's JSON ``"format"`` string, its attributes say what
the format can do (hold non-tensor entries, give storages by byte range, be patched in place, hold parts), and
its methods do the format's own work, importing the reading module only when called, so that the listing path
stays free of torch. Modules outside ``formats/`` ask the object; adding a format is one module plus one line
in the registry (``formats/__init__.py``).
"""
from __future__ import annotations

from dataclasses import dataclass


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

    def sniff(self, head: bytes, size: int) -> bool:
        """Do the first bytes of a file (``head``, of a file of ``size`` bytes) say it is in this format?"""
        return False

    def names_path(self, path: str) -> bool:
        """Does an output path's extension name this format?"""
        return bool(self.extensions) and path.lower().endswith(self.extensions)

    @property
    def extension(self) -> str:
        """The extension a file written in this format gets by default ("" for containers)."""
        return self.extensions[0] if self.extensions else ""

    def can_patch(self, other: Format) -> bool:
        """Can a file in this format be written as ``other`` by copying its bytes and patching storages?"""
        return self.byte_ranges and other is self


class SafetensorsFormat(Format):
    def names_path(self, path: str) -> bool:
        return path.endswith(self.extensions)  # as written, ".safetensors"

    def sniff(self, head: bytes, size: int) -> bool:
        from .safetensors_fmt import sniff

        return sniff(head, size)


class TorchFormat(Format):
    def sniff(self, head: bytes, size: int) -> bool:
        from .torchfile import sniff_torch

        return sniff_torch(head) == self.name

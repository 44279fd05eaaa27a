"""The on-disk formats and their registry: one ``Format`` per format (see ``base.py``), found by name, by a
file's first bytes, or by an output path's extension. Imports no torch."""
from __future__ import annotations

import os

from ..errors import FormatError
from .base import DcpFormat, Format, GgufFormat, SafetensorsFormat, TorchFormat

PT_EXTENSIONS = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".tar")

SAFETENSORS = SafetensorsFormat("safetensors", (".safetensors",), single_file=True, byte_ranges=True, flat=True)
PT = TorchFormat("pt", PT_EXTENSIONS, single_file=True, byte_ranges=True, holds_non_tensors=True, pickled=True)
PT_LEGACY = TorchFormat("pt-legacy", holds_non_tensors=True, pickled=True)
SHARDED = Format("sharded", flat=True, is_container=True, split=True)
DCP = DcpFormat("dcp", holds_non_tensors=True, is_container=True, placeholder_values=True)
DIRECTORY = Format("directory", is_container=True, sidecars=True)
MODULE = Format("module", in_memory=True)
GGUF = GgufFormat("gguf", (".gguf",), flat=True, dequantized=True)

# Sniffed in this order: GGUF's magic, then a safetensors header, then the torch magic numbers.
REGISTRY: tuple[Format, ...] = (GGUF, SAFETENSORS, PT, PT_LEGACY, SHARDED, DCP, DIRECTORY, MODULE)
_BY_NAME = {f.name: f for f in REGISTRY}


def by_name(name: str) -> Format:
    """The format a contract ``"format"`` string names."""
    return _BY_NAME[name]


def find(name: str | None) -> Format | None:
    """The format ``name`` names, or None (a source kind that is no format: ``nn``, ``factory``)."""
    return _BY_NAME.get(name) if name is not None else None


def sniff_file(path: str) -> Format:
    """The format a file's first bytes say it is in; refuses an empty file and one in no known format."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise FormatError(f"{path}: empty file")
    for fmt in REGISTRY:
        if fmt.sniff(head, size):
            return fmt
    raise FormatError(f"{path}: not a checkpoint (neither a torch.save file, safetensors nor GGUF)")


def for_output_path(path: str | None, default: Format) -> Format:
    """The single-file format an output path's extension names (``.safetensors``, ``.pt .pth .bin ...``),
    else ``default``."""
    if path is not None:
        for fmt in REGISTRY:
            if fmt.single_file and fmt.names_path(path):
                return fmt
    return default

"""The on-disk formats and their registry: one ``Format`` per format (the interface: ``base.py``; each format's
class: its own module), found by name, by a file's first bytes, or by an output path's extension. Imports no
torch: each format module imports its heavy readers inside its methods."""
from __future__ import annotations


from ..errors import FormatError
from .base import Format
from .dcp import DcpFormat
from .gguf import GgufFormat
from .safetensors_fmt import SafetensorsFormat
from .sharded import ShardedFormat
from .torchfile import TorchFormat
from .torchscript import TorchScriptFormat

PT_EXTENSIONS = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".tar")

SAFETENSORS = SafetensorsFormat("safetensors", (".safetensors",), single_file=True, byte_ranges=True, flat=True)
# a state dict read from a TorchScript archive's modules; written back only as the archive with new values
TORCHSCRIPT = TorchScriptFormat("torchscript", byte_ranges=True, flat=True, values_only=True)
PT = TorchFormat("pt", PT_EXTENSIONS, single_file=True, byte_ranges=True, holds_non_tensors=True, pickled=True,
                 archive=TORCHSCRIPT)
PT_LEGACY = TorchFormat("pt-legacy", holds_non_tensors=True, pickled=True)
SHARDED = ShardedFormat("sharded", flat=True, is_container=True, split=True)
DCP = DcpFormat("dcp", holds_non_tensors=True, is_container=True, placeholder_values=True)
DIRECTORY = Format("directory", is_container=True, sidecars=True)
MODULE = Format("module", in_memory=True)
GGUF = GgufFormat("gguf", (".gguf",), flat=True, dequantized=True)

# the extensions of a model directory's weights file (a .pkl or .tar beside config.json is not its weights)
WEIGHT_EXTENSIONS = SAFETENSORS.extensions + tuple(e for e in PT_EXTENSIONS if e not in (".pkl", ".tar"))

# Sniffed in this order: GGUF's magic, a safetensors header, then the torch magic numbers (a TorchScript
# archive before any other torch zip).
REGISTRY: tuple[Format, ...] = (GGUF, SAFETENSORS, TORCHSCRIPT, PT, PT_LEGACY, SHARDED, DCP, DIRECTORY, MODULE)
_BY_NAME = {f.name: f for f in REGISTRY}


def by_name(name: str) -> Format:
    """The format a contract ``"format"`` string names."""
    return _BY_NAME[name]


def find(name: str | None) -> Format | None:
    """The format ``name`` names, or None (a source kind that is no format: ``nn``, ``factory``)."""
    return _BY_NAME.get(name) if name is not None else None


def sniff_file(path: str) -> Format:
    """The format a file's first bytes say it is in; refuses an empty file and one in no known format."""
    from ..blob import open_blob
    from .diagnose import diagnose

    with open_blob(path) as b:  # (a local file is pinned as it is opened: formats.pins)
        size, head = b.size, b.pread(0, 16)
    for fmt in REGISTRY:  # formats with a magic of their own first
        if not fmt.pickled and fmt.sniff(head, size):
            return fmt
    problem = diagnose(path, head, size)  # another format, text, a file cut short: said as such (a pickle
    if problem:                           # reader would take almost any bytes for opcodes)
        raise FormatError(f"{path}: {problem}")
    for fmt in REGISTRY:
        if fmt.sniff_path(path, head, size):
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

"""Say what a file is when it is not a checkpoint paramtool reads, or is one cut short.

Asked before the formats are tried (``formats.sniff_file``), from a file's first bytes and, for a zip, its
central directory: a pickle reader takes almost any bytes for opcodes, so without this a GGUF file or a text
file would be reported as a broken pickle. Imports nothing heavy; reads at most the first 4 KiB and the last
64 KiB of the file.
"""
from __future__ import annotations

import codecs
import os
import re
import zipfile

from ..blob import listdir, open_file

TRUNCATED = "an interrupted download or copy?"

# leading bytes -> what the file is, and what to do instead
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"GGUF", "a GGUF file (llama.cpp), not a PyTorch checkpoint"),
    (b"\x93NUMPY", "a numpy .npy array file, not a PyTorch checkpoint (load it with numpy.load)"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras .h5 weights?), not a PyTorch checkpoint"),
    (b"version https://git-lfs", "a Git LFS pointer, not the checkpoint itself (fetch it with `git lfs pull`)"),
)
_PROTOCOL0_STARTS = b"(}]cLIF"  # how a protocol-0 (text) pickle can begin: never taken for text
_TF_DATA = re.compile(r"\.data-\d{5}-of-\d{5}$")


def diagnose(path: str, head: bytes, size: int) -> str | None:
    """Why ``path`` (whose first bytes are ``head``) cannot be read as a checkpoint, or None to try the formats.

    The message follows ``path: `` in an error line."""
    if size == 0:
        return "empty file (0 bytes)"
    if len(head) < 64 <= size:
        with open_file(path) as f:
            head = f.read(64)
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    name = os.path.basename(path)
    if _looks_onnx(head):
        return "an ONNX model (protobuf), not a PyTorch checkpoint"
    if _TF_DATA.search(name) or (name.endswith(".index") and _tf_data_beside(path)) or name == "saved_model.pb":
        return "a TensorFlow checkpoint or SavedModel file, not a PyTorch checkpoint"
    if head.startswith(b"PK\x03\x04"):
        return _zip(path, size)
    return _safetensors_cut(head, size) or _text(path, head)


def _looks_onnx(head: bytes) -> bool:
    """ModelProto: field 1 (ir_version, a small varint), then producer_name, opset or graph; 0x08 is no
    pickle opcode and no safetensors header length this small."""
    return len(head) >= 3 and head[0] == 0x08 and 3 <= head[1] <= 12 and head[2] in (0x12, 0x1A, 0x22, 0x3A, 0x42)


def _tf_data_beside(path: str) -> bool:
    stem = path[: -len(".index")]
    directory = os.path.dirname(path) or "."
    base = os.path.basename(stem)
    return any(f.startswith(base + ".data-") for f in listdir(directory))


def _zip(path: str, size: int) -> str | None:
    """A zip cut short (no end-of-directory record), or a zip of another kind (numpy .npz, Keras .keras)."""
    with open_file(path) as f:
        f.seek(max(0, size - (1 << 16) - 22))
        tail = f.read()
    if b"PK\x05\x06" not in tail:
        return (f"truncated: a zip file (as torch.save writes) without its closing directory, {size} bytes "
                f"long ({TRUNCATED})")
    try:
        with open_file(path) as raw, zipfile.ZipFile(raw) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None  # the torch reader words it
    if any(n.endswith("data.pkl") for n in names) or any(n.endswith("constants.pkl") for n in names):
        return None
    if names and all(n.endswith(".npy") for n in names):
        return "a numpy .npz archive, not a PyTorch checkpoint (load it with numpy.load)"
    if "model.weights.h5" in names or "metadata.json" in names and "config.json" in names:
        return "a Keras .keras archive, not a PyTorch checkpoint"
    return None


def _safetensors_cut(head: bytes, size: int) -> str | None:
    """A safetensors file cut inside its header: the length prefix promises more than the file holds."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    n = int.from_bytes(head[:8], "little")
    if size - 8 < n <= 100_000_000:
        return (f"truncated: a safetensors file whose header needs {n} bytes, but only {size - 8} follow its "
                f"length ({TRUNCATED})")
    return None


def _text(path: str, head: bytes) -> str | None:
    """A text file (an HTML error page, JSON, a script) rather than binary data."""
    with open_file(path) as f:
        sample = f.read(4096)
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)  # (a cut last character)
    except UnicodeDecodeError:
        return None
    if not text or head[:1] in [bytes([b]) for b in _PROTOCOL0_STARTS] or any(
            not (c.isprintable() or c in "\n\r\t") for c in text):
        return None
    stripped = text.lstrip().lower()
    if stripped.startswith(("<!doctype html", "<html")):
        return "an HTML page, not a checkpoint (a failed download?)"
    if stripped.startswith(("{", "[")):
        return "a JSON text file, not a checkpoint"
    return "a text file, not a checkpoint"

"""GGUF, llama.cpp's format, read with the llama.cpp project's own Python package (``gguf``, optional extra
``paramtool[gguf]``): its memory-mapped ``GGUFReader`` lists the tensors and the key-value metadata without
reading tensor data, and its ``quants.dequantize`` turns each quantized tensor into float32 when asked for.

A tensor is named as the file names it (``blk.0.attn_q.weight``) and shaped as torch would hold it (GGUF lists
dimensions innermost first: they are reversed). Its dtype is the file's for plain types (F32, F16, BF16, F64,
I8-I64) and float32 for quantized ones (what dequantizing gives); the file's own type of every tensor is the
table of contents' ``quantization``. The key-value metadata is the checkpoint's metadata (long arrays, such as
a vocabulary, summarised). Read only: paramtool writes no GGUF.
"""
from __future__ import annotations

import json
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any

from ..checkpoint import Checkpoint
from ..errors import FormatError, ParamtoolError, first_line
from ..records import dataclass
from ..toc import FakeTensor, StorageRef, Toc, contiguous_stride, numel_of
from .base import Format, flat_only
from .dtypes import GGUF

_SHOWN = 16  # metadata arrays longer than this (a vocabulary) are summarised


def reader(path: str) -> Any:
    """The package's reader over ``path`` (memory-mapped; no tensor data is read)."""
    try:
        import gguf
    except ImportError:
        raise ParamtoolError("reading GGUF needs the gguf package: pip install 'paramtool[gguf]'") from None
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # the package's own checks (magic, version, truncation), as one line
        raise FormatError(f"{path}: not a readable GGUF file ({first_line(e, 200)})") from None


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(list(t.shape)))


def dtype_of(type_name: str) -> str:
    """The dtype a tensor of GGUF type ``type_name`` is read as."""
    return GGUF.get(type_name, "float32")


def _value(field: Any) -> str:
    """A metadata value as text; long arrays (a vocabulary, merges) summarised."""
    try:
        value = field.contents()
    except Exception:  # a type the package cannot render
        return "<unreadable>"
    if isinstance(value, list) and len(value) > _SHOWN:
        kind = type(value[0]).__name__ if value else "value"
        return f"[{len(value)} {kind}s]"
    return value if isinstance(value, str) else json.dumps(value, default=str)


def read_tree(path: str) -> tuple[dict[str, FakeTensor], dict[str, str], dict[str, str], dict[str, Any]]:
    """Stand-in tensors by name in the file's order, the metadata (the ``GGUF.*`` header fields left out), each
    tensor's GGUF type, and the package's tensor records (to read the data from)."""
    r = reader(path)
    root: dict[str, FakeTensor] = {}
    types: dict[str, str] = {}
    records: dict[str, Any] = {}
    for t in r.tensors:
        shape, dtype = _shape(t), dtype_of(t.tensor_type.name)
        if t.name in root:
            raise FormatError(f"{path}: the tensor '{t.name}' is listed twice")
        root[t.name] = FakeTensor(StorageRef(("gguf", t.name), dtype, numel_of(shape)), 0, shape,
                                  contiguous_stride(shape), dtype)
        types[t.name], records[t.name] = t.tensor_type.name, t
    metadata = {k: _value(f) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return root, metadata, types, records


class GgufCheckpoint(Checkpoint):
    """A GGUF file: stand-ins in ``root`` (the listing), each tensor read (and dequantized) when asked for, so
    memory stays near one tensor; ``quantization``: each tensor's GGUF type."""

    records: dict[str, Any] = {}
    quantization: dict[str, str] = {}

    def tensor(self, name: str) -> Any:
        import numpy as np
        import torch

        t = self.records[name]
        if t.tensor_type.name in GGUF:
            data = np.array(t.data, copy=True)  # out of the read-only mapping
        else:
            import gguf

            data = gguf.quants.dequantize(t.data, t.tensor_type)
        return torch.from_numpy(np.ascontiguousarray(data)).reshape(_shape(t))

    def toc(self) -> Toc:
        from ..records import replace

        return replace(super().toc(), quantization=dict(self.quantization))


def open_checkpoint(label: str, path: str, fmt: Format) -> GgufCheckpoint:
    root, metadata, types, records = read_tree(path)
    ckpt = GgufCheckpoint(label, fmt, root, {n: (n,) for n in root}, metadata, {}, path)
    ckpt.records, ckpt.quantization = records, types
    return ckpt


def load(label: str, path: str, fmt: Format) -> Checkpoint:
    """Every tensor read and dequantized (for the writers, which change tensors in place)."""
    lazy = open_checkpoint(label, path, fmt)
    tensors = {n: lazy.tensor(n) for n in lazy.names}
    return Checkpoint(label, fmt, tensors, {n: (n,) for n in tensors}, lazy.metadata, {}, path)


# ---------------------------------------------------------------- names as the checkpoint had them


def name_map(ckpt: Checkpoint, names: list[str]) -> dict[str, str]:
    """checkpoint name -> GGUF name, through the ``gguf`` package's tensor-name map for the file's architecture
    (``general.architecture``, ``<arch>.block_count``); names it does not know are left out."""
    import gguf

    meta = ckpt.metadata or {}
    arch_name = meta.get("general.architecture")
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), None)
    if arch is None:
        return {}
    try:
        blocks = int(meta.get(f"{arch_name}.block_count", "0"))
    except ValueError:
        blocks = 0
    table = gguf.get_tensor_name_map(arch, blocks)
    out = {}
    for name in names:
        mapped = table.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is not None:
            out[name] = mapped
    return out


def llama_heads(gguf_name: str, meta: dict[str, str]) -> int | None:
    """llama.cpp's converter reorders the rows of LLaMA's query and key projections (rotary halves
    interleaved, ``permute_like_llama_cpp``): the head count to do the same to the checkpoint's tensor before
    comparing, or None for any other tensor."""
    if meta.get("general.architecture") != "llama" or not gguf_name.endswith((".attn_q.weight", ".attn_k.weight")):
        return None
    key = "head_count_kv" if ".attn_k." in gguf_name else "head_count"
    try:
        return int(meta.get(f"llama.attention.{key}") or meta.get("llama.attention.head_count"))
    except (TypeError, ValueError):
        return None


def permute_like_llama_cpp(t: Any, heads: int) -> Any:
    """The row order llama.cpp's converter gives a LLaMA query/key weight (its ``permute``)."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


@dataclass
class Pairing:
    """How a GGUF file's tensors pair with those of the checkpoint it was converted from: ``pairs`` is the
    checkpoint's name -> the file's name (through the architecture's name map, else equal names), ``quantization``
    the file's name -> its GGUF type; ``arranged`` gives a checkpoint tensor the row order the converter wrote."""

    pairs: dict[str, str]
    quantization: dict[str, str]
    metadata: dict[str, str]

    def arranged(self, name: str, tensor: Any) -> Any:
        """The checkpoint's tensor ``name`` as llama.cpp's converter stores it (LLaMA's query and key rows
        reordered, ``llama_heads``); any other tensor as it is."""
        gname = self.pairs[name]
        heads = llama_heads(gname, self.metadata) if gname != name else None  # (same names: no converter ran)
        if heads and tensor.dim() >= 1 and tensor.shape[0] % (2 * heads) == 0:
            return permute_like_llama_cpp(tensor, heads)
        return tensor


def pairing(ckpt: GgufCheckpoint, names: list[str]) -> Pairing:
    """The pairing of the GGUF file ``ckpt`` with a checkpoint's tensors ``names`` (those it has no tensor for
    are left out)."""
    mapped = name_map(ckpt, names)
    pairs = {n: mapped.get(n, n) for n in names if mapped.get(n, n) in ckpt.names}
    return Pairing(pairs, dict(ckpt.toc().quantization), ckpt.metadata or {})


class TensorEntries:
    """A GGUF listing's tensors one at a time, dequantized as they are read (``GgufFormat.open_entries``): its
    stand-ins' storage keys are its keys, one storage per tensor."""

    def __init__(self, listing: Checkpoint) -> None:
        self.listing = listing
        self.by_key = {t.storage: t for t in listing.infos()}

    def read_storage(self, key: Any) -> Any:
        return self.listing.tensor(self.by_key[key].name).reshape(-1)

    def nbytes(self, key: Any) -> int:
        return self.by_key[key].nbytes

    def dtype(self, key: Any) -> str:
        return self.by_key[key].dtype

    def close(self) -> None:
        pass


class GgufFormat(Format):
    """llama.cpp's GGUF, read through the ``gguf`` package (this module); not written."""

    def sniff(self, head: bytes, size: int) -> bool:
        return head[:4] == b"GGUF"

    def read_listing(self, label: str, path: str, key: str | None) -> Checkpoint:
        flat_only(key, "a GGUF file")
        return open_checkpoint(label, path, self)  # (lists only: tensors are read when asked for)

    def load(self, label: str, path: str, key: str | None) -> Checkpoint:
        flat_only(key, "a GGUF file")
        return load(label, path, self)

    def pairing(self, ckpt: Checkpoint, names: list[str]) -> Pairing:
        return pairing(ckpt, names)

    def open_entries(self, listing: Checkpoint) -> TensorEntries:
        return TensorEntries(listing)

    def load_lazy(self, label: str, path: str, key: str | None) -> Checkpoint:
        """Each tensor read and dequantized only when asked for."""
        flat_only(key, "a GGUF file")
        return open_checkpoint(label, path, self)

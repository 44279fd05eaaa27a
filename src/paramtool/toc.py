"""Table of contents: what a checkpoint holds, described without reading tensor data.

Every reader produces the same description, so listing, tie detection and selection work the same way
for every format, and none of them needs torch.
"""
from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any, Hashable

from .formats.dtypes import SIZES as DTYPE_SIZES  # dtype name (as torch prints it) -> bytes per element
from .records import dataclass, field


def itemsize(dtype: str) -> int:
    return DTYPE_SIZES.get(dtype, 1)


def numel_of(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def numel_within(shape: list[int] | tuple[int, ...], limit: int) -> int | None:
    """``shape``'s element count, or None once the product passes ``limit`` (multiplied dimension by dimension
    and checked as it goes: thousands of huge dimensions cost no more than a few)."""
    if 0 in shape:
        return 0
    n = 1
    for d in shape:
        n *= d
        if n > limit:
            return None
    return n


@dataclass(frozen=True)
class StorageRef:
    """One underlying storage. Two tensors share memory exactly when their ``key`` is equal."""

    key: Hashable
    dtype: str
    numel: int  # elements of ``dtype`` in the storage
    location: str = "cpu"

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


@dataclass(frozen=True)
class FakeTensor:
    """A tensor as a pickle or a header describes it: a view (offset, shape, stride) of a storage."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str
    requires_grad: bool = False
    is_parameter: bool = False
    conj: bool = False  # torch's conjugate bit: the values are the conjugates of the stored ones
    neg: bool = False  # torch's negative bit: the values are the negatives of the stored ones
    special: Special | None = None  # a tensor that is not a plain strided view (quantized, sparse, ...)

    @property
    def numel(self) -> int:
        return numel_of(self.shape)

    @property
    def plain(self) -> bool:
        """Are its values its bytes, as they are stored (no bit to apply, nothing to rebuild)?"""
        return not (self.conj or self.neg or self.special)


class Special:
    """How torch rebuilds a tensor that is not a plain strided view of one storage: ``kind`` is "quantized",
    "sparse", "nested", "meta" or "storage" (a bare storage, listed as a 1-D tensor of its bytes); ``func`` the
    rebuild function's name and ``args`` its arguments, with stand-ins (``FakeTensor``, ``StorageRef``, names)
    in place of objects; ``text`` what ``inspect`` says of it (``per_channel_affine axis=0``, ``sparse_csr
    nnz=6``). Compared and hashed by identity."""

    __slots__ = ("kind", "func", "args", "text")

    def __init__(self, kind: str, func: str, args: tuple, text: str = "") -> None:
        self.kind, self.func, self.args, self.text = kind, func, args, text

    def __repr__(self) -> str:
        return f"Special({self.kind}: {self.text or self.func})"


def kind_text(fake: FakeTensor) -> str:
    """What ``inspect`` says of a tensor beyond its shape and dtype ("" for a plain view)."""
    if fake.special is not None:
        return f"{fake.special.kind} {fake.special.text}" if fake.special.kind == "quantized" else fake.special.text
    return " ".join(b for b, on in (("conj", fake.conj), ("neg", fake.neg)) if on) + " view" if not fake.plain else ""


@dataclass(frozen=True)
class TensorInfo:
    """One named tensor of a checkpoint."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    storage: Hashable  # storage identity; equal keys share memory
    offset: int = 0  # in elements of dtype
    stride: tuple[int, ...] = ()
    path: tuple[Any, ...] = ()  # where the tensor sits inside the container
    kind: str = ""  # what it is beyond a plain view: "conj view", "quantized per_tensor_affine ...", "meta", ...

    @property
    def numel(self) -> int:
        return numel_of(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    def byte_span(self) -> tuple[int, int]:
        """[start, end) of the bytes this view can touch inside its storage."""
        size = itemsize(self.dtype)
        if self.numel == 0:
            return (self.offset * size, self.offset * size)
        extent = sum((d - 1) * abs(s) for d, s in zip(self.shape, self.stride or contiguous_stride(self.shape)))
        return (self.offset * size, (self.offset + extent + 1) * size)


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(stride))


@dataclass
class Toc:
    """What ``inspect`` and ``ties`` need, and nothing that requires tensor bytes."""

    source: str
    format: str  # "pt" | "pt-legacy" | "torchscript" | "safetensors" | "sharded" | "dcp" | "module" | "directory"
    tensors: list[TensorInfo]
    extras: dict[str, str] = field(default_factory=dict)  # non-tensor entries: dotted path -> short repr
    config_ties: dict[str, str] = field(default_factory=dict)  # name -> stored name: not stored, config.json ties it
    config_pairs: list[tuple[str, str]] = field(default_factory=list)  # stored apart, though config.json ties them
    warnings: list[str] = field(default_factory=list)  # what the reader could not settle (unmatched declarations)
    metadata: dict[str, str] | None = None  # safetensors header metadata
    modules: dict[str, str] = field(default_factory=dict)  # module path -> repr, for module sources
    meta_ties: dict[str, str] = field(default_factory=dict)  # name -> stored name, ties restored from metadata
    key: str | None = None  # the --key sub-tree listed
    values: Any = None  # a --key sub-tree without tensors: its values, JSON-ready (tree.plain_values)
    globals: list[str] | None = None  # global names a pickle refers to (torch files); None for other formats
    quantization: dict[str, str] = field(default_factory=dict)  # name -> stored type (GGUF: Q8_0, F16, ...)


@dataclass
class FakeModule:
    """A pickled ``torch.nn`` module as the listing unpickler sees it: its class and its ``__dict__``.

    ``state`` holds ``_parameters``, ``_buffers`` and ``_modules`` as a real module's ``__dict__`` does, so the
    same tree walk serves real modules and these stand-ins.
    """

    cls: str  # "torch.nn.modules.linear.Linear"
    state: dict[str, Any] = field(default_factory=dict)

    def __setstate__(self, state: Any) -> None:  # called by pickle's BUILD
        if isinstance(state, dict):
            self.state.update(state)


@dataclass
class TorchFile:
    """A torch file as read without running it (``formats.torchfile``; loaded by ``formats.pt``): the object tree (stand-ins), the globals its pickle names, and
    where each storage's bytes are (``data_offset`` into the file; None for a compressed zip record)."""

    root: Any
    globals: set[str]
    storages: dict[Hashable, StorageRef] = field(default_factory=dict)
    data_offset: dict[Hashable, int | None] = field(default_factory=dict)
    records: dict[Hashable, str] = field(default_factory=dict)  # zip record name of each storage
    whole: str | None = None  # why its tensors must be rebuilt by torch (conj bits, quantized, ...), if they must

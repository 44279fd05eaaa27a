"""torch.save files, read without torch and without reading tensor bytes.

The pickle inside a torch file is read by an unpickler with an exact allowlist: every global the pickle
names is looked up in ``_ALLOWED`` and replaced by a harmless stand-in (``FakeTensor``, ``FakeModule``,
plain containers). Anything else is refused by name before anything is called; the pickle's own code
never runs. Storages are recorded (key, dtype, size), never read.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import zipfile
from dataclasses import replace
from typing import Any, BinaryIO, Callable

from ..errors import FormatError, RefusedGlobal
from ..toc import FakeModule, FakeTensor, StorageRef, itemsize
from .nn_classes import NN_MODULE_CLASSES

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_PICKLE_OPCODES = frozenset(op.code.encode("latin-1") for op in pickletools.opcodes)
MAX_PICKLE = 256 << 20  # a data.pkl beyond 256 MiB is not a state dict (real ones are KBs to a few MBs)

STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "QInt8Storage": "qint8", "QUInt8Storage": "quint8", "QInt32Storage": "qint32",
}
DTYPE_GLOBALS = {
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool", "complex64",
    "complex128", "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64", "double", "float", "half", "long",
    "int", "short",
}


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` and friends: only its dtype matters."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


class _Stand:
    """Stand-in for a harmless torch value (a dtype, a device, a layout): kept as its name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any) -> str:  # torch.device("cuda", 0) and the like
        return ":".join(str(a) for a in args) or self.name

    def __repr__(self) -> str:
        return self.name


def _check_view(storage: StorageRef, offset: int, size: tuple, stride: tuple) -> None:
    if any(not isinstance(d, int) or d < 0 for d in size) or len(size) != len(stride):
        raise FormatError(f"tensor with invalid shape {size} / stride {stride}")
    if any(d == 0 for d in size):
        return
    extent = offset + sum((d - 1) * s for d, s in zip(size, stride))
    if offset < 0 or extent >= storage.numel:
        raise FormatError(f"tensor of shape {list(size)} at offset {offset} needs more than the {storage.numel} "
                          f"elements its storage has")


def _rebuild_tensor_v2(storage: Any, offset: int, size: tuple, stride: tuple, requires_grad: bool = False,
                       backward_hooks: Any = None, metadata: Any = None) -> FakeTensor:
    if not isinstance(storage, StorageRef):
        raise FormatError("tensor without a storage record")
    size, stride = tuple(size), tuple(stride)
    _check_view(storage, offset, size, stride)
    return FakeTensor(storage, offset, size, stride, storage.dtype, bool(requires_grad))


def _rebuild_tensor(storage: Any, offset: int, size: tuple, stride: tuple) -> FakeTensor:
    return _rebuild_tensor_v2(storage, offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: bool, backward_hooks: Any, state: Any = None) -> FakeTensor:
    if not isinstance(data, FakeTensor):
        raise FormatError("parameter without tensor data")
    return replace(data, requires_grad=bool(requires_grad), is_parameter=True)


def _rebuild_from_type_v2(func: Callable, new_type: Any, args: tuple, state: Any) -> Any:
    # ``func`` came through find_class, so it is one of our stand-ins
    return func(*args)


def _encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode``, used by protocol-2 pickles for bytes; only the plain text codecs."""
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "utf8", "ascii", "iso88591"):
        raise RefusedGlobal(f"_codecs.encode({encoding!r})")
    return text.encode(encoding, errors)


_module_classes: dict[str, type] = {}


def _module_stand_in(qualname: str) -> type:
    """A class for one torch.nn module: pickle's NEWOBJ creates it, BUILD fills its ``__dict__``."""
    if qualname not in _module_classes:

        def __new__(klass: type, *args: Any, **kwargs: Any) -> FakeModule:
            obj = object.__new__(klass)
            obj.cls = qualname
            obj.state = {}
            return obj

        _module_classes[qualname] = type(qualname.rsplit(".", 1)[-1], (FakeModule,), {"__new__": __new__})
    return _module_classes[qualname]


def _allowed() -> dict[str, Any]:
    table: dict[str, Any] = {
        "collections.OrderedDict": collections.OrderedDict,
        "builtins.set": set, "__builtin__.set": set,
        "builtins.frozenset": frozenset, "__builtin__.frozenset": frozenset,
        "builtins.slice": slice, "__builtin__.slice": slice,
        "builtins.complex": complex, "__builtin__.complex": complex,
        "builtins.bytearray": bytearray, "__builtin__.bytearray": bytearray,
        "_codecs.encode": _encode,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_tensor": _rebuild_tensor,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
        "torch.nn.parameter.Parameter": _Stand("torch.nn.parameter.Parameter"),
        "torch.Tensor": _Stand("torch.Tensor"),
        "torch.Size": tuple,
        "torch.device": _Stand("device"),
        "torch.strided": _Stand("torch.strided"),
        "torch.storage.UntypedStorage": _StorageType("uint8"),
        "torch.UntypedStorage": _StorageType("uint8"),
    }
    for name, dtype in STORAGE_DTYPES.items():
        table[f"torch.{name}"] = _StorageType(dtype)
    for name in DTYPE_GLOBALS:
        table[f"torch.{name}"] = _Stand(f"torch.{name}")
    return table


_ALLOWED = _allowed()


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, storage: Callable[[tuple], StorageRef]) -> None:
        super().__init__(file)
        self._storage = storage

    def find_class(self, module: str, name: str) -> Any:
        dotted = f"{module}.{name}"
        if dotted in _ALLOWED:
            return _ALLOWED[dotted]
        if dotted in NN_MODULE_CLASSES:
            return _module_stand_in(dotted)
        raise RefusedGlobal(dotted)

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise FormatError(f"unknown persistent id {str(pid)[:60]!r}")
        return self._storage(pid)


def _unpickle(f: BinaryIO, storage: Callable[[tuple], StorageRef], path: str) -> Any:
    try:
        return _Unpickler(f, storage).load()
    except RefusedGlobal as e:
        raise RefusedGlobal(e.name, path) from None
    except FormatError as e:
        raise FormatError(f"{path}: {e}") from None
    except Exception as e:  # truncated, corrupt or hostile bytes: one readable line
        raise FormatError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {str(e)[:120]})") from None


def _storage_type(value: Any) -> str:
    if not isinstance(value, _StorageType):
        raise FormatError(f"storage of unknown type {value!r}")
    return value.dtype


def sniff_torch(head: bytes) -> str | None:
    """"pt" for a zip file, "pt-legacy" for anything that starts like a pickle, else None."""
    if head.startswith(b"PK\x03\x04"):
        return "pt"
    if head[:1] and head[:1] in _PICKLE_OPCODES:  # any pickle: the allowlist unpickler decides
        return "pt-legacy"
    return None


def read_zip_tree(path: str) -> Any:
    """The object tree of a torch zip checkpoint, tensors as ``FakeTensor``: reads ``data.pkl`` only."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise FormatError(f"{path}: not a valid torch zip file ({e})") from None
    with archive:
        pkls = [i for i in archive.infolist() if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
        if not pkls:
            raise FormatError(f"{path}: zip file without a data.pkl record: not a torch checkpoint")
        info = pkls[0]
        prefix = info.filename[: -len("data.pkl")]
        if info.file_size > MAX_PICKLE:
            raise FormatError(f"{path}: data.pkl is {info.file_size} bytes, above the {MAX_PICKLE} byte limit")
        records = {i.filename: i.file_size for i in archive.infolist()}
        byteorder = _read_record(archive, prefix + "byteorder", path).strip() if prefix + "byteorder" in records else b"little"
        if byteorder not in (b"little", b""):
            raise FormatError(f"{path}: big-endian checkpoints are not supported")
        seen: dict[str, StorageRef] = {}

        def storage(pid: tuple) -> StorageRef:
            if len(pid) != 5:
                raise FormatError(f"malformed storage record {pid[:3]!r}")
            _, kind, key, location, numel = pid
            key = str(key)
            if key in seen:
                return seen[key]
            dtype = _storage_type(kind)
            record = f"{prefix}data/{key}"
            if record not in records:
                raise FormatError(f"storage record '{key}' is missing from the zip")
            if not isinstance(numel, int) or numel < 0 or numel * itemsize(dtype) > records[record]:
                raise FormatError(f"storage '{key}' claims {numel} {dtype} elements but its record holds "
                                  f"{records[record]} bytes")
            seen[key] = StorageRef(("zip", key), dtype, numel, str(location))
            return seen[key]

        data = _read_record(archive, info.filename, path)
    return _unpickle(io.BytesIO(data), storage, path)


def _read_record(archive: zipfile.ZipFile, name: str, path: str) -> bytes:
    try:
        return archive.read(name)
    except Exception as e:  # BadZipFile, zlib.error, EOFError, NotImplementedError (odd compression), ...
        raise FormatError(f"{path}: zip record '{name}' cannot be read ({type(e).__name__}: {e})") from None


def read_legacy_tree(path: str) -> Any:
    """The object tree of a legacy (pre-zip) torch file, or of a bare pickle; storages are not read."""
    seen: dict[str, StorageRef] = {}

    def storage(pid: tuple) -> StorageRef:
        if len(pid) != 6:
            raise FormatError(f"malformed storage record {pid[:3]!r}")
        _, kind, key, location, numel, _view = pid
        key = str(key)
        if key not in seen:
            if not isinstance(numel, int) or numel < 0:
                raise FormatError(f"storage '{key}' has an invalid size")
            seen[key] = StorageRef(("legacy", key), _storage_type(kind), numel, str(location))
        return seen[key]

    def no_storage(pid: tuple) -> StorageRef:
        raise FormatError("unexpected storage reference before the checkpoint's header")

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = _unpickle(f, no_storage, path)
        if magic != LEGACY_MAGIC:
            raise FormatError(f"{path}: a pickle, but not a torch checkpoint (no torch magic number)")
        protocol = _unpickle(f, no_storage, path)
        if protocol != 1001:
            raise FormatError(f"{path}: unsupported legacy protocol version {protocol!r}")
        _unpickle(f, no_storage, path)  # sys_info
        root = _unpickle(f, storage, path)
        keys = _unpickle(f, no_storage, path)
        if not isinstance(keys, list) or set(map(str, keys)) != set(seen):
            raise FormatError(f"{path}: the storage list does not match the tensors")
        # each storage follows as an 8-byte element count and its bytes; check they fit without reading them
        pos = f.tell()
        for key in keys:
            ref = seen[str(key)]
            pos += 8 + ref.nbytes
        if pos > size:
            raise FormatError(f"{path}: truncated: the storages need {pos} bytes, the file has {size}")
    return root


def torch_safe_globals() -> list:
    """The real classes torch.load's weights-only unpickler must also accept: standard nn module classes."""
    import importlib

    out: list = [set]
    for dotted in sorted(NN_MODULE_CLASSES):
        module_name, _, qualname = dotted.rpartition(".")
        try:
            obj = importlib.import_module(module_name)
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):  # another torch version may lack a class; it cannot appear then
            continue
        out.append(obj)
    return out

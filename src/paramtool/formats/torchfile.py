"""torch.save files, read without torch and without reading tensor bytes.

The pickle inside a torch file is read by an unpickler with an exact allowlist: every global the pickle
names is looked up in an exact table (``_allowed``) and replaced by a harmless stand-in (``FakeTensor``, ``FakeModule``,
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


MAX_DEPTH = 200  # containers nested deeper than this are not a checkpoint (and would exhaust a recursive walk)
MAX_ENTRIES = 50_000_000  # entries reachable through shared references (a "billion laughs" DAG is refused)
MAX_BROADCAST = 1 << 32  # elements a stride-0 (expanded) view may claim beyond its storage


class _Frozen:
    """Base of the stand-ins ``find_class`` hands out: BUILD (``__setstate__``) on them is refused."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise FormatError(f"the pickle tries to modify {self!r} (BUILD on a global): not a checkpoint")


class _StorageType(_Frozen):
    """Stand-in for ``torch.FloatStorage`` and friends: only its dtype matters."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"<storage type {self.dtype}>"


class _Stand(_Frozen):
    """Stand-in for a harmless torch value (a dtype, a device, a layout): kept as its name."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any) -> str:  # torch.device("cuda", 0) and the like
        if not all(isinstance(a, (str, int)) for a in args):
            raise FormatError(f"{self.name} called with unexpected arguments")
        return ":".join(str(a) for a in args) or self.name

    def __repr__(self) -> str:
        return self.name


class _Call(_Frozen):
    """An allowlisted function, wrapped so that BUILD cannot reach the function object itself."""

    __slots__ = ("fn", "name")

    def __init__(self, fn: Callable, name: str) -> None:
        self.fn, self.name = fn, name

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __repr__(self) -> str:
        return self.name


def _check_view(storage: StorageRef, offset: Any, size: tuple, stride: tuple) -> None:
    if (not isinstance(offset, int) or len(size) != len(stride)
            or not all(isinstance(d, int) for d in size + stride)):
        raise FormatError(f"tensor with invalid shape {str(size)[:80]} / stride {str(stride)[:80]}")
    if offset < 0 or any(d < 0 for d in size) or any(s < 0 for s in stride):
        raise FormatError(f"tensor with negative offset, shape or stride ({offset}, {list(size)}, {list(stride)})")
    if any(d == 0 for d in size):
        return
    extent = offset + sum((d - 1) * s for d, s in zip(size, stride))
    dense = numel = 1
    for d, s in zip(size, stride):
        numel *= d
        if s:
            dense *= d
    if extent >= storage.numel or dense > storage.numel or numel > max(storage.numel, MAX_BROADCAST):
        raise FormatError(f"tensor of shape {list(size)} (stride {list(stride)}) at offset {offset} needs more "
                          f"than the {storage.numel} elements its storage has")


class _Load:
    """One file's unpickling: the stand-ins it may call, and every object it created, to check after."""

    def __init__(self) -> None:
        self.made: list[tuple[Any, dict]] = []  # (FakeTensor | StorageRef, its fields when created)
        self.table = _allowed(self)

    def keep(self, obj: Any) -> Any:
        self.made.append((obj, dict(vars(obj))))
        return obj

    def check(self) -> None:
        # FakeTensor and StorageRef are frozen dataclasses, but pickle's BUILD writes __dict__ directly:
        # a pickle that alters a tensor after its view was checked is refused here.
        for obj, fields in self.made:
            if vars(obj) != fields:
                raise FormatError(f"the pickle modifies a {type(obj).__name__} after creating it: not a checkpoint")

    def rebuild_tensor_v2(self, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                          backward_hooks: Any = None, metadata: Any = None) -> FakeTensor:
        if type(storage) is not StorageRef:
            raise FormatError("tensor without a storage record")
        if not isinstance(size, tuple) or not isinstance(stride, tuple):
            raise FormatError("tensor with invalid shape or stride")
        _check_view(storage, offset, size, stride)
        return self.keep(FakeTensor(storage, offset, size, stride, storage.dtype, bool(requires_grad)))

    def rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any) -> FakeTensor:
        return self.rebuild_tensor_v2(storage, offset, size, stride)

    def rebuild_parameter(self, data: Any, requires_grad: Any, backward_hooks: Any, state: Any = None) -> FakeTensor:
        if type(data) is not FakeTensor:
            raise FormatError("parameter without tensor data")
        return self.keep(replace(data, requires_grad=bool(requires_grad), is_parameter=True))

    def storage(self, kind: Any, key: str, location: Any, numel: int) -> StorageRef:
        return self.keep(StorageRef(key, _storage_type(kind), numel, str(location)))


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    # ``func`` is a value of the pickle: only a stand-in ``find_class`` handed out can be callable
    if not isinstance(func, _Call) or not isinstance(args, tuple):
        raise FormatError("_rebuild_from_type_v2 without a tensor rebuild function")
    return func(*args)


def _encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode``, used by protocol-2 pickles for bytes; only the plain text codecs."""
    if not isinstance(text, str) or not isinstance(encoding, str) or errors != "strict":
        raise FormatError("_codecs.encode with unexpected arguments")
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "utf8", "ascii", "iso88591"):
        raise RefusedGlobal(f"_codecs.encode({encoding!r})")
    return text.encode(encoding, errors)


def _bytearray(*args: Any) -> bytearray:
    """``bytearray`` from bytes or (str, encoding) only: ``bytearray(10**12)`` would allocate a terabyte."""
    if args and not isinstance(args[0], (bytes, bytearray, str)):
        raise FormatError("bytearray with unexpected arguments")
    if len(args) == 2:
        return bytearray(_encode(*args))
    if len(args) > 1:
        raise FormatError("bytearray with unexpected arguments")
    return bytearray(*args)


_module_classes: dict[str, type] = {}


def _module_stand_in(qualname: str) -> type:
    """A class for one torch.nn module: pickle's NEWOBJ creates it, BUILD fills its ``__dict__``.

    BUILD on the class object itself finds the unbound ``FakeModule.__setstate__`` and fails with a TypeError,
    so the cached classes cannot be altered by a pickle.
    """
    if qualname not in _module_classes:

        def __new__(klass: type, *args: Any, **kwargs: Any) -> FakeModule:
            obj = object.__new__(klass)
            obj.cls = qualname
            obj.state = {}
            return obj

        _module_classes[qualname] = type(qualname.rsplit(".", 1)[-1], (FakeModule,), {"__new__": __new__})
    return _module_classes[qualname]


def _allowed(load: _Load) -> dict[str, Any]:
    """The exact allowlist, one fresh table per file: no stand-in is shared between two loads."""
    table: dict[str, Any] = {
        "collections.OrderedDict": collections.OrderedDict,
        "builtins.set": set, "__builtin__.set": set,
        "builtins.frozenset": frozenset, "__builtin__.frozenset": frozenset,
        "builtins.slice": slice, "__builtin__.slice": slice,
        "builtins.complex": complex, "__builtin__.complex": complex,
        "builtins.bytearray": _Call(_bytearray, "builtins.bytearray"),
        "__builtin__.bytearray": _Call(_bytearray, "__builtin__.bytearray"),
        "_codecs.encode": _Call(_encode, "_codecs.encode"),
        "torch._utils._rebuild_tensor_v2": _Call(load.rebuild_tensor_v2, "torch._utils._rebuild_tensor_v2"),
        "torch._utils._rebuild_tensor": _Call(load.rebuild_tensor, "torch._utils._rebuild_tensor"),
        "torch._utils._rebuild_parameter": _Call(load.rebuild_parameter, "torch._utils._rebuild_parameter"),
        "torch._utils._rebuild_parameter_with_state": _Call(load.rebuild_parameter,
                                                            "torch._utils._rebuild_parameter_with_state"),
        "torch._tensor._rebuild_from_type_v2": _Call(_rebuild_from_type_v2, "torch._tensor._rebuild_from_type_v2"),
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


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, storage: Callable[[tuple], StorageRef], load: _Load) -> None:
        super().__init__(file)
        self._storage = storage
        self._table = load.table

    def find_class(self, module: str, name: str) -> Any:
        dotted = f"{module}.{name}"
        if dotted in self._table:
            return self._table[dotted]
        if dotted in NN_MODULE_CLASSES:
            return _module_stand_in(dotted)
        raise RefusedGlobal(dotted)

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and pid and pid[0] == "module":
            # legacy files save a module class as ('module', cls, source_file, source); cls came through find_class
            if len(pid) != 4 or pid[1] not in _module_classes.values():
                raise FormatError("malformed module record")
            return pid[1]
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise FormatError(f"unknown persistent id {str(pid)[:60]!r}")
        return self._storage(pid)


def _children(obj: Any) -> list | None:
    if isinstance(obj, FakeModule):
        return [obj.state]
    if isinstance(obj, dict):
        return list(obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return list(obj)
    return None


def _check_graph(root: Any) -> None:
    """Refuse a cyclic, too deeply nested, or exponentially shared container tree (iterative: no recursion)."""
    kids = _children(root)
    if kids is None:
        return
    done: dict[int, int] = {}  # id -> entries reachable from it, counting shared ones every time
    on_path = {id(root)}
    stack: list[list] = [[root, kids, 0]]
    while stack:
        top = stack[-1]
        node, kids, i = top
        if i < len(kids):
            top[2] += 1
            child = kids[i]
            grand = _children(child)
            if grand is None or id(child) in done:
                continue
            if id(child) in on_path:
                raise FormatError("the pickle holds a container that contains itself: not a checkpoint")
            if len(stack) >= MAX_DEPTH:
                raise FormatError(f"containers nested deeper than {MAX_DEPTH} levels: not a checkpoint")
            on_path.add(id(child))
            stack.append([child, grand, 0])
        else:
            stack.pop()
            on_path.discard(id(node))
            entries = 1 + sum(done.get(id(k), 1) for k in kids)
            if entries > MAX_ENTRIES:
                raise FormatError(f"more than {MAX_ENTRIES} entries (through shared references): not a checkpoint")
            done[id(node)] = entries


def _unpickle(f: BinaryIO, storage: Callable[[tuple], StorageRef], path: str, load: _Load) -> Any:
    try:
        obj = _Unpickler(f, storage, load).load()
        load.check()
        _check_graph(obj)
        return obj
    except RefusedGlobal as e:
        raise RefusedGlobal(e.name, path) from None
    except FormatError as e:
        raise FormatError(f"{path}: {e}") from None
    except Exception as e:  # truncated, corrupt or hostile bytes: one readable line
        msg = " ".join(str(e).split())[:120]
        raise FormatError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {msg})") from None


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
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError) as e:  # e.g. "zip file version 6.4"
        raise FormatError(f"{path}: not a valid torch zip file ({type(e).__name__}: {e})") from None
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
            seen[key] = load.storage(kind, ("zip", key), location, numel)
            return seen[key]

        load = _Load()
        data = _read_record(archive, info.filename, path)
    return _unpickle(io.BytesIO(data), storage, path, load)


def _read_record(archive: zipfile.ZipFile, name: str, path: str) -> bytes:
    try:
        return archive.read(name)
    except Exception as e:  # BadZipFile, zlib.error, EOFError, NotImplementedError (odd compression), ...
        raise FormatError(f"{path}: zip record '{name}' cannot be read ({type(e).__name__}: {e})") from None


def read_legacy_tree(path: str) -> Any:
    """The object tree of a legacy (pre-zip) torch file, or of a bare pickle; storages are not read."""
    seen: dict[str, StorageRef] = {}
    load = _Load()

    def storage(pid: tuple) -> StorageRef:
        if len(pid) != 6:
            raise FormatError(f"malformed storage record {pid[:3]!r}")
        _, kind, key, location, numel, _view = pid
        key = str(key)
        if key not in seen:
            if not isinstance(numel, int) or numel < 0:
                raise FormatError(f"storage '{key}' has an invalid size")
            seen[key] = load.storage(kind, ("legacy", key), location, numel)
        return seen[key]

    def no_storage(pid: tuple) -> StorageRef:
        raise FormatError("unexpected storage reference before the checkpoint's header")

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = _unpickle(f, no_storage, path, load)
        if magic != LEGACY_MAGIC:
            raise FormatError(f"{path}: a pickle, but not a torch checkpoint (no torch magic number)")
        protocol = _unpickle(f, no_storage, path, load)
        if protocol != 1001:
            raise FormatError(f"{path}: unsupported legacy protocol version {protocol!r}")
        _unpickle(f, no_storage, path, load)  # sys_info
        root = _unpickle(f, storage, path, load)
        keys = _unpickle(f, no_storage, path, load)
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

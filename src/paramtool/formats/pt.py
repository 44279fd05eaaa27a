"""torch.save files: tensors rebuilt by paramtool from the storages it located; saved with torch.save.

Loading never unpickles a file a second time and never calls ``torch.load``: the listing (``TorchFile``,
read by the inert unpickler) says where each storage's bytes are, and each ``FakeTensor`` view becomes a real
tensor over a copy-on-write memory map of those bytes. Tensors that share a storage in the file share one
here. Modules stay ``FakeModule`` and other objects stay ``Inert``: nothing a file names is built or called.

Saving re-serializes that tree with torch's zip writer and a pickler that writes a stand-in back as the same
GLOBAL, arguments and state it was read from, without importing the module it names.
"""
from __future__ import annotations

import io
import mmap
import pickle
import sys
import uuid
import zipfile
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Hashable

from ..errors import FormatError, first_line
from ..toc import FakeModule, FakeTensor, StorageRef, itemsize
from .dtypes import STORAGE_TYPES
from .storage import Chunks
from .unpickle import Global, Inert

if TYPE_CHECKING:
    from ..toc import TorchFile


def load(path: str, listing: TorchFile) -> Any:
    """The file's object tree with real tensors (memory-mapped, copy-on-write) in place of ``FakeTensor``."""
    mapped = None
    if listing.storages and any(listing.storages[k].nbytes for k in listing.storages):
        from ..fsops import guard_mappings
        from .pins import opened

        guard_mappings()
        with open(path, "rb") as f:
            opened(path, f.fileno())
            try:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (ValueError, OSError) as e:
                raise FormatError(f"{path}: cannot map the file ({e})") from None
    return materialize(listing, mapped, path)


def materialize(listing: TorchFile, mapped: Any, path: str, zip_bytes: Any = None) -> Any:
    """``listing``'s tree with real tensors over ``mapped`` (the file's bytes: an mmap or a bytearray).
    ``zip_bytes``: where a compressed record is read from, when the zip is not the file at ``path``."""
    storages = _storages(listing, mapped, path, zip_bytes)
    try:
        return _Rebuild(storages, path).real(listing.root)
    except (RuntimeError, ValueError, TypeError, KeyError) as e:  # a view torch cannot make of its storage
        raise FormatError(f"{path}: cannot rebuild a tensor ({type(e).__name__}: {first_line(e, 160)})") from None


def _storages(listing: TorchFile, mapped: Any, path: str, zip_bytes: Any) -> dict[Hashable, Any]:
    """Each storage the listing located, as an untyped storage over the mapped bytes (no copy)."""
    import torch

    storages: dict[Hashable, Any] = {}
    for key, ref in listing.storages.items():
        offset = listing.data_offset.get(key)
        nbytes = ref.nbytes
        if nbytes == 0:
            flat = torch.empty(0, dtype=torch.uint8)
        elif offset is None:  # a deflated zip record (not written by torch): the bytes the storage needs, no more
            import zipfile

            try:
                with zipfile.ZipFile(zip_bytes if zip_bytes is not None else path) as z, \
                        z.open(listing.records[key]) as record:
                    data = bytearray(record.read(nbytes))
            except Exception as e:  # BadZipFile, zlib.error, EOFError: corrupt compressed bytes
                raise FormatError(f"{path}: zip record '{listing.records[key]}' cannot be read ({first_line(e, 120)})") from None
            if len(data) != nbytes:
                raise FormatError(f"{path}: zip record '{listing.records[key]}' holds fewer bytes than its storage")
            flat = torch.frombuffer(data, dtype=torch.uint8, count=nbytes)
        else:
            if mapped is None or offset + nbytes > len(mapped):
                raise FormatError(f"{path}: truncated: storage {key[1]!r} ends beyond the file")
            flat = torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=offset)
        storages[key] = flat.untyped_storage()
    return storages


class _Rebuild:
    """The stand-in tree copied with real tensors; shared objects (ties, memoized values) stay shared."""

    def __init__(self, storages: dict[Hashable, Any], path: str) -> None:
        self.storages, self.path = storages, path
        self.done: dict[int, Any] = {}

    def tensor(self, fake: FakeTensor) -> Any:
        import torch

        dtype = _dtype(fake.dtype, self.path)
        if fake.special is not None:
            import warnings

            with warnings.catch_warnings():  # torch's notices on beta layouts (sparse CSR, nested): not the user's
                warnings.simplefilter("ignore")
                t = self.special(fake, dtype)
            if fake.special.kind == "storage":
                return t
        else:
            t = torch.empty(0, dtype=dtype)
            t.set_(self.storages[fake.storage.key], fake.offset, fake.shape, fake.stride)
            if fake.conj:  # the bits torch's set_tensor_metadata sets: views, the bytes stay as stored
                t = t.conj()
            if fake.neg:
                t = t._neg_view()
        if fake.is_parameter:
            return torch.nn.Parameter(t, requires_grad=fake.requires_grad)
        if fake.requires_grad:
            t.requires_grad_(True)
        return t

    def special(self, fake: FakeTensor, dtype: Any) -> Any:
        """A tensor torch rebuilds beyond a strided view, rebuilt by torch's own rebuild function (the one the
        pickle names, checked when listed) from the stand-ins' real counterparts: what torch.load gives."""
        import torch

        kind, args = fake.special.kind, fake.special.args
        if kind == "storage":
            untyped = self.storages[fake.storage.key]
            if fake.special.func == "untyped":
                return untyped
            return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        if kind == "meta":
            return torch._utils._rebuild_meta_tensor_no_storage(dtype, fake.shape, fake.stride, fake.requires_grad)
        if kind == "quantized":
            storage = torch.storage.TypedStorage(wrap_storage=self.storages[args[0].key], dtype=dtype, _internal=True)
            scheme, *params = args[4]
            params = [self.real(p) for p in params]
            return torch._utils._rebuild_qtensor(storage, fake.offset, fake.shape, fake.stride,
                                                 (getattr(torch, scheme.qualname), *params), False, OrderedDict())
        if kind == "sparse":
            layout, data = args
            made = torch._utils._rebuild_sparse_tensor(getattr(torch, layout), tuple(self.real(d) for d in data))
            _validate_sparse(made)
            return made
        if kind == "nested" and fake.special.func == "jagged":
            values, offsets, lengths = (self.real(a) for a in args[:3])
            _check_jagged(values, offsets, lengths, args[3])
            import logging

            logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)  # (a notice torch logs on import)
            return torch.nested.nested_tensor_from_jagged(values, offsets, lengths, jagged_dim=args[3])
        if kind == "nested":
            buffer, sizes, strides, offsets = (self.real(a) for a in args)
            _check_nested(buffer, sizes, strides, offsets)
            return torch._utils._rebuild_nested_tensor(buffer, sizes, strides, offsets)
        raise FormatError(f"{self.path}: cannot rebuild a {kind} tensor")

    def real(self, obj: Any) -> Any:
        done, real = self.done, self.real
        if id(obj) in done:
            return done[id(obj)]
        if isinstance(obj, FakeTensor):
            out: Any = self.tensor(obj)
        elif isinstance(obj, FakeModule):
            out = FakeModule.__new__(type(obj))
            out.cls, out.state = obj.cls, {}
            done[id(obj)] = out
            out.state.update({k: real(v) for k, v in obj.state.items()})
        elif isinstance(obj, Inert):
            out = Inert(obj.cls, (), obj.how)
            out.__class__ = type(obj)
            done[id(obj)] = out
            out.args, out.kwargs = real(obj.args), {k: real(v) for k, v in obj.kwargs.items()}
            out.state, out.has_state = real(obj.state), obj.has_state
            out.list_items, out.dict_items = real(obj.list_items), {k: real(v) for k, v in obj.dict_items.items()}
        elif isinstance(obj, (dict, list)):
            out = obj.__class__() if type(obj) is not list else []
            done[id(obj)] = out
            if isinstance(obj, dict):
                out.update((k, real(v)) for k, v in obj.items())
                if getattr(obj, "__dict__", None):
                    out.__dict__.update({k: real(v) for k, v in obj.__dict__.items()})
            else:
                out.extend(real(v) for v in obj)
        elif type(obj) is tuple:
            out = tuple(real(v) for v in obj)
        else:
            return obj  # numbers, text, bytes, sets of those, Global names
        done[id(obj)] = out
        return out


def _dtype(name: str, path: str) -> Any:
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise FormatError(f"{path}: tensors of dtype {name} are not supported by this torch")
    return dtype


def _validate_sparse(t: Any) -> None:
    """The invariants torch checks of a loaded sparse tensor when asked to (indices inside the shape, ...),
    always: an invalid one would read outside its buffers."""
    import torch

    if t.layout is torch.sparse_coo:
        torch._validate_sparse_coo_tensor_args(t._indices(), t._values(), t.size(), t.is_coalesced(),
                                               check_pinning=False)
        return
    compressed, plain = (t.crow_indices(), t.col_indices()) if t.layout in (torch.sparse_csr, torch.sparse_bsr) \
        else (t.ccol_indices(), t.row_indices())
    torch._validate_sparse_compressed_tensor_args(compressed, plain, t.values(), t.size(), t.layout,
                                                  check_pinning=False)


def _check_nested(buffer: Any, sizes: Any, strides: Any, offsets: Any) -> None:
    """Each component of a nested tensor lies inside its buffer (torch checks nothing here)."""
    import torch

    if buffer.dim() != 1 or sizes.dtype != torch.int64 or strides.dtype != torch.int64 or offsets.dtype != torch.int64:
        raise ValueError("malformed nested tensor")
    for size, stride, offset in zip(sizes.tolist(), strides.tolist(), offsets.tolist()):
        if min(size + stride + [offset], default=0) < 0:
            raise ValueError("nested tensor with a negative size, stride or offset")
        if 0 not in size and offset + sum((d - 1) * s for d, s in zip(size, stride)) >= buffer.numel():
            raise ValueError("a nested tensor's component reaches beyond its buffer")


def _check_jagged(values: Any, offsets: Any, lengths: Any, ragged: int) -> None:
    """A jagged nested tensor's offsets rise inside its values (torch checks nothing here)."""
    bounds = offsets.tolist()
    extent = values.shape[ragged - 1]
    ends = [a + n for a, n in zip(bounds, lengths.tolist())] if lengths is not None else bounds[1:]
    if min(bounds) < 0 or max(ends, default=0) > extent or (lengths is None and bounds != sorted(bounds)) \
            or (lengths is not None and len(lengths.tolist()) != len(bounds) - 1):
        raise ValueError("a jagged nested tensor's offsets reach outside its values")


def _plain(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str, type(None))):
        return True
    return isinstance(value, (tuple, list)) and all(_plain(v) for v in value)


def real_module(fake: Any, memo: dict | None = None) -> Any:
    """A real ``torch.nn`` module from a loaded ``FakeModule`` (tensors already real, see ``load``), for the
    commands that run a model: ``cls.__new__`` and ``nn.Module.__init__`` of the allowlisted class, then its
    tensors, children and plain attributes (numbers, strings, booleans, None, tuples and lists of them and of its
    own tensors).

    Nothing the file names is called and no constructor runs: a pickled model's ``__dict__`` already holds what
    its ``forward`` reads. Hook tables stay fresh and empty (hooks are code the file names). The class's own
    (torch's) ``__setstate__`` takes the plain attributes, as unpickling would give them (an RNN rebuilds its
    weight references there). One object in the file (a module or a Parameter used twice) is one object here.
    """
    import importlib

    import torch

    from .nn_classes import NN_MODULE_CLASSES

    memo = {} if memo is None else memo
    if id(fake) in memo:
        return memo[id(fake)]
    if fake.cls not in NN_MODULE_CLASSES:
        raise FormatError(f"cannot rebuild '{fake.cls}': not a standard torch.nn module class")
    module_name, _, name = fake.cls.rpartition(".")
    cls = getattr(importlib.import_module(module_name), name)
    module = cls.__new__(cls)
    torch.nn.Module.__init__(module)
    memo[id(fake)] = module

    def tensor(t: Any, what: str) -> Any:
        if not isinstance(t, torch.Tensor):
            raise FormatError(f"cannot rebuild {fake.cls}: {what} is a {type(t).__name__}, not a tensor")
        return t

    state: dict[str, Any] = {}
    for key, value in fake.state.items():
        if key in ("_parameters", "_buffers", "_modules"):
            entries: dict[str, Any] = {}
            for child, v in (value or {}).items():
                if v is None or key != "_modules":
                    entries[child] = None if v is None else tensor(v, f"'{child}'")
                elif isinstance(v, FakeModule):
                    entries[child] = real_module(v, memo)
                else:
                    raise FormatError(f"cannot rebuild {fake.cls}: child '{child}' is not a module")
            getattr(module, key).update(entries)
        elif key == "_non_persistent_buffers_set":
            module._non_persistent_buffers_set = {str(n) for n in (value or ())}
        elif key in module.__dict__ and key != "training":
            continue  # hooks and other nn.Module bookkeeping: fresh and empty, as __init__ made them
        elif _plain(value):
            state[key] = list(value) if isinstance(value, list) else value
        elif isinstance(value, (list, tuple)) and all(_plain(v) or isinstance(v, torch.Tensor) for v in value):
            state[key] = list(value) if isinstance(value, list) else tuple(value)  # RNN._flat_weights
        else:
            raise FormatError(f"cannot rebuild {fake.cls}: attribute '{key}' is a {type(value).__name__}, "
                              "not a number, string, tuple or tensor")
    cls.__setstate__(module, state)  # torch's own code for this class
    return module


class _Pickler(pickle._Pickler):  # the pure-Python pickler: it lets a stand-in write its own opcodes
    """Writes ``Global``, ``Inert`` and ``FakeModule`` as the GLOBAL name (never imported), arguments and state
    they were read from; everything else as torch.save does."""

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        if isinstance(obj, (Global, Inert, FakeModule)):
            memo = self.memo.get(id(obj))
            if memo is not None:
                self.write(self.get(memo[0]))
                return
            if isinstance(obj, Global):
                self._global(obj)
            elif isinstance(obj, Inert):
                self._inert(obj)
            else:
                self._module(obj)
            return
        if isinstance(obj, (StorageRef, FakeTensor)):  # a stand-in no rebuild of paramtool's took in: never a GLOBAL
            raise FormatError("the checkpoint holds a tensor paramtool cannot write back; nothing was written")
        super().save(obj, save_persistent_id)

    def _global(self, ref: Global) -> None:
        self.write(pickle.GLOBAL + ref.module.encode("utf-8") + b"\n" + ref.qualname.encode("utf-8") + b"\n")
        self.memoize(ref)

    def _call(self, func: Global, args: tuple, obj: Any) -> None:
        """``obj`` pickled as ``func(*args)`` (REDUCE), ``func`` written by name: what ``save_reduce`` writes
        for a callable, for a name that is never resolved. Memoized, as pickle memoizes what it reduces."""
        memo = self.memo.get(id(obj))
        if memo is not None:
            self.write(self.get(memo[0]))
            return
        self.save(func)
        self.save(args)
        self.write(pickle.REDUCE)
        self.memoize(obj)

    def _inert(self, obj: Inert) -> None:
        if obj.how != "newobj":
            self._call(obj.cls, tuple(obj.args), obj)
        else:
            self.save(obj.cls)
            self.save(tuple(obj.args))
            if obj.kwargs:
                self.save(dict(obj.kwargs))
                self.write(pickle.NEWOBJ_EX)
            else:
                self.write(pickle.NEWOBJ)
            self.memoize(obj)
        if obj.list_items:
            self._batch_appends(iter(obj.list_items))
        if obj.dict_items:
            self._batch_setitems(iter(obj.dict_items.items()))
        if obj.has_state:
            self.save(obj.state)
            self.write(pickle.BUILD)

    def _module(self, obj: FakeModule) -> None:
        module, _, name = obj.cls.rpartition(".")
        self.save(Global(module, name))
        self.save(())
        self.write(pickle.NEWOBJ)
        self.memoize(obj)
        self.save(obj.state)
        self.write(pickle.BUILD)


class PickleModule:
    """What ``torch.save(pickle_module=...)`` needs: a ``Pickler`` class."""

    Pickler = _Pickler
    HIGHEST_PROTOCOL = pickle.HIGHEST_PROTOCOL


def save(root: Any, path: str) -> None:
    """torch.save in the zip format; shared storages stay shared, as torch.save keeps them. Stand-ins read
    from a file (modules, inert objects, names) are written back as they were read.

    Written through a Python file object, not a path: torch's C++ writer on a path aborts the process on a
    write error (disk full), while through a file object the error is an ``OSError`` like any other."""
    import torch

    from ..fsops import write_error

    try:
        with open(path, "wb") as f:
            torch.save(root, f, pickle_module=PickleModule)
    except RecursionError:
        raise FormatError("the checkpoint's containers are nested too deeply to write back") from None
    except RuntimeError as e:  # torch's zip writer saw a short write
        raise (write_error(e, path) or e) from None


class StorageOut:
    """A storage of a file being written, as its pickle names it: record ``data/<key>``; ``source`` is the
    stand-in's storage key in the checkpoint it came from."""

    __slots__ = ("key", "dtype", "numel", "location", "source")

    def __init__(self, key: str, dtype: str, numel: int, location: str, source: Hashable) -> None:
        self.key, self.dtype, self.numel, self.location, self.source = key, dtype, numel, location, source

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


class _Data:
    """A parameter's data: pickled as a plain tensor inside ``_rebuild_parameter``."""

    __slots__ = ("fake",)

    def __init__(self, fake: FakeTensor) -> None:
        self.fake = fake


def pickle_with_storages(root: Any) -> tuple[bytes, dict[Hashable, StorageOut]]:
    """``root`` (with ``FakeTensor`` stand-ins, no data) pickled as ``torch.save`` pickles it: tensors rebuilt by
    torch's own functions from numbered storages (persistent ids), other stand-ins written back as read.
    Returns the pickle and the storages it names, by the stand-ins' storage keys, in record order.

    torch's functions and storage classes are written as the GLOBAL names torch.save writes for them (one
    ``Global`` per name, memoized as torch's objects are), so this needs no torch: a conversion that only
    moves bytes never imports it. A dtype without a storage class (``storage_class``) is the caller's to
    refuse first."""
    storages: dict[Hashable, StorageOut] = {}
    names: dict[tuple[str, str], Global] = {}

    def name(module: str, qualname: str) -> Global:
        return names.setdefault((module, qualname), Global(module, qualname))

    def storage_of(ft: FakeTensor) -> StorageOut:
        ref = ft.storage
        if ref.key not in storages:
            # (one location string object, as torch.save's: the pickle memoizes it once, byte for byte torch's)
            storages[ref.key] = StorageOut(str(len(storages)), ref.dtype, ref.numel, sys.intern(ref.location), ref.key)
        return storages[ref.key]

    def tensor_reduce(ft: FakeTensor, requires_grad: bool) -> tuple:
        view = (storage_of(ft), ft.offset, tuple(ft.shape), tuple(ft.stride), requires_grad, OrderedDict())
        if ft.dtype in STORAGE_CLASSES:
            return name("torch._utils", "_rebuild_tensor_v2"), view
        # a dtype without a typed storage class (uint16, float8, ...): as torch.save writes it
        return name("torch._utils", "_rebuild_tensor_v3"), view + (name("torch", ft.dtype),)

    class Pickler(_Pickler):
        def persistent_id(self, obj: Any) -> Any:
            if type(obj) is StorageOut:
                if obj.dtype in STORAGE_CLASSES:
                    return ("storage", name("torch", STORAGE_CLASSES[obj.dtype]), obj.key, obj.location, obj.numel)
                return ("storage", name("torch.storage", "UntypedStorage"), obj.key, obj.location, obj.nbytes)
            return None

        def save(self, obj: Any, save_persistent_id: bool = True) -> None:
            if type(obj) is FakeTensor:
                if obj.is_parameter:
                    self._call(name("torch._utils", "_rebuild_parameter"), (_Data(obj), obj.requires_grad, OrderedDict()), obj)
                else:
                    self._call(*tensor_reduce(obj, obj.requires_grad), obj)
            elif type(obj) is _Data:
                self._call(*tensor_reduce(obj.fake, False), obj)
            else:
                super().save(obj, save_persistent_id)

    buf = io.BytesIO()
    try:
        Pickler(buf, protocol=2).dump(root)
    except RecursionError:
        raise FormatError("the checkpoint's containers are nested too deeply to write back") from None
    return buf.getvalue(), storages


ALIGN = 64  # torch's storage alignment inside the zip
STORAGE_CLASSES = {dtype: cls for cls, dtype in STORAGE_TYPES.items()}  # dtype -> the class torch.save names


def _zip_record(zf: zipfile.ZipFile, name: str, data: Any) -> None:
    """One stored record whose data starts on a 64-byte boundary (padding in the local header's extra
    field, as torch pads it), so torch can memory-map the storages. ``data``: bytes-like, or ``Chunks``."""
    parts = data if isinstance(data, Chunks) else \
        (memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else data,)
    info = zipfile.ZipInfo(f"archive/{name}", date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = info.compress_size = len(data) if isinstance(data, Chunks) else len(parts[0])
    info.CRC = 0  # (zipfile computes it while writing; FileHeader needs a value to measure its length)
    zip64 = info.file_size > zipfile.ZIP64_LIMIT * 0.9
    header = len(info.FileHeader(zip64))
    pad = -(zf.fp.tell() + header + 4) % ALIGN
    info.extra = b"FB" + pad.to_bytes(2, "little") + b"Z" * pad
    with zf.open(info, "w", force_zip64=zip64) as f:
        for part in parts:
            f.write(part)


def write_zip(path: str, pickled: bytes, records: Iterable[tuple[str, Any]]) -> None:
    """A torch zip file as ``torch.save`` lays it out: the pickle, the format records, then each storage
    record ``(key, bytes-like)`` as the iterable produces it (one at a time), the version records last.

    Written by Python's ``zipfile``: a write error (disk full) is an ``OSError`` naming the cause, never an
    abort inside torch's C++ writer."""
    with open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        _zip_record(zf, "data.pkl", pickled)
        _zip_record(zf, ".format_version", b"1")
        _zip_record(zf, ".storage_alignment", str(ALIGN).encode())
        _zip_record(zf, "byteorder", b"little")
        for key, data in records:
            _zip_record(zf, f"data/{key}", data)
            del data
        _zip_record(zf, "version", b"3\n")
        _zip_record(zf, ".data/serialization_id", uuid.uuid4().hex.encode()[:40].ljust(40, b"0"))

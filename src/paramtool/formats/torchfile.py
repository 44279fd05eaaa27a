"""torch.save files, read without torch and without reading tensor bytes.

The pickle inside a torch file is read by the inert unpickler (``unpickle.py``), which calls nothing the
file names: tensor rebuild functions are interpreted here into ``FakeTensor`` views (checked against their
storage when made), torch.nn classes become ``FakeModule``, other classes inert records, and names that run
code are refused. The container is read the way torch reads it (zip prefix from the first record, tar before
legacy pickle); what two readers could read differently is refused as ambiguous. Storages are recorded
(key, dtype, size, byte offset), never read here.
"""
from __future__ import annotations

import os
import struct
import zipfile

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any, BinaryIO, Callable, Hashable

    from ..checkpoint import Checkpoint
    from .storage import StorageFile

from ..blob import deferred_offset, open_file
from ..errors import FormatError, RefusedGlobal
from ..records import dataclass, replace
from ..toc import FakeModule, FakeTensor, Special, StorageRef, TorchFile, itemsize
from .base import Format
from .dtypes import QUANTIZED_STORAGES, SIZES, STORAGE_TYPES
from .unpickle import MAX_DEPTH, OPCODES, TORCH_REBUILDS, Global, Hooks, Inert, unpickle

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
MAX_PICKLE = 256 << 20  # a data.pkl beyond 256 MiB is not a state dict (real ones are KBs to a few MBs)

MAX_ENTRIES = 50_000_000  # entries reachable through shared references (a "billion laughs" DAG is refused)
MAX_BROADCAST = 1 << 26  # elements a stride-0 (expanded) view may claim beyond its storage (a few bytes
# of a file must not cost minutes of work: 64M elements take a fraction of a second to read)
MAX_NUMEL = (1 << 63) - 1  # torch's sizes are int64: a larger product is refused, as torch refuses it


def check_view(storage: StorageRef, dtype: str, offset: Any, size: tuple, stride: tuple) -> None:
    """A view of ``storage`` as ``dtype`` is valid where torch's ``set_`` takes it: the last element it reaches
    lies inside the storage (overlapping views, ``as_strided`` and ``unfold``, included). The products are
    checked as they are formed, so a shape of huge dimensions costs no more than a small one."""
    if (not isinstance(offset, int) or len(size) != len(stride)
            or not all(type(d) is int for d in size + stride)):
        raise FormatError(f"tensor with invalid shape {str(size)[:80]} / stride {str(stride)[:80]}")
    if offset < 0 or any(d < 0 for d in size) or any(s < 0 for s in stride):
        raise FormatError(f"tensor with negative offset, shape or stride ({offset}, {str(list(size))[:80]}, "
                          f"{str(list(stride))[:80]})")
    elements = storage.nbytes // itemsize(dtype)
    numel = 1
    for d in size:
        numel *= d
        if numel == 0:
            return  # an empty view reaches no element (torch checks nothing more)
        if numel > MAX_NUMEL:
            raise FormatError(f"tensor of {len(size)} dimensions whose element count overflows int64")
    last = offset
    for d, s in zip(size, stride):
        last += (d - 1) * s
        if last >= elements:
            break
    if last >= elements or numel > max(elements, MAX_BROADCAST):
        raise FormatError(f"tensor of shape {str(list(size))[:80]} (stride {str(list(stride))[:80]}) at offset "
                          f"{offset} needs more than the {elements} {dtype} elements its storage has")


_QSCHEMES = frozenset({"per_tensor_affine", "per_tensor_symmetric", "per_channel_affine", "per_channel_symmetric",
                       "per_channel_affine_float_qparams"})
_LAYOUTS = {"torch.sparse_coo": "sparse_coo", "torch.sparse_csr": "sparse_csr", "torch.sparse_csc": "sparse_csc",
            "torch.sparse_bsr": "sparse_bsr", "torch.sparse_bsc": "sparse_bsc"}
# rebuilds torch's weights-only loader accepts that paramtool refuses by name (nothing is silently dropped)
_UNSUPPORTED = {
    "torch._utils._rebuild_wrapper_subclass": "a tensor subclass without storage (_rebuild_wrapper_subclass)",
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": "a tensor of a non-CPU device kind",
    "torch._utils._rebuild_device_tensor_from_numpy": "a tensor of a non-CPU device kind, saved as numpy",
}


def _numbers(value: Any) -> bool:
    return type(value) is list and all(type(v) in (int, float) for v in value)


def dtype_arg(value: Any, what: str = "tensor") -> str:
    """A dtype a pickle names (``GLOBAL torch float8_e4m3fn``) as paramtool's dtype name."""
    if isinstance(value, Global) and value.module == "torch" and value.qualname in SIZES:
        return value.qualname
    raise FormatError(f"{what} of unknown dtype {str(value)[:60]}")


def _bits(metadata: Any) -> dict:
    """The conj/neg bits torch's ``set_tensor_metadata`` applies (v2/v3's last argument)."""
    if metadata is None or (isinstance(metadata, dict) and not metadata):
        return {}
    if not isinstance(metadata, dict) or not set(metadata) <= {"conj", "neg"} or \
            not all(isinstance(v, bool) for v in metadata.values()):
        raise FormatError(f"tensor with unknown metadata {str(metadata)[:60]}")
    return {k: v for k, v in metadata.items() if v}


def _apply_state(made: Any, state: Any) -> Any:
    """``torch._utils._set_obj_state`` on a rebuilt tensor: a ``data`` attribute replaces its values (torch
    sets ``tensor.data``); any other attribute is kept by torch on the object and is not a tensor value."""
    if isinstance(state, tuple) and len(state) == 2:
        merged = dict(state[0] or {}) if isinstance(state[0], dict) else {}
        merged.update(state[1] or {} if isinstance(state[1], dict) else {})
        state = merged
    if not isinstance(state, dict) or "data" not in state:
        return made
    data = state["data"]
    if type(data) is not FakeTensor:
        raise FormatError("a tensor's state sets its data to something that is not a tensor")
    return replace(data, requires_grad=made.requires_grad, is_parameter=made.is_parameter)


class TorchHooks(Hooks):
    """How a torch file's pickle becomes stand-ins: storages from persistent ids, views checked on creation.

    Every rebuild function torch's weights-only loader accepts is interpreted here by name, from the
    arguments the pickle gives; nothing the file names is called."""

    def __init__(self, storage: Callable[[tuple], StorageRef]) -> None:
        self._storage = storage
        self._synthetic = 0

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and pid and pid[0] == "module":
            # legacy files save a module class as ('module', cls, source_file, source); cls is a name already read
            if len(pid) != 4 or not isinstance(pid[1], Global):
                raise FormatError("malformed module record")
            return pid[1]
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise FormatError(f"unknown persistent id {str(pid)[:60]!r}")
        return self._storage(pid)

    def _no_storage(self, kind: str, dtype: str) -> StorageRef:
        """A storage of no bytes for a tensor that has none of its own (sparse, nested, meta): never tied."""
        self._synthetic += 1
        return StorageRef((kind, self._synthetic), dtype, 0)

    def _view(self, storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None = None,
              requires_grad: Any = False, metadata: Any = None) -> FakeTensor:
        if type(storage) is not StorageRef:
            raise FormatError("tensor without a storage record")
        if not isinstance(size, tuple) or not isinstance(stride, tuple):
            raise FormatError("tensor with invalid shape or stride")
        dtype = dtype or storage.dtype
        check_view(storage, dtype, offset, size, stride)
        return FakeTensor(storage, offset, size, stride, dtype, bool(requires_grad), **_bits(metadata))

    def rebuild(self, name: str, args: tuple) -> Any:
        if name in _UNSUPPORTED:
            raise FormatError(f"the checkpoint holds {_UNSUPPORTED[name]}, which paramtool cannot represent")
        if name == "torch._tensor._rebuild_from_type_v2":
            if len(args) != 4 or not isinstance(args[0], Global) or not isinstance(args[2], tuple):
                raise FormatError("_rebuild_from_type_v2 without a tensor rebuild function")
            func, new_type, inner, state = args
            if func.name not in TORCH_REBUILDS or func.name == name:
                raise FormatError(f"_rebuild_from_type_v2 with {func.name}")
            made = self.rebuild(func.name, inner)
            if not isinstance(made, FakeTensor):
                raise FormatError(f"_rebuild_from_type_v2: {func.name} made no tensor")
            if isinstance(new_type, Global) and new_type.name.endswith("Parameter"):
                made = replace(made, is_parameter=True)
            return _apply_state(made, state)
        if name in ("torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state"):
            if len(args) < 2 or not isinstance(args[0], FakeTensor):
                raise FormatError("parameter without tensor data")
            made = replace(args[0], requires_grad=bool(args[1]), is_parameter=True)
            return _apply_state(made, args[3]) if name.endswith("_with_state") and len(args) > 3 else made
        if name in ("torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2"):
            if len(args) < 4:
                raise FormatError(f"{name} with too few arguments")
            return self._view(*args[:4], None, args[4] if len(args) > 4 else False, args[6] if len(args) > 6 else None)
        if name == "torch._utils._rebuild_tensor_v3":
            if len(args) < 7:
                raise FormatError(f"{name} with too few arguments")
            return self._view(*args[:4], dtype_arg(args[6]), args[4], args[7] if len(args) > 7 else None)
        if name == "torch._utils._rebuild_qtensor":
            return self._qtensor(args)
        if name == "torch._utils._rebuild_sparse_tensor":
            return self._sparse(args)
        if name == "torch._utils._rebuild_meta_tensor_no_storage":
            if len(args) < 3 or not isinstance(args[1], tuple) or not isinstance(args[2], tuple) \
                    or len(args[1]) != len(args[2]) or not all(type(d) is int and d >= 0 for d in args[1] + args[2]):
                raise FormatError("malformed meta tensor")
            dtype = dtype_arg(args[0], "meta tensor")
            return FakeTensor(self._no_storage("meta", dtype), 0, args[1], args[2], dtype,
                              bool(args[3]) if len(args) > 3 else False, special=Special("meta", name, args, "meta"))
        if name == "torch._utils._rebuild_nested_tensor":
            return self._nested(args)
        if name == "torch.nested._internal.nested_tensor._rebuild_njt":
            return self._jagged(args)
        return None

    def _jagged(self, args: tuple) -> FakeTensor:
        """A jagged nested tensor: its ``values`` and ``offsets`` (and ``lengths``) tensors, its ragged dim."""
        kwargs = args[0] if len(args) == 1 and isinstance(args[0], dict) else {}
        values, offsets, lengths = kwargs.get("values"), kwargs.get("offsets"), kwargs.get("lengths")
        ragged = kwargs.get("_ragged_idx", 1)
        if type(values) is not FakeTensor or type(offsets) is not FakeTensor or \
                not (lengths is None or type(lengths) is FakeTensor) or type(ragged) is not int \
                or len(offsets.shape) != 1 or offsets.dtype not in ("int64", "int32") or not offsets.shape[0] \
                or not 1 <= ragged <= len(values.shape):
            raise FormatError("malformed jagged nested tensor")
        n = offsets.shape[0] - 1
        return FakeTensor(self._no_storage("nested", values.dtype), 0, (n,), (1,), values.dtype,
                          special=Special("nested", "jagged", (values, offsets, lengths, ragged),
                                          f"jagged nested of {n} tensors"))

    def _qtensor(self, args: tuple) -> FakeTensor:
        if len(args) < 5 or not isinstance(args[4], tuple) or not args[4] or not isinstance(args[4][0], Global):
            raise FormatError("malformed quantized tensor")
        params = args[4]
        scheme = params[0].qualname if params[0].module == "torch" else ""
        if scheme not in _QSCHEMES:
            raise FormatError(f"quantized tensor with unknown scheme {params[0].name[:60]}")
        if scheme.startswith("per_tensor") and not (len(params) == 3 and isinstance(params[1], float)
                                                     and type(params[2]) is int):
            raise FormatError("quantized tensor with malformed scale and zero point")
        if scheme.startswith("per_channel"):
            if len(params) != 4 or not all(type(p) is FakeTensor or _numbers(p) for p in params[1:3]) \
                    or type(params[3]) is not int:
                raise FormatError("quantized tensor with malformed per-channel parameters")
            text = f"{scheme} axis={params[3]}"
        else:
            text = f"{scheme} scale={params[1]:g} zero_point={params[2]}"
        if type(args[0]) is not StorageRef or args[0].dtype not in QUANTIZED_STORAGES:
            raise FormatError("quantized tensor without a quantized storage")
        view = self._view(*args[:4], None, args[5] if len(args) > 5 else False)
        if scheme.startswith("per_channel") and not (0 <= params[3] < len(view.shape) and all(
                (p.shape if type(p) is FakeTensor else (len(p),)) == (view.shape[params[3]],) for p in params[1:3])):
            raise FormatError("quantized tensor whose per-channel parameters do not match its shape")
        return replace(view, special=Special("quantized", "torch._utils._rebuild_qtensor", args, text))

    def _sparse(self, args: tuple) -> FakeTensor:  # noqa: C901 (one check per layout)
        if len(args) != 2 or not isinstance(args[1], tuple):
            raise FormatError("malformed sparse tensor")
        layout = _LAYOUTS.get(args[0].name if isinstance(args[0], Global) else args[0]) \
            if isinstance(args[0], (str, Global)) else None
        data = args[1]
        if layout == "sparse_coo":
            ok = len(data) in (3, 4) and all(type(t) is FakeTensor for t in data[:2]) and isinstance(data[2], tuple)
            parts, size = data[:2], data[2] if len(data) > 2 else ()
        else:
            ok = layout is not None and len(data) == 4 and all(type(t) is FakeTensor for t in data[:3]) \
                and isinstance(data[3], tuple)
            parts, size = data[:3], data[3] if len(data) > 3 else ()
        if not ok or not all(type(d) is int and d >= 0 for d in size):
            raise FormatError(f"malformed sparse tensor ({str(args[0])[:40]})")
        values = parts[-1]
        from ..toc import contiguous_stride

        text = f"{layout} nnz={values.shape[0] if values.shape else 0}"
        return FakeTensor(self._no_storage("sparse", values.dtype), 0, size, contiguous_stride(size), values.dtype,
                          special=Special("sparse", "torch._utils._rebuild_sparse_tensor", (layout, data), text))

    def _nested(self, args: tuple) -> FakeTensor:
        if len(args) != 4 or not all(type(t) is FakeTensor for t in args):
            raise FormatError("malformed nested tensor")
        buffer, sizes, strides, offsets = args
        if len(buffer.shape) != 1 or len(sizes.shape) != 2 or sizes.shape != strides.shape \
                or offsets.shape != sizes.shape[:1]:
            raise FormatError("malformed nested tensor")
        return FakeTensor(self._no_storage("nested", buffer.dtype), 0, (sizes.shape[0],), (1,), buffer.dtype,
                          special=Special("nested", "torch._utils._rebuild_nested_tensor", args,
                                          f"nested of {sizes.shape[0]} tensors"))


def _untyped(value: Any) -> bool:
    return isinstance(value, Global) and value.name == "torch.storage.UntypedStorage"


def _finish(root: Any, untyped: set, out: TorchFile, path: str) -> Any:
    """After the pickle: untyped storages take the dtype their views name (``_rebuild_tensor_v3``), bare
    storages become listed stand-ins (``Special`` "storage"), and ``out.whole`` says whether any tensor needs
    torch to rebuild it (a conj/neg bit, a quantized, sparse, nested or meta tensor)."""
    views: dict[Hashable, set[str]] = {}
    refs: dict[Hashable, StorageRef] = {}
    special: list[str] = []
    done: dict[int, Any] = {}

    def visit(obj: Any) -> Any:
        if id(obj) in done:
            return done[id(obj)]
        if type(obj) is StorageRef:  # a storage the pickle holds as it is (torch.save of a storage)
            text = "untyped storage" if obj.key in untyped else f"{obj.dtype} storage"
            new: Any = FakeTensor(obj, 0, (obj.numel,), (1,), obj.dtype,
                                  special=Special("storage", "untyped" if obj.key in untyped else "typed", (), text))
            done[id(obj)] = new
            return new
        if isinstance(obj, FakeTensor):
            for part in (obj,) + tuple(a for a in (obj.special.args if obj.special else ())
                                       if isinstance(a, FakeTensor)) + _nested_parts(obj):
                if part.storage.nbytes and not (part.special and part.special.kind == "storage"):
                    views.setdefault(part.storage.key, set()).add(part.dtype)
                    refs[part.storage.key] = part.storage
            if not obj.plain:
                special.append(obj.special.kind if obj.special else "conj" if obj.conj else "neg")
            done[id(obj)] = obj
            return obj
        done[id(obj)] = obj
        if isinstance(obj, FakeModule):
            _visit_dict(obj.state, visit)
        elif isinstance(obj, Inert):
            obj.args = tuple(visit(a) for a in obj.args)
            _visit_dict(obj.kwargs, visit)
            obj.state = visit(obj.state)
            obj.list_items[:] = [visit(v) for v in obj.list_items]
            _visit_dict(obj.dict_items, visit)
        elif isinstance(obj, dict):
            _visit_dict(obj, visit)
        elif isinstance(obj, list):
            obj[:] = [visit(v) for v in obj]
        elif type(obj) is tuple:
            new = tuple(visit(v) for v in obj)
            if any(a is not b for a, b in zip(new, obj)):
                done[id(obj)] = new
                return new
        return obj

    root = visit(root)
    for key, dtypes in views.items():
        ref = refs[key]
        if key in untyped:
            if len(dtypes) > 1:
                raise FormatError(f"{path}: storage {key[1]!r} is viewed as {' and '.join(sorted(dtypes))}: torch "
                                  "writes one dtype per storage")
            dtype = next(iter(dtypes))
            if ref.nbytes % itemsize(dtype):
                raise FormatError(f"{path}: storage {key[1]!r} of {ref.nbytes} bytes viewed as {dtype}")
            # (set once, before anything hashes or copies the record: views already count in dtype's elements)
            object.__setattr__(ref, "numel", ref.nbytes // itemsize(dtype))
            object.__setattr__(ref, "dtype", dtype)
    if special:
        out.whole = ", ".join(sorted(set(special)))
    return root


def _nested_parts(obj: FakeTensor) -> tuple:
    """The component tensors of a sparse tensor (its args hold them one level down)."""
    if obj.special is not None and obj.special.kind == "sparse":
        return tuple(a for a in obj.special.args[1] if isinstance(a, FakeTensor))
    return ()


def _visit_dict(d: dict, visit: Callable[[Any], Any]) -> None:
    for k in list(d):
        d[k] = visit(d[k])


def storage_type(value: Any, table: dict[str, str] = STORAGE_TYPES) -> str:
    """The dtype of a storage class a pickle names (``table``: torch.save's classes, or a TorchScript archive's)."""
    name = value.name if isinstance(value, Global) else None
    short = name.rsplit(".", 1)[-1] if name and name.startswith("torch.") else None
    if short in table:
        return table[short]
    if short == "UntypedStorage":
        return "uint8"
    raise FormatError(f"storage of unknown type {value!r}")


def _children(obj: Any) -> list | None:
    if isinstance(obj, FakeTensor):
        return list(obj.special.args) if obj.special is not None else None
    if isinstance(obj, FakeModule):
        return [obj.state]
    if isinstance(obj, Inert):
        return [obj.args, obj.kwargs, obj.state, obj.list_items, obj.dict_items]
    if isinstance(obj, dict):
        return list(obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return list(obj)
    return None


def check_graph(root: Any) -> None:
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
                if isinstance(child, Inert):  # an object's link back to its parent (omegaconf's _parent):
                    continue  # tree walks never enter an Inert, so the cycle is harmless
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


def _unpickle(f: BinaryIO | bytes, storage: Callable[[tuple], StorageRef], path: str,
              seen: set[str] | None = None) -> Any:
    """One pickle through the inert unpickler; the globals it names are added to ``seen``."""
    try:
        obj, names = unpickle(f, TorchHooks(storage))
        check_graph(obj)
        if seen is not None:
            seen.update(names)
        return obj
    except RefusedGlobal as e:
        raise RefusedGlobal(e.name, path) from None
    except FormatError as e:
        raise FormatError(f"{path}: {e}") from None
    except Exception as e:  # truncated, corrupt or hostile bytes: one readable line
        msg = " ".join(str(e).split())[:120]
        raise FormatError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {msg})") from None


def sniff_torch(head: bytes) -> str | None:
    """"pt" for a zip file, "pt-legacy" for anything that starts like a pickle, else None."""
    if head.startswith(b"PK\x03\x04"):
        return "pt"
    if head[:1] and head[:1] in OPCODES:  # any pickle: the inert unpickler decides
        return "pt-legacy"
    return None


def _fold(name: str) -> str:
    """A record name as torch's zip reader (miniz) compares it: ASCII letters without case."""
    return name.translate(_ASCII_LOWER)


_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}

# zip compression methods torch's reader (miniz) decompresses; any other it refuses ("unsupported method")
TORCH_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
DEFLATE_RATIO = 1032  # deflate's largest possible expansion: a record claiming more is a bomb or a lie
# what the deflated storage records of one file may expand to: real weights hardly compress (a re-zipped
# checkpoint is about as large as its tensors), so more than this is a small file made to cost a large one
INFLATE_BUDGET, INFLATE_RATIO = 64 << 20, 32


def zip_prefix(archive: zipfile.ZipFile, path: str) -> str:
    """The archive prefix as torch takes it (from the FIRST record); refuse what two readers could read apart.

    torch's reader looks records up without regard to ASCII case, so two names equal but for case are two
    records one reader could pick either of: refused, as are names outside the prefix (torch refuses them)."""
    infos = archive.infolist()
    if not infos:
        raise FormatError(f"{path}: empty zip file: not a torch checkpoint")
    names = [i.orig_filename for i in infos]
    if any("\0" in n for n in names):
        bad = next(n for n in names if "\0" in n)
        raise FormatError(f"{path}: ambiguous zip: record name {bad!r} holds a NUL byte (readers disagree on it)")
    folded: dict[str, str] = {}
    for n in names:
        if _fold(n) in folded:
            other = folded[_fold(n)]
            raise FormatError(f"{path}: ambiguous zip: two records are named '{n}'" if other == n else
                              f"{path}: ambiguous zip: records '{other}' and '{n}' are one name to torch's "
                              "reader, which ignores case")
        folded[_fold(n)] = n
    prefix = names[0].split("/", 1)[0] + "/" if "/" in names[0] else ""
    pkls = [n for n in names if _fold(n).endswith("/data.pkl") and n.count("/") == 1]
    if not pkls:
        raise FormatError(f"{path}: zip file without a data.pkl record: not a torch checkpoint")
    if len(pkls) > 1:
        raise FormatError(f"{path}: ambiguous zip: data.pkl under two prefixes ({', '.join(pkls[:3])})")
    if _fold(pkls[0]) != _fold(prefix + "data.pkl"):
        raise FormatError(f"{path}: ambiguous zip: the first record '{names[0]}' names the archive "
                          f"'{prefix.rstrip('/')}', but data.pkl is '{pkls[0]}'")
    outside = next((n for n in names if not n.startswith(prefix)), None)
    if outside is not None:  # torch: "file in archive is not in a subdirectory"
        raise FormatError(f"{path}: zip record '{outside}' is outside the archive '{prefix.rstrip('/')}'")
    return prefix


def _seen(seen: dict[Hashable, StorageRef], key: Any) -> StorageRef | None:
    """The storage already read under ``key`` (compared as torch's dict of loaded storages compares it)."""
    try:
        return seen.get(key)
    except TypeError:  # unhashable: torch's dict lookup fails too
        raise FormatError(f"storage key of type {type(key).__name__} (not a valid key)") from None


def _storage_key(kind: str, key: Any) -> tuple:
    """A storage's key in the listing: the pickled key's text, and its type unless it is text (a file may hold
    storages ``'0'`` and ``0``: torch reads them as two storages of the one record)."""
    return (kind, str(key)) if type(key) is str else (kind, str(key), type(key).__name__)


def _check_record(info: zipfile.ZipInfo, numel: Any, dtype: str) -> None:
    """A storage record holds exactly the storage's bytes, in a form torch's reader reads, and a compressed one claims
    no more than deflate can produce from its size (the bytes read from it are bounded by ``numel``)."""
    if not isinstance(numel, int) or numel < 0 or numel * itemsize(dtype) != info.file_size:  # torch: "record size
        # (N bytes) does not match expected size": a longer record is refused too
        raise FormatError(f"storage '{info.filename}' claims {numel} {dtype} elements but its record holds "
                          f"{info.file_size} bytes")
    if info.compress_type not in TORCH_METHODS:
        raise FormatError(f"storage record '{info.filename}' is compressed with method {info.compress_type}, "
                          "which torch's reader refuses")
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > DEFLATE_RATIO * info.compress_size + 1024:
        raise FormatError(f"storage record '{info.filename}' claims {info.file_size} bytes from "
                          f"{info.compress_size} compressed: more than deflate can produce")


def _will_read(archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo | None]) -> None:
    """Tell the medium under ``archive`` which records are read next (``Blob.will_read``: a remote object
    fetches them at once, adjacent ones in one request; a local file ignores it). A record's local header is
    its fixed 30 bytes, its name and an extra field the central directory does not give: 256 bytes allowed."""
    blob = getattr(getattr(archive.fp, "raw", archive.fp), "blob", None)  # (a buffered file over a BlobFile)
    if blob is not None:
        blob.will_read([(i.header_offset, i.header_offset + 30 + len(i.orig_filename.encode("utf-8")) + 256
                         + i.compress_size) for i in infos if i is not None])


def _check_byteorder(archive: zipfile.ZipFile, info: zipfile.ZipInfo | None, path: str) -> None:
    """The ``byteorder`` record, as torch reads it: absent means little; exactly ``little`` or ``big``."""
    if info is None:
        return
    if info.file_size > 16:
        raise FormatError(f"{path}: unknown byte order (a {info.file_size} byte 'byteorder' record)")
    mark = read_record(archive, info.filename, path)
    if mark == b"big":
        raise FormatError(f"{path}: big-endian checkpoints are not supported")
    if mark != b"little":
        raise FormatError(f"{path}: unknown byte order {mark[:16]!r} (torch refuses it too)")


def record_data_offset(f: BinaryIO, info: zipfile.ZipInfo) -> int | None:
    """Where a stored (uncompressed) record's bytes start in the file; None if compressed."""
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    later = deferred_offset(f, info.header_offset)  # a remote object: located when the record is read
    if later is not None:
        return later
    f.seek(info.header_offset)
    head = f.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise FormatError(f"bad local header for zip record '{info.filename}'")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _stored_directory_offset(f: BinaryIO) -> int | None:
    """Where the end record says the central directory starts (zip64's record when there is one, as zipfile
    and miniz both take it); None when there is no end record to read."""
    f.seek(0, os.SEEK_END)
    size = f.tell()
    tail_len = min(size, 22 + 0xFFFF + 20)  # the end record, its longest comment, the zip64 locator
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    at = tail.rfind(b"PK\x05\x06")  # the last one, as zipfile searches
    if at < 0 or len(tail) - at < 22:
        return None
    offset = struct.unpack("<I", tail[at + 16:at + 20])[0]
    if at >= 20 and tail[at - 20:at - 16] == b"PK\x06\x07":  # zip64 locator: the zip64 end record's offset
        f.seek(struct.unpack("<Q", tail[at - 12:at - 4])[0])
        record = f.read(56)
        if len(record) != 56 or record[:4] != b"PK\x06\x06":
            return None
        offset = struct.unpack("<Q", record[48:56])[0]
    return offset


def check_directory_offset(archive: zipfile.ZipFile, path: str) -> None:
    """Refuse an archive whose central directory is not where its end record says.

    Python's zipfile then shifts every offset by the difference (it reads archives with bytes before them),
    while torch's reader takes the offsets as they are: the two would read different records, other tensor
    values, even another data.pkl (one that runs code), from the same file."""
    stored = _stored_directory_offset(archive.fp)
    if stored is None or stored != archive.start_dir:
        shift = "" if stored is None else f" ({archive.start_dir - stored} bytes from where its end record says)"
        raise FormatError(f"{path}: ambiguous zip: the central directory is not where torch's reader looks{shift}")


def read_zip(path: str, fileobj: BinaryIO | None = None,
             archive: Callable[[str, BinaryIO | None], TorchFile] | None = None) -> TorchFile:
    """A torch zip checkpoint read without running it: reads ``data.pkl`` and the zip directory only.

    ``fileobj``: the zip is these bytes (a record inside a DCP data file), ``path`` only names it. ``archive``
    reads a TorchScript archive (a ``constants.pkl`` record: ``torch.load`` hands it to ``torch.jit.load``),
    given by the caller (``torchscript`` reads archives with this module); without it one is refused."""
    try:
        archive = zipfile.ZipFile(fileobj if fileobj is not None else path)
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError) as e:  # e.g. "zip file version 6.4"
        raise FormatError(f"{path}: not a valid torch zip file ({type(e).__name__}: {e})") from None
    with archive:
        check_directory_offset(archive, path)
        prefix = zip_prefix(archive, path)
        records = {_fold(i.filename): i for i in archive.infolist()}  # looked up as torch's reader does
        info = records[_fold(prefix + "data.pkl")]
        if info.file_size > MAX_PICKLE:
            raise FormatError(f"{path}: data.pkl is {info.file_size} bytes, above the {MAX_PICKLE} byte limit")
        packed = [i.filename for i in records.values()
                  if _fold(i.filename).endswith(".pkl") and i.compress_type != zipfile.ZIP_STORED]
        if packed:  # torch stores every record as is; a compressed pickle is a decompression bomb's shape
            raise FormatError(f"{path}: compressed pickle record '{packed[0]}' (torch stores records uncompressed)")
        byteorder = records.get(_fold(prefix + "byteorder"))
        _will_read(archive, [info, byteorder])
        _check_byteorder(archive, byteorder, path)
        out = TorchFile(None, set())
        seen: dict[Hashable, StorageRef] = {}  # by the key as pickled, as torch's loaded_storages ('0' is not 0)

        def storage(pid: tuple) -> StorageRef:
            if len(pid) != 5:
                raise FormatError(f"malformed storage record {pid[:3]!r}")
            _, kind, key, location, numel = pid
            ref = _seen(seen, key)
            if ref is not None and ref.nbytes:
                return ref  # torch caches a storage with bytes by its key: the first reference's dtype
            dtype = storage_type(kind)
            record = records.get(_fold(f"{prefix}data/{key}"))
            if record is None:
                raise FormatError(f"storage record '{key}' is missing from the zip")
            _check_record(record, numel, dtype)
            ref = StorageRef(_storage_key("zip", key), dtype, numel, str(location))
            if _untyped(kind):
                untyped.add(ref.key)
            out.records[ref.key] = record.filename
            # an empty storage is not cached by torch: each reference keeps the dtype it names
            registered = seen.setdefault(key, ref)
            return registered if ref.nbytes else ref

        if any(i.filename == prefix + "constants.pkl" for i in records.values()):  # torch: exact name
            if archive is None:
                raise FormatError(f"{path}: a TorchScript archive, not a torch.save file")
            return archive(path, fileobj)  # torch.load hands it to torch.jit.load: its state dict, inertly
        data = read_record(archive, info.filename, path)
        untyped: set = set()
        out.root = _finish(_unpickle(data, storage, path, out.globals), untyped, out, path)
        _scan_other_pickles(archive, records, info.filename, path)
        inflated = sum(ref.nbytes for ref in seen.values()
                       if records[_fold(out.records[ref.key])].compress_type != zipfile.ZIP_STORED)
        size = archive.fp.seek(0, os.SEEK_END)
        if inflated > INFLATE_BUDGET + INFLATE_RATIO * size:
            raise FormatError(f"{path}: its compressed storage records expand to {inflated} bytes from a {size} byte "
                              "file (torch.save stores records uncompressed): refused as a decompression bomb")
        f = fileobj if fileobj is not None else open(path, "rb")
        try:
            for ref in seen.values():
                out.storages[ref.key] = ref
                out.data_offset[ref.key] = record_data_offset(f, records[_fold(out.records[ref.key])])
        finally:
            if fileobj is None:
                f.close()
    return out


class _AnyStorage(Hooks):
    """For pickles torch does not load (stray ``*.pkl`` records): only their global names matter."""

    def persistent_load(self, pid: Any) -> Any:
        return None


def _scan_other_pickles(archive: zipfile.ZipFile, records: dict, data_pkl: str, path: str) -> None:
    """Refuse, by name, a code-running global in any other pickle record of the archive: torch never loads
    those, but a scanner (and anyone unpacking the archive) would see them, and so should the user."""
    for info in records.values():
        name = info.filename
        if name == data_pkl or not _fold(name).endswith(".pkl") or info.file_size > MAX_PICKLE:
            continue
        try:
            unpickle(read_record(archive, name, path), _AnyStorage())
        except RefusedGlobal as e:
            raise RefusedGlobal(e.name, f"{path} (record {name})") from None
        except Exception:  # not a pickle, or a broken one: torch ignores the record, and so does paramtool
            continue


def read_zip_tree(path: str) -> Any:
    """The object tree of a torch zip checkpoint, tensors as ``FakeTensor``: reads ``data.pkl`` only."""
    return read_zip(path).root


def read_record(archive: zipfile.ZipFile, name: str, path: str) -> bytes:
    """A record's bytes, its CRC-32 not checked: torch's reader never checks it (files saved with
    ``compute_crc32 = False`` hold none, and torch loads them)."""
    try:
        with archive.open(name) as f:
            f._expected_crc = None  # zipfile's one switch for it (ZipExtFile._update_crc skips the check)
            return f.read()
    except Exception as e:  # BadZipFile, zlib.error, EOFError, NotImplementedError (odd compression), ...
        raise FormatError(f"{path}: zip record '{name}' cannot be read ({type(e).__name__}: {e})") from None


def _is_tar(path: str) -> bool:
    """Does the file open as a tar archive? torch.load tries that before the legacy pickle."""
    import tarfile

    try:
        with open_file(path) as f, tarfile.open(fileobj=f, mode="r:") as t:
            return t.next() is not None
    except (tarfile.TarError, OSError, ValueError, EOFError):
        return False


def read_legacy(path: str) -> TorchFile:
    """A legacy (pre-zip) torch file, or a bare pickle, read without running it; storages are not read."""
    if _is_tar(path):
        try:
            _read_legacy(path)
        except (FormatError, RefusedGlobal):
            raise FormatError(f"{path}: a tar archive (torch's oldest checkpoint format, not supported)") from None
        raise FormatError(f"{path}: ambiguous file: it is both a tar archive and a legacy torch pickle "
                          "(torch.load would read the tar)")
    return _read_legacy(path)


def _read_legacy(path: str) -> TorchFile:
    out = TorchFile(None, set())
    objects: dict[Hashable, StorageRef] = {}  # roots and views by key, one namespace, as torch's loader keeps them
    roots: dict[Hashable, StorageRef] = {}
    views: list[tuple[StorageRef, StorageRef, int]] = []  # (view, its root, byte offset into the root)

    def storage(pid: tuple) -> StorageRef:
        if len(pid) != 6:
            raise FormatError(f"malformed storage record {pid[:3]!r}")
        _, kind, key, location, numel, view = pid
        dtype = storage_type(kind)
        root = _seen(objects, key)
        if root is None:
            if not isinstance(numel, int) or numel < 0:
                raise FormatError(f"storage '{key}' has an invalid size")
            root = roots[key] = objects[key] = StorageRef(_storage_key("legacy", key), dtype, numel, str(location))
        elif not root.nbytes and view is None:  # an empty storage: each reference keeps its dtype (as torch's)
            return StorageRef(root.key, dtype, 0, str(location))
        if view is None:
            return root
        return _legacy_view(objects, views, root, view, dtype)

    def no_storage(pid: tuple) -> StorageRef:
        raise FormatError("unexpected storage reference before the checkpoint's header")

    with open_file(path) as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        magic = _unpickle(f, no_storage, path, out.globals)
        if magic != LEGACY_MAGIC:
            raise FormatError(f"{path}: a pickle, but not a torch checkpoint (no torch magic number)")
        protocol = _unpickle(f, no_storage, path, out.globals)
        if protocol != 1001:
            raise FormatError(f"{path}: unsupported legacy protocol version {protocol!r}")
        _unpickle(f, no_storage, path, out.globals)  # sys_info
        out.root = _finish(_unpickle(f, storage, path, out.globals), set(), out, path)
        keys = _unpickle(f, no_storage, path, out.globals)
        if (not isinstance(keys, list) or len(keys) != len(roots)
                or any(_seen(roots, k) is None for k in keys) or len({_storage_key("", k) for k in keys}) != len(keys)):
            raise FormatError(f"{path}: the storage list does not match the tensors")
        # each storage follows as an 8-byte element count and its bytes; torch sizes it by that count, so a
        # count that disagrees with the pickle would make two readers see two different tensors
        pos = f.tell()
        for key in keys:
            ref = roots[key]
            out.storages[ref.key] = ref
            out.data_offset[ref.key] = pos + 8
            if pos + 8 <= size:
                f.seek(pos)
                count = int.from_bytes(f.read(8), "little")
                if count != ref.numel:
                    raise FormatError(f"{path}: ambiguous file: storage '{key}' holds {count} elements by its own "
                                      f"header but {ref.numel} by the pickle")
            pos += 8 + ref.nbytes
        if pos > size:
            raise FormatError(f"{path}: truncated: the storages need {pos} bytes, the file has {size}")
        for ref, root, start in views:
            out.storages[ref.key] = ref
            out.data_offset[ref.key] = out.data_offset[root.key] + start
    return out


def _legacy_view(objects: dict[Hashable, StorageRef], views: list, root: StorageRef, view: Any,
                 dtype: str) -> StorageRef:
    """A legacy storage view ``(view_key, offset, size)``: ``size`` elements of ``dtype`` from element ``offset``
    of ``root``'s bytes, as torch's legacy loader slices it (a key seen before is that storage again)."""
    if not isinstance(view, tuple) or len(view) != 3:
        raise FormatError(f"malformed storage view record {str(view)[:60]}")
    view_key, offset, numel = view
    known = _seen(objects, view_key)
    if known is not None:
        return known
    if not (isinstance(offset, int) and isinstance(numel, int) and offset >= 0 and numel >= 0):
        raise FormatError(f"storage view '{view_key}' has an invalid offset or size")
    start, nbytes = offset * itemsize(dtype), numel * itemsize(dtype)
    if start + nbytes > root.nbytes:
        raise FormatError(f"storage view '{view_key}' ends beyond its storage '{root.key[1]}'")
    ref = objects[view_key] = StorageRef(("legacy", root.key, "view", str(view_key)), dtype, numel, root.location)
    views.append((ref, root, start))
    return ref


def read_legacy_tree(path: str) -> Any:
    """The object tree of a legacy (pre-zip) torch file, or of a bare pickle; storages are not read."""
    return read_legacy(path).root


def read_torch(path: str, fmt: str, archive: Callable[[str, BinaryIO | None], TorchFile] | None = None) -> TorchFile:
    """A torch file in format ``fmt`` (``pt``: zip; else legacy) read without running it; ``archive``: as in
    ``read_zip``."""
    if fmt != "pt":
        return read_legacy(path)
    with open_file(path) as f:  # a local file, or a remote object read by range (``blob``)
        return read_zip(path, f, archive)


@dataclass(frozen=True)
class TorchFormat(Format):
    """torch.save files, zip (``pt``) or legacy (``pt-legacy``): read without running them (this module), tensors
    rebuilt and written by ``formats.pt``."""

    archive: Format | None = None  # the format a torch zip is read as when it is its archive (TorchScript)

    def reads_by_range(self, listing: Checkpoint) -> bool:
        """As its format says, unless a zip storage record is compressed (torch never writes one, but reads it:
        then it is loaded whole), or a tensor is more than a view of its bytes (``whole``: torch rebuilds it, as
        ``torch.load`` does)."""
        return self.byte_ranges and not listing.whole \
            and not any(offset is None for offset, _ in (listing.located or {}).values())

    def open_storages(self, listing: Checkpoint) -> StorageFile | None:
        if not self.byte_ranges:  # the legacy format: storages follow the pickle, read with it
            return None
        from .remote_storage import storage_class
        from .storage import ZipStorageFile

        return storage_class(ZipStorageFile, listing.path).open(listing.path, listing.toc(), listing.root, listing.located,
                                                               zip_prefix)

    def sniff(self, head: bytes, size: int) -> bool:
        return sniff_torch(head) == self.name

    def read_listing(self, label: str, path: str, key: str | None) -> Checkpoint:
        listing, ckpt = self._read(label, path, key, None)
        ckpt.located = {k: (listing.data_offset.get(k), listing.records.get(k, "")) for k in listing.storages}
        ckpt.whole = listing.whole
        return ckpt

    def load(self, label: str, path: str, key: str | None) -> Checkpoint:
        from . import pt

        return self._read(label, path, key, pt.load)[1]

    def _read(self, label: str, path: str, key: str | None,
              load: Callable[[str, TorchFile], Any] | None) -> tuple[TorchFile, Checkpoint]:
        """The file read without running it (``TorchFile``: refuses a hostile pickle, locates every storage),
        and its checkpoint: stand-in tensors, or real ones from ``load(path, listing)``."""
        from ..checkpoint import named

        listing = read_torch(path, self.name, None if self.archive is None else self.archive.archive_listing)
        ckpt = named(label, self, listing.root if load is None else load(path, listing), path, key)
        ckpt.globals = sorted(listing.globals)
        return listing, ckpt

    def save(self, root: Any, metadata: dict[str, str] | None, path: str) -> None:
        """torch.save's zip format (``pt.save``); a pickle keeps no header metadata."""
        from . import pt

        pt.save(root, path)

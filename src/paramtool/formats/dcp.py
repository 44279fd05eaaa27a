"""torch.distributed.checkpoint (DCP) directories: ``.metadata`` plus ``__R_S.distcp`` files.

``.metadata`` is a pickle, and torch's own ``FileSystemReader.read_metadata`` unpickles it without any
allowlist. Here it is read twice over the same bytes: first by a stand-in unpickler with an exact allowlist
(no torch; this is what listing uses, and what refuses a hostile file), then, for loading, by an unpickler
that maps the same allowlisted names, and only those, to torch's real classes. Tensor data is read and
written by torch's DCP machinery itself; non-tensor entries are read with ``weights_only=True``.
"""
from __future__ import annotations

import io
import os
import pickle
import warnings
from typing import Any

from ..errors import FormatError, ParamtoolError, RefusedGlobal
from ..toc import FakeTensor, StorageRef, contiguous_stride, numel_of

MAX_METADATA = 256 * 1024 * 1024
_MD = "torch.distributed.checkpoint.metadata"

# Exactly the globals a DCP .metadata file names.
ALLOWED = frozenset({
    f"{_MD}.Metadata", f"{_MD}.TensorStorageMetadata", f"{_MD}.BytesStorageMetadata",
    f"{_MD}.ChunkStorageMetadata", f"{_MD}.TensorProperties", f"{_MD}.MetadataIndex", f"{_MD}.StorageMeta",
    f"{_MD}._MEM_FORMAT_ENCODING", "torch.distributed.checkpoint.filesystem._StorageInfo",
    "torch.serialization._get_layout", "torch.Size", "pathlib.PosixPath", "pathlib.WindowsPath",
    "pathlib.PurePosixPath", "collections.OrderedDict",
}) | {f"torch.{d}" for d in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                              "uint8", "bool", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2")}


class _Record:
    """Stand-in for a DCP metadata dataclass: keeps whatever state pickle gives it."""

    def __init__(self, cls: str) -> None:
        self.cls = cls
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def get(self, field: str, position: int | None = None) -> Any:
        if isinstance(self.state, dict):
            return self.state.get(field)
        if isinstance(self.state, tuple) and len(self.state) == 2 and isinstance(self.state[1], dict):
            return self.state[1].get(field)  # (dict state, slot state)
        if isinstance(self.state, tuple) and position is not None and position < len(self.state):
            return self.state[position]
        return None


def _record_class(dotted: str) -> type:
    def __new__(klass: type, *args: Any) -> _Record:
        obj = object.__new__(klass)
        _Record.__init__(obj, dotted)
        if args:
            obj.state = args
        return obj

    return type(dotted.rsplit(".", 1)[-1], (_Record,), {"__new__": __new__})


def _stand_in(dotted: str) -> Any:
    if dotted == "collections.OrderedDict":
        import collections

        return collections.OrderedDict
    if dotted == "torch.Size":
        return tuple
    if dotted.startswith("pathlib."):
        return lambda *parts: "/".join(str(p) for p in parts)
    if dotted in ("torch.serialization._get_layout", f"{_MD}._MEM_FORMAT_ENCODING"):
        return lambda *args: f"{dotted}{args}"
    if dotted.startswith("torch.") and dotted.count(".") == 1:
        return dotted  # a dtype: kept as its name
    return _record_class(dotted)


class _ListingUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        dotted = f"{module}.{name}"
        if dotted not in ALLOWED:
            raise RefusedGlobal(dotted)
        return _stand_in(dotted)


class _RealUnpickler(pickle.Unpickler):
    """The same allowlist, resolving to torch's real classes (used only after the listing pass accepted)."""

    def find_class(self, module: str, name: str) -> Any:
        if f"{module}.{name}" not in ALLOWED:
            raise RefusedGlobal(f"{module}.{name}")
        return super().find_class(module, name)


def _read_bytes(directory: str) -> bytes:
    path = os.path.join(directory, ".metadata")
    try:
        size = os.path.getsize(path)
        if size > MAX_METADATA:
            raise FormatError(f"{path}: {size} bytes, above the {MAX_METADATA} byte limit")
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None


def _unpickle(cls: type, data: bytes, path: str) -> Any:
    try:
        return cls(io.BytesIO(data)).load()
    except RefusedGlobal as e:
        raise RefusedGlobal(e.name, path) from None
    except Exception as e:
        raise FormatError(f"{path}: not a readable DCP .metadata ({type(e).__name__}: {str(e)[:100]})") from None


def read_tree(directory: str) -> Any:
    """The checkpoint's nested structure with ``FakeTensor`` leaves (non-tensor entries as "<bytes>")."""
    path = os.path.join(directory, ".metadata")
    md = _unpickle(_ListingUnpickler, _read_bytes(directory), path)
    if not isinstance(md, _Record) or not isinstance(md.get("state_dict_metadata"), dict):
        raise FormatError(f"{path}: not a torch.distributed.checkpoint Metadata object")
    planner = md.get("planner_data")
    root: dict = {}
    for fqn, entry in md.get("state_dict_metadata").items():
        where = tuple(planner[fqn]) if isinstance(planner, dict) and fqn in planner else (fqn,)
        value: Any = "<bytes>"
        if isinstance(entry, _Record) and entry.cls.endswith("TensorStorageMetadata"):
            props = entry.get("properties")
            dtype = props.get("dtype", 0) if isinstance(props, _Record) else None
            shape = tuple(int(d) for d in (entry.get("size") or ()))
            if not isinstance(dtype, str):
                raise FormatError(f"{path}: tensor '{fqn}' has no dtype")
            dtype = dtype.removeprefix("torch.")
            numel = numel_of(shape)
            value = FakeTensor(StorageRef(("dcp", fqn), dtype, numel), 0, shape, contiguous_stride(shape), dtype)
        node = root
        for part in where[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise FormatError(f"{path}: entry '{fqn}' nests inside a non-container")
        node[where[-1]] = value
    return _lists(root)


def _only(root: Any, path: tuple) -> Any:
    """``root`` cut down to the sub-tree at ``path`` (nesting kept); the whole of it when a list is on the way
    (DCP keys a list's items by position, which a cut-down list cannot keep)."""
    node, kept = root, {}
    out = kept
    for i, key in enumerate(path):
        if not isinstance(node, dict) or key not in node:
            return root
        node = node[key]
        out[key] = node if i == len(path) - 1 else {}
        out = out[key]
    return kept if path else root


def _lists(node: Any) -> Any:
    """Turn back into lists the containers DCP flattened from lists.

    DCP's planner paths spell a mapping key as a string and a list index as an int, so a node whose keys are
    the ints 0..n-1 was a list (an optimizer's ``param_groups``, Lightning's ``optimizer_states``). Kept as a
    dict keyed by ints, it would be saved back under the string keys and loaded as both ``0`` and ``'0'``.
    """
    if not isinstance(node, dict):
        return node
    out = {k: _lists(v) for k, v in node.items()}
    if out and all(type(k) is int for k in out) and sorted(out) == list(range(len(out))):
        return [out[i] for i in range(len(out))]
    return out


def _reader(directory: str) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class AllowlistReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            data = _read_bytes(directory)
            path = os.path.join(directory, ".metadata")
            _unpickle(_ListingUnpickler, data, path)  # refuses before any real class is touched
            metadata = _unpickle(_RealUnpickler, data, path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return AllowlistReader(directory)


def _planner() -> Any:
    import torch
    from torch.distributed.checkpoint import DefaultLoadPlanner

    from .torchfile import torch_safe_globals

    class WeightsOnlyPlanner(DefaultLoadPlanner):
        """Non-tensor entries are torch.save bytes: read them under the weights-only rules, never plain pickle."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            with torch.serialization.safe_globals(torch_safe_globals()):
                try:
                    obj = torch.load(value, weights_only=True)
                except pickle.UnpicklingError as e:
                    raise FormatError(f"DCP entry '{read_item.dest_index.fqn}' refused: {str(e).splitlines()[0]}") from None
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element  # what the base class uses

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return WeightsOnlyPlanner()


def _check_sizes(directory: str, skeleton: Any) -> None:
    """Refuse, before allocating, tensors that could not come from the data files on disk."""
    from ..toc import itemsize
    from ..tree import walk

    on_disk = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".distcp"))
    needed = sum(t.numel * itemsize(t.dtype) for _, t in walk(skeleton))
    if needed > on_disk:
        raise FormatError(f"{directory}: .metadata describes {needed} bytes of tensors but the .distcp files hold "
                          f"{on_disk}")


def load(directory: str, only: tuple = ()) -> Any:
    """The whole checkpoint as nested dicts of real tensors and values, read by torch's DCP reader.

    ``only`` (a path of mapping keys) reads just that sub-tree, within the same nesting: ``inspect --key
    hyper_parameters`` does not read every tensor of a large checkpoint.
    """
    import torch
    import torch.distributed.checkpoint as dcp

    skeleton = _only(read_tree(directory), only)

    def fill(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: fill(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fill(v) for v in node]
        if isinstance(node, FakeTensor):
            return torch.empty(node.shape, dtype=getattr(torch, node.dtype))
        return None  # a non-tensor entry: DCP puts the loaded value here

    _check_sizes(directory, skeleton)
    state = fill(skeleton)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is disabled ... assuming a single process"
            dcp.load(state, storage_reader=_reader(directory), planner=_planner())
    except (RefusedGlobal, FormatError):
        raise
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # torch's CheckpointException is a BaseException
        raise FormatError(f"{directory}: cannot load the distributed checkpoint: {_failure(e)}") from None
    return state


def _failure(e: BaseException) -> str:
    """One line for what went wrong: for a ``CheckpointException``, the first rank's own exception."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        inner = inner[0] if isinstance(inner, tuple) and inner else inner
        if isinstance(inner, BaseException):
            from ..errors import ParamtoolError

            if isinstance(inner, ParamtoolError):
                return str(inner)
            e = inner
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


def save(state: Any, directory: str) -> None:
    """Write ``state`` as a DCP directory with torch's own writer (single process)."""
    import torch.distributed.checkpoint as dcp

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is disabled ... assuming a single process"
            dcp.save(state, storage_writer=dcp.FileSystemWriter(directory))
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # torch's CheckpointException is a BaseException wrapping each rank's error
        raise _write_failure(e, directory) from None


def _write_failure(exc: BaseException, directory: str) -> BaseException:
    """A DCP writer failure as the ``OSError`` behind it (the caller reports it with the target), else one line."""
    from ..fsops import write_error

    failures = getattr(exc, "failures", None)
    inner = exc
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        inner = first[0] if isinstance(first, tuple) and first else first
    found = write_error(inner, directory) if isinstance(inner, BaseException) else None
    if found is not None:
        return found
    return FormatError(f"cannot write the distributed checkpoint: {_failure(exc)}")

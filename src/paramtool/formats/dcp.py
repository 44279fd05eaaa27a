"""torch.distributed.checkpoint (DCP) directories: ``.metadata`` plus ``__R_S.distcp`` files.

``.metadata`` is a pickle, and torch's own ``FileSystemReader.read_metadata`` unpickles it without any
allowlist. Here it is read by the inert unpickler (nothing it names is built or called; its dataclasses stay
``Inert`` records read by field). Tensor data is read by paramtool too: each item of a data file is the byte
range ``.metadata`` gives (resolved inside the checkpoint directory, or refused), holding a ``torch.save`` zip
that the torch-file reader lists and rebuilds, or raw bytes. Non-tensor entries are such zips as well, read
the same way: never ``torch.load``. Values are read one tensor entry at a time (``Entries``: the value
commands' checkpoint, ``load_lazy``, and a streamed ``convert``), each item read once into the memory its
tensor uses. Writing uses torch's DCP writer.
"""
from __future__ import annotations

import io
import os
import warnings

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable, Hashable
    from typing import Any

    from ..toc import Toc

from .. import blob
from ..checkpoint import Checkpoint, named
from ..errors import FormatError, RefusedGlobal, first_line
from ..toc import FakeTensor, StorageRef, contiguous_stride, itemsize, numel_within
from .torchfile import MAX_DEPTH
from .unpickle import Global, Inert, unpickle
from . import pins
from .base import Format

MAX_METADATA = 256 * 1024 * 1024
DATA_PREFIX = "__"  # data files are named {DATA_PREFIX}{rank}_{n}.distcp (torch's own names; a rewrite in a
                    # bucket, ``remote.stage``, picks new ones: the old .metadata's files stay until it is replaced)


def _read_bytes(directory: str) -> bytes:
    path = os.path.join(directory, ".metadata")
    try:
        return blob.read_bytes(path, MAX_METADATA)  # (a local file is pinned as it is opened: formats.pins)
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None


def _metadata(directory: str) -> Inert:
    path = os.path.join(directory, ".metadata")
    try:
        md, _ = unpickle(_read_bytes(directory))
    except RefusedGlobal as e:
        raise RefusedGlobal(e.name, path) from None
    except FormatError as e:
        raise FormatError(f"{path}: not a readable DCP .metadata ({e})") from None
    except Exception as e:
        raise FormatError(f"{path}: not a readable DCP .metadata ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(md, Inert) or not isinstance(md.field("state_dict_metadata"), dict):
        raise FormatError(f"{path}: not a torch.distributed.checkpoint Metadata object")
    return md


def _dtype_name(value: Any) -> str | None:
    if isinstance(value, Global) and value.module == "torch":
        return value.qualname
    return None


def _entries(directory: str, md: Inert) -> list[tuple[str, tuple, Any]]:
    """(fqn, where in the nested state, tensor entry or None for a non-tensor entry)."""
    path = os.path.join(directory, ".metadata")
    planner = md.field("planner_data")
    out = []
    for fqn, entry in md.field("state_dict_metadata").items():
        if not isinstance(fqn, str):
            raise FormatError(f"{path}: an entry name that is not text")
        where = tuple(planner[fqn]) if isinstance(planner, dict) and isinstance(planner.get(fqn), (list, tuple)) \
            and planner[fqn] else (fqn,)
        if len(where) > MAX_DEPTH or not all(type(part) in (str, int) for part in where):
            raise FormatError(f"{path}: entry '{fqn[:80]}' has an invalid place in the checkpoint")
        tensor = isinstance(entry, Inert) and entry.name.endswith("TensorStorageMetadata")
        out.append((fqn, where, entry if tensor else None))
    return out


def _fake(path: str, fqn: str, entry: Inert) -> FakeTensor:
    props = entry.field("properties")
    dtype = _dtype_name(props.field("dtype", 0)) if isinstance(props, Inert) else None
    if dtype is None:
        raise FormatError(f"{path}: tensor '{fqn}' has no dtype")
    size = entry.field("size")
    if not isinstance(size, tuple) or not all(isinstance(d, int) and 0 <= d < 1 << 63 for d in size):
        raise FormatError(f"{path}: tensor '{fqn}' has an invalid size")
    numel = numel_within(size, (1 << 63) - 1)  # multiplied as checked: thousands of huge dimensions stop at once
    if numel is None:
        raise FormatError(f"{path}: tensor '{fqn}' has more elements than torch can hold")
    return FakeTensor(StorageRef(("dcp", fqn), dtype, numel), 0, size, contiguous_stride(size), dtype)


def read_tree(directory: str) -> Any:
    """The checkpoint's nested structure with ``FakeTensor`` leaves (non-tensor entries as "<bytes>")."""
    path = os.path.join(directory, ".metadata")
    md = _metadata(directory)
    root: dict = {}
    for fqn, where, entry in _entries(directory, md):
        _place(path, root, fqn, where, _fake(path, fqn, entry) if entry is not None else "<bytes>")
    _check_paths(directory, md)
    return _lists(root)


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


def _place(path: str, root: dict, fqn: str, where: tuple, value: Any) -> None:
    node = root
    for part in where[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise FormatError(f"{path}: entry '{fqn}' nests inside a non-container")
    node[where[-1]] = value


def resolve_inside(directory: str, name: Any, what: str, file_link_ok: bool = False, entry: bool = False) -> str:
    """``directory/name`` if it stays inside ``directory`` (no absolute path, no ``..``, no symlink out).

    ``file_link_ok``: the file itself may be a symlink to a file in the same tree (``link_root``: a Hugging
    Face cache snapshot links each file to its blob in the repository's cache folder); the directories on the
    way must still stay inside ``directory``. ``entry``: the directory entry itself is meant (to remove or
    replace it, never followed): only the directories on the way are checked."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise FormatError(f"{directory}: {what} {str(name)[:80]!r} is not a file name")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith("\\") or ".." in parts or (parts and ":" in parts[0]):
        raise FormatError(f"{directory}: {what} '{name}' points outside the checkpoint directory")
    full = os.path.join(directory, name)
    if blob.is_remote(directory):  # (a bucket or a server has no symbolic links)
        return full
    real_dir = os.path.realpath(directory)
    if not _within(real_dir, os.path.realpath(os.path.dirname(full) if file_link_ok or entry else full)):
        raise FormatError(f"{directory}: {what} '{name}' leads outside the checkpoint directory (a symlink)")
    if file_link_ok and not entry and not _within(link_root(real_dir), os.path.realpath(full)):
        raise FormatError(f"{directory}: {what} '{name}' is a symlink to {os.path.realpath(full)}, outside the "
                          "checkpoint directory: paramtool reads nothing outside it (copy the file in instead)")
    return full


def _within(root: str, path: str) -> bool:
    return os.path.commonpath([root, path]) == root


def link_root(real_dir: str) -> str:
    """Where the files of ``real_dir`` may link to: the directory itself, or, for a Hugging Face cache snapshot
    (``models--org--name/snapshots/REV``, beside ``blobs``), the repository's cache folder."""
    parent = os.path.dirname(real_dir)
    repo = os.path.dirname(parent)
    if os.path.basename(parent) == "snapshots" and os.path.isdir(os.path.join(repo, "blobs")):
        return repo
    return real_dir


def _storage(md: Inert) -> list[tuple[Any, Any]]:
    data = md.field("storage_data")
    if not isinstance(data, dict):
        raise FormatError("the .metadata has no storage_data")
    return list(data.items())


def _check_paths(directory: str, md: Inert) -> None:
    for _, info in _storage(md):
        relative = info.field("relative_path", 0) if isinstance(info, Inert) else None
        resolve_inside(directory, relative, "relative_path")


def _items(directory: str, md: Inert) -> dict[str, list[tuple[tuple, str, int, int]]]:
    """fqn -> [(chunk offset, data file, byte offset, byte length)], every path checked."""
    out: dict[str, list] = {}
    for index, info in _storage(md):
        if not isinstance(index, Inert) or not isinstance(info, Inert):
            raise FormatError(f"{directory}: malformed storage_data entry")
        fqn = index.field("fqn", 0)
        offset = index.field("offset", 1)
        relative, start, length = (info.field("relative_path", 0), info.field("offset", 1),
                                   info.field("length", 2))
        if info.field("transform_descriptors", 3):
            raise FormatError(f"{directory}: entry '{fqn}' is stored with transforms (not supported)")
        if not isinstance(fqn, str):
            raise FormatError(f"{directory}: a storage_data entry whose name is not text")
        full = resolve_inside(directory, relative, "relative_path")
        if not all(isinstance(v, int) and v >= 0 for v in (start, length)):
            raise FormatError(f"{directory}: entry '{fqn}' has an invalid byte range")
        if start + length > _size(full):  # before anything is allocated for it
            raise FormatError(f"{full}: truncated: entry '{fqn[:80]}' ends beyond the file")
        out.setdefault(fqn, []).append((tuple(offset) if isinstance(offset, (tuple, list)) else None,
                                        full, start, length))
    return out


def _size(path: str) -> int:
    try:
        return blob.size(path)
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None


def _read_range(path: str, start: int, length: int) -> bytearray:
    """The item's bytes, read straight into the writable buffer its tensors are then built over (one copy)."""
    data = bytearray(length)
    try:
        with blob.open_blob(path) as f:
            # the directory may have been exchanged for a new one (an --in-place commit) since its .metadata
            # was read: then its .metadata is another file, and these bytes belong to another checkpoint
            pins.opened(os.path.join(os.path.dirname(path), ".metadata"))
            done = f.pread_into(data, start)
    except OSError as e:
        pins.opened(os.path.join(os.path.dirname(path), ".metadata"))  # (gone with a directory replaced)
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
    if done != length:
        raise pins.short_read(path, "an item")
    return data


class _BufferFile(io.RawIOBase):
    """A read-only file over a buffer that is not copied (``io.BytesIO`` copies a bytearray): the zip reader
    reads an item's directory and pickle from it while its tensors are built over the same buffer."""

    def __init__(self, data: bytearray) -> None:
        super().__init__()
        self._view, self._pos = memoryview(data), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), len(self._view) - self._pos))
        b[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = max(0, offset + (0, self._pos, len(self._view))[whence])
        return self._pos

    def tell(self) -> int:
        return self._pos


def _unzip_object(data: bytearray, label: str) -> Any:
    """A ``torch.save`` blob (one DCP item) read by the torch-file reader and rebuilt by paramtool over the
    same bytes (no copy)."""
    from . import pt, torchfile
    from .torchscript import read_archive

    listing = torchfile.read_zip(label, _BufferFile(data), lambda path, f: read_archive(path, f)[0])
    return pt.materialize(listing, data, label, _BufferFile(data))


def load(directory: str, only: tuple = ()) -> Any:
    """The whole checkpoint as nested dicts of real tensors and values, every byte read by paramtool.

    ``only`` (a path of mapping keys) reads just that sub-tree, within the same nesting: ``inspect --key
    hyper_parameters`` does not read every tensor of a large checkpoint.
    """
    md = _metadata(directory)
    items = _items(directory, md)
    try:
        return _lists(_load_entries(directory, md, items, tuple(only)))
    except (RuntimeError, ValueError, TypeError, IndexError) as e:  # a chunk torch cannot place
        raise FormatError(f"{directory}: cannot load the distributed checkpoint ({type(e).__name__}: "
                          f"{first_line(e, 160)})") from None


def _load_entries(directory: str, md: Inert, items: dict, only: tuple = (),
                  tensor: Callable[[str, str, Inert, list], Any] | None = None) -> dict:
    """The nested state, every non-tensor entry read; a tensor entry is ``tensor(directory, fqn, entry,
    chunks)``: ``read_tensor`` (its data), or a stand-in to read later (``Entries``)."""
    path = os.path.join(directory, ".metadata")
    state: dict = {}
    entries = _entries(directory, md)
    inside = [e for e in entries if tuple(e[1][:len(only)]) == only]
    for fqn, where, entry in inside or entries:  # a path that names nothing (a list on the way): everything
        label = f"{directory}: entry '{fqn}'"
        chunks = items.get(fqn)
        if not chunks:
            raise FormatError(f"{path}: entry '{fqn}' has no data")
        if entry is None:
            _, file, start, length = chunks[0]
            value = _unzip_object(_read_range(file, start, length), label)
        else:
            value = (tensor or read_tensor)(directory, fqn, entry, chunks)
        _place(path, state, fqn, where, value)
    return state


def read_tensor(directory: str, fqn: str, entry: Inert, chunks: list[tuple[tuple, str, int, int]]) -> Any:
    """One tensor entry (``_entries``' entry, ``_items``' chunks), every chunk read and placed: what
    ``load`` does per tensor, and what a streamed convert reads one storage at a time."""
    import torch

    path = os.path.join(directory, ".metadata")
    label = f"{directory}: entry '{fqn}'"
    if not chunks:
        raise FormatError(f"{path}: entry '{fqn}' has no data")
    fake = _fake(path, fqn, entry)
    if fake.numel * itemsize(fake.dtype) > sum(c[3] for c in chunks):  # before allocating anything
        raise FormatError(f"{label}: .metadata describes more bytes than its data files hold")
    dtype = getattr(torch, fake.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise FormatError(f"{label}: unsupported dtype {fake.dtype}")
    value = torch.empty(fake.shape, dtype=dtype) if len(chunks) > 1 else None
    for offset, file, start, length in chunks:
        data = _read_range(file, start, length)
        if data[:4] == b"PK\x03\x04":
            part = _unzip_object(data, label)
        else:  # SAFETENSORS serialization: the raw bytes of the chunk
            part = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype) if data else \
                torch.empty(0, dtype=dtype)
        if not isinstance(part, torch.Tensor) or part.dtype != dtype:
            raise FormatError(f"{label}: its data is not a {fake.dtype} tensor")
        if len(chunks) == 1:
            if part.numel() != fake.numel:
                raise FormatError(f"{label}: its data holds {part.numel()} elements, not {fake.numel}")
            value = part.reshape(fake.shape)
        else:
            if offset is None or len(offset) != len(fake.shape):
                raise FormatError(f"{label}: a chunk without a valid offset")
            view = value
            for dim, (o, n) in enumerate(zip(offset, part.shape if part.dim() == len(offset) else ())):
                view = view.narrow(dim, o, n)
            if part.dim() != len(offset) or view.shape != part.shape:
                raise FormatError(f"{label}: a chunk that does not fit the tensor")
            view.copy_(part)
    return value


class Entries:
    """A DCP checkpoint's tensor entries read one at a time, on request: ``.metadata`` read (and every item's
    path and byte range checked) once. What the value commands (``load_lazy``) and a streamed ``convert``
    read from, so memory stays near one entry, never the checkpoint. Storage keys are the listing's
    ``("dcp", fqn)``; pool threads may read different entries at once."""

    dtype = None  # (no dtype by key before an entry is read: ``Format.open_entries``)

    def __init__(self, directory: str) -> None:
        import torch  # noqa: F401  now, not on a pool thread: another one would meet a half-imported torch

        from .storage import release_freed_memory

        release_freed_memory()  # entry-sized buffers go back to the system when freed (see there)
        self.directory = directory
        self._md = _metadata(directory)
        self._items = _items(directory, self._md)
        self._tensors = {fqn: entry for fqn, _, entry in _entries(directory, self._md) if entry is not None}

    def tree(self) -> Any:
        """The nested state as ``load`` gives it, except that each tensor entry is its stand-in
        (``FakeTensor``): the non-tensor entries (step, epoch, hyper-parameters) are read now, so names and
        ``--key`` resolve exactly as on the loaded checkpoint."""
        path = os.path.join(self.directory, ".metadata")
        return _lists(_load_entries(self.directory, self._md, self._items, (),
                                    lambda _, fqn, entry, chunks: _fake(path, fqn, entry)))

    def nbytes(self, key: Hashable) -> int:
        return _fake(os.path.join(self.directory, ".metadata"), key[1], self._tensors[key[1]]).storage.nbytes

    def read_entry(self, fqn: str) -> Any:
        """The entry's tensor, its chunks read and placed (``read_tensor``)."""
        if fqn not in self._tensors:
            raise FormatError(f"{self.directory}: no tensor entry '{fqn[:80]}'")
        try:
            return read_tensor(self.directory, fqn, self._tensors[fqn], self._items.get(fqn, []))
        except (RuntimeError, ValueError, TypeError, IndexError) as e:  # a chunk torch cannot place
            raise FormatError(f"{self.directory}: cannot read '{fqn}': {first_line(e, 200)}") from None

    def read_storage(self, key: Hashable) -> Any:
        """Storage ``key`` as a contiguous 1-D tensor of its dtype (what a streamed writer takes)."""
        return self.read_entry(key[1]).reshape(-1)

    def tensor(self, fake: FakeTensor) -> Any:
        """The real tensor a stand-in of ``tree()`` describes: its entry read, viewed as the stand-in says."""
        value = self.read_entry(fake.storage.key[1])
        if fake.offset == 0 and tuple(value.shape) == tuple(fake.shape) and \
                tuple(fake.stride) == contiguous_stride(fake.shape):
            return value  # the entry itself, as ``load`` gives it
        return value.reshape(-1).as_strided(fake.shape, fake.stride, fake.offset)

    def close(self) -> None:
        """Nothing stays open between reads."""


def load_lazy(label: str, path: str, key: str | None, fmt: Format) -> EntryCheckpoint:
    """The checkpoint as ``load`` gives it (non-tensor entries read, names and ``--key`` the same) whose
    tensors are read one entry at a time when asked for (``EntryCheckpoint``)."""
    entries = Entries(path)
    ckpt = named(label, fmt, entries.tree(), path, key, EntryCheckpoint)
    ckpt.entries = entries
    return ckpt


class EntryCheckpoint(Checkpoint):
    """A DCP checkpoint whose tensors are stand-ins read on request, one entry at a time; a tensor held inside
    a non-tensor entry (a pickled tuple) was read with that entry and is already real."""

    entries: Entries | None = None

    def tensor(self, name: str) -> Any:
        value = super().tensor(name)
        return self.entries.tensor(value) if isinstance(value, FakeTensor) else value


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
    """Write ``state`` as a DCP directory with torch's own writer (single process). Non-tensor entries are
    torch.save'd with paramtool's pickler, so objects read as inert records go back as they came."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultSavePlanner
    from torch.distributed.checkpoint.planner import WriteItemType

    from .pt import PickleModule

    class Planner(DefaultSavePlanner):
        def transform_object(self, write_item: Any, object: Any) -> Any:
            if write_item.type == WriteItemType.BYTE_IO:
                buf = io.BytesIO()
                torch.save(object, buf, pickle_module=PickleModule)
                return buf
            return object

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is disabled ... assuming a single process"
            dcp.save(state, storage_writer=_writer(directory), planner=Planner())
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # torch's CheckpointException is a BaseException wrapping each rank's error
        raise _write_failure(e, directory) from None


def _writer(directory: str) -> Any:
    """torch's ``FileSystemWriter``, naming its data files after ``DATA_PREFIX``."""
    import dataclasses

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import _StoragePrefix

    class Writer(dcp.FileSystemWriter):
        def prepare_global_plan(self, plans: list) -> list:
            return [dataclasses.replace(plan, storage_data=_StoragePrefix(f"{DATA_PREFIX}{i}_"))
                    if plan.storage_data is None else plan for i, plan in enumerate(plans)]

    return Writer(directory) if DATA_PREFIX != "__" else dcp.FileSystemWriter(directory)


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


def only_tensors(root: Any) -> bool:
    """Containers of stand-in tensors only: nothing a DCP listing holds as a placeholder ("<bytes>")."""
    if isinstance(root, FakeTensor):
        return True
    if type(root) is dict:
        return all(only_tensors(v) for v in root.values())
    if type(root) is list:
        return all(only_tensors(v) for v in root)
    return False


def torch_names() -> None:
    """Data files under torch's own names again (``DcpFormat.name_files_apart``)."""
    global DATA_PREFIX
    DATA_PREFIX = "__"


class DcpFormat(Format):
    """A ``torch.distributed.checkpoint`` directory: a container over its data files, non-tensor values kept
    there (this module)."""

    def open_entries(self, listing: Checkpoint) -> Entries:
        """Not byte ranges: each tensor entry read whole, one at a time (``Entries``)."""
        return Entries(listing.path)

    def streams_root(self, listing: Checkpoint, root: Any) -> bool:
        """Not where non-tensor entries are placeholders in the listing (kept in the data files), nor a ``--key``
        sub-tree (a load reads only it)."""
        return only_tensors(root) and not (listing.key and root is listing.root)

    def load_lazy(self, label: str, path: str, key: str | None) -> Checkpoint:
        """The checkpoint ``load`` gives, with each tensor entry read only when asked for."""
        return load_lazy(label, path, key, self)

    def read_listing(self, label: str, path: str, key: str | None) -> Checkpoint:
        return named(label, self, read_tree(path), path, key)

    def toc_of(self, listing: Checkpoint, key: str | None) -> Toc:
        """A ``--key`` sub-tree the listing shows no tensor of may be a non-tensor value kept in the data files
        (a stand-in in the listing): read from there."""
        if key and not listing.names:
            return self.load(listing.source, listing.path, key, within=listing).toc()
        return listing.toc()

    def files_of(self, path: str) -> tuple[list[str], None]:
        """The whole directory: every file in it."""
        return [os.path.join(path, n) for n in blob.listdir(path) if blob.isfile(os.path.join(path, n))], None

    def name_files_apart(self) -> Callable[[], None]:
        """New data files under names the old ``.metadata`` has not (the old ones stay until the new ``.metadata``
        replaces it); torch's own names again through the returned ``torch_names``."""
        import secrets

        global DATA_PREFIX
        DATA_PREFIX = f"__{secrets.token_hex(4)}_"
        return torch_names

    def load(self, label: str, path: str, key: str | None, within: Checkpoint | None = None) -> Checkpoint:
        """``within``: a listing of this checkpoint whose ``--key`` sub-tree alone is read."""
        from .. import tree

        root = load(path) if within is None else load(path, tree.find_key(within.root, key))
        return named(label, self, root, path, key)

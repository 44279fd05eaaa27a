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

from ..blob import deferred_offset, open_file
from ..errors import FormatError, RefusedGlobal
from ..records import dataclass, field, replace
from ..toc import FakeModule, FakeTensor, StorageRef, itemsize
from .dtypes import STORAGE_TYPES
from .unpickle import OPCODES, TORCH_REBUILDS, Global, Hooks, Inert, unpickle

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
MAX_PICKLE = 256 << 20  # a data.pkl beyond 256 MiB is not a state dict (real ones are KBs to a few MBs)

STORAGE_DTYPES = STORAGE_TYPES


MAX_DEPTH = 200  # containers nested deeper than this are not a checkpoint (and would exhaust a recursive walk)
MAX_ENTRIES = 50_000_000  # entries reachable through shared references (a "billion laughs" DAG is refused)
MAX_BROADCAST = 1 << 32  # elements a stride-0 (expanded) view may claim beyond its storage


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



class TorchHooks(Hooks):
    """How a torch file's pickle becomes stand-ins: storages from persistent ids, views checked on creation."""

    def __init__(self, storage: Callable[[tuple], StorageRef]) -> None:
        self._storage = storage

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and pid and pid[0] == "module":
            # legacy files save a module class as ('module', cls, source_file, source); cls is a name already read
            if len(pid) != 4 or not isinstance(pid[1], Global):
                raise FormatError("malformed module record")
            return pid[1]
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise FormatError(f"unknown persistent id {str(pid)[:60]!r}")
        return self._storage(pid)

    def rebuild(self, name: str, args: tuple) -> Any:
        if name == "torch._tensor._rebuild_from_type_v2":
            if len(args) != 4 or not isinstance(args[0], Global) or not isinstance(args[2], tuple):
                raise FormatError("_rebuild_from_type_v2 without a tensor rebuild function")
            func, new_type, inner, _state = args
            if func.name not in TORCH_REBUILDS or func.name == name:
                raise FormatError(f"_rebuild_from_type_v2 with {func.name}")
            made = self.rebuild(func.name, inner)
            if isinstance(made, FakeTensor) and isinstance(new_type, Global) and new_type.name.endswith("Parameter"):
                made = replace(made, is_parameter=True)
            return made
        if name in ("torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state"):
            if len(args) < 2 or type(args[0]) is not FakeTensor:
                raise FormatError("parameter without tensor data")
            return replace(args[0], requires_grad=bool(args[1]), is_parameter=True)
        if name in ("torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2"):
            if len(args) < 4:
                raise FormatError(f"{name} with too few arguments")
            storage, offset, size, stride = args[:4]
            requires_grad = args[4] if len(args) > 4 else False
            if type(storage) is not StorageRef:
                raise FormatError("tensor without a storage record")
            if not isinstance(size, tuple) or not isinstance(stride, tuple):
                raise FormatError("tensor with invalid shape or stride")
            _check_view(storage, offset, size, stride)
            return FakeTensor(storage, offset, size, stride, storage.dtype, bool(requires_grad))
        return None


def _storage_type(value: Any) -> str:
    name = value.name if isinstance(value, Global) else None
    short = name.rsplit(".", 1)[-1] if name and name.startswith("torch.") else None
    if short in STORAGE_DTYPES:
        return STORAGE_DTYPES[short]
    if short == "UntypedStorage":
        return "uint8"
    raise FormatError(f"storage of unknown type {value!r}")


def _children(obj: Any) -> list | None:
    if isinstance(obj, FakeModule):
        return [obj.state]
    if isinstance(obj, Inert):
        return [obj.args, obj.kwargs, obj.state, obj.list_items, obj.dict_items]
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
        _check_graph(obj)
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


@dataclass
class TorchFile:
    """A torch file as read without running it: the object tree (stand-ins), the globals its pickle names, and
    where each storage's bytes are (``data_offset`` into the file; None for a compressed zip record)."""

    root: Any
    globals: set[str]
    storages: dict[Hashable, StorageRef] = field(default_factory=dict)
    data_offset: dict[Hashable, int | None] = field(default_factory=dict)
    records: dict[Hashable, str] = field(default_factory=dict)  # zip record name of each storage


def sniff_torch(head: bytes) -> str | None:
    """"pt" for a zip file, "pt-legacy" for anything that starts like a pickle, else None."""
    if head.startswith(b"PK\x03\x04"):
        return "pt"
    if head[:1] and head[:1] in OPCODES:  # any pickle: the inert unpickler decides
        return "pt-legacy"
    return None


def _zip_prefix(archive: zipfile.ZipFile, path: str) -> str:
    """The archive prefix as torch takes it (from the FIRST record); refuse what two readers could read apart."""
    infos = archive.infolist()
    if not infos:
        raise FormatError(f"{path}: empty zip file: not a torch checkpoint")
    names = [i.orig_filename for i in infos]
    if any("\0" in n for n in names):
        bad = next(n for n in names if "\0" in n)
        raise FormatError(f"{path}: ambiguous zip: record name {bad!r} holds a NUL byte (readers disagree on it)")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise FormatError(f"{path}: ambiguous zip: two records are named '{dup}'")
    prefix = names[0].split("/", 1)[0] + "/" if "/" in names[0] else ""
    pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if not pkls:
        raise FormatError(f"{path}: zip file without a data.pkl record: not a torch checkpoint")
    if len(pkls) > 1:
        raise FormatError(f"{path}: ambiguous zip: data.pkl under two prefixes ({', '.join(pkls[:3])})")
    if pkls[0] != prefix + "data.pkl":
        raise FormatError(f"{path}: ambiguous zip: the first record '{names[0]}' names the archive "
                          f"'{prefix.rstrip('/')}', but data.pkl is '{pkls[0]}'")
    return prefix


def _data_offset(f: BinaryIO, info: zipfile.ZipInfo) -> int | None:
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


def _check_directory_offset(archive: zipfile.ZipFile, path: str) -> None:
    """Refuse an archive whose central directory is not where its end record says.

    Python's zipfile then shifts every offset by the difference (it reads archives with bytes before them),
    while torch's reader takes the offsets as they are: the two would read different records, other tensor
    values, even another data.pkl (one that runs code), from the same file."""
    stored = _stored_directory_offset(archive.fp)
    if stored is None or stored != archive.start_dir:
        shift = "" if stored is None else f" ({archive.start_dir - stored} bytes from where its end record says)"
        raise FormatError(f"{path}: ambiguous zip: the central directory is not where torch's reader looks{shift}")


def read_zip(path: str, fileobj: BinaryIO | None = None) -> TorchFile:
    """A torch zip checkpoint read without running it: reads ``data.pkl`` and the zip directory only.

    ``fileobj``: the zip is these bytes (a record inside a DCP data file), ``path`` only names it."""
    try:
        archive = zipfile.ZipFile(fileobj if fileobj is not None else path)
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError) as e:  # e.g. "zip file version 6.4"
        raise FormatError(f"{path}: not a valid torch zip file ({type(e).__name__}: {e})") from None
    with archive:
        _check_directory_offset(archive, path)
        prefix = _zip_prefix(archive, path)
        info = archive.getinfo(prefix + "data.pkl")
        if info.file_size > MAX_PICKLE:
            raise FormatError(f"{path}: data.pkl is {info.file_size} bytes, above the {MAX_PICKLE} byte limit")
        records = {i.filename: i for i in archive.infolist()}
        packed = [n for n, i in records.items() if n.endswith(".pkl") and i.compress_type != zipfile.ZIP_STORED]
        if packed:  # torch stores every record as is; a compressed pickle is a decompression bomb's shape
            raise FormatError(f"{path}: compressed pickle record '{packed[0]}' (torch stores records uncompressed)")
        byteorder = _read_record(archive, prefix + "byteorder", path).strip() if prefix + "byteorder" in records else b"little"
        if byteorder not in (b"little", b""):
            raise FormatError(f"{path}: big-endian checkpoints are not supported")
        out = TorchFile(None, set())
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
            if not isinstance(numel, int) or numel < 0 or numel * itemsize(dtype) > records[record].file_size:
                raise FormatError(f"storage '{key}' claims {numel} {dtype} elements but its record holds "
                                  f"{records[record].file_size} bytes")
            seen[key] = StorageRef(("zip", key), dtype, numel, str(location))
            out.records[("zip", key)] = record
            return seen[key]

        if prefix + "constants.pkl" in records:
            raise FormatError(f"{path}: a TorchScript archive (it holds constants.pkl): torch.load hands it to "
                              "torch.jit.load, which runs its code; paramtool does not read TorchScript")
        data = _read_record(archive, info.filename, path)
        out.root = _unpickle(data, storage, path, out.globals)
        _scan_other_pickles(archive, records, info.filename, path)
        f = fileobj if fileobj is not None else open(path, "rb")
        try:
            for ref in seen.values():
                out.storages[ref.key] = ref
                out.data_offset[ref.key] = _data_offset(f, records[out.records[ref.key]])
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
    for name, info in records.items():
        if name == data_pkl or not name.endswith(".pkl") or info.file_size > MAX_PICKLE:
            continue
        try:
            unpickle(_read_record(archive, name, path), _AnyStorage())
        except RefusedGlobal as e:
            raise RefusedGlobal(e.name, f"{path} (record {name})") from None
        except Exception:  # not a pickle, or a broken one: torch ignores the record, and so does paramtool
            continue


def read_zip_tree(path: str) -> Any:
    """The object tree of a torch zip checkpoint, tensors as ``FakeTensor``: reads ``data.pkl`` only."""
    return read_zip(path).root


def _read_record(archive: zipfile.ZipFile, name: str, path: str) -> bytes:
    try:
        return archive.read(name)
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
        out.root = _unpickle(f, storage, path, out.globals)
        keys = _unpickle(f, no_storage, path, out.globals)
        if not isinstance(keys, list) or set(map(str, keys)) != set(seen) or len(keys) != len(seen):
            raise FormatError(f"{path}: the storage list does not match the tensors")
        # each storage follows as an 8-byte element count and its bytes; torch sizes it by that count, so a
        # count that disagrees with the pickle would make two readers see two different tensors
        pos = f.tell()
        for key in keys:
            ref = seen[str(key)]
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
    return out


def read_legacy_tree(path: str) -> Any:
    """The object tree of a legacy (pre-zip) torch file, or of a bare pickle; storages are not read."""
    return read_legacy(path).root


def read_torch(path: str, fmt: str) -> TorchFile:
    if fmt != "pt":
        return read_legacy(path)
    with open_file(path) as f:  # a local file, or a remote object read by range (``blob``)
        return read_zip(path, f)

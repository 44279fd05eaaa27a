"""TorchScript archives (``torch.jit.save``), read without compiling or running anything in them.

An archive is a torch zip with ``constants.pkl`` and ``code/`` beside ``data.pkl``. ``data.pkl`` holds the
module objects: ``__torch__.…`` classes built by NEWOBJ and BUILD, whose state is a dict of attributes in slot
order, tensors among them rebuilt from ``data/N`` records as in a ``torch.save`` file. The inert unpickler reads
it (a subclass that knows the few names TorchScript's pickler writes: ``torch.jit._pickle.build_intlist`` and its
kin are plain list markers); modules stay ``Inert`` records. Which attributes are parameters and buffers is
declared in each class's code, ``__parameters__ = ["weight", "bias", ]`` and ``__buffers__ = [...]``, and only
read: the source text is parsed by ``ast.parse`` (a parser: nothing is compiled or executed) and the two lists
taken from the class bodies. The result is what ``torch.jit.load(f).state_dict()`` gives, by walking
the modules as ``nn.Module.state_dict`` walks a loaded script module: parameters, then buffers (a loaded
script module keeps no record of which buffers were non-persistent: every declared buffer is listed), then
child modules, each in slot order, ``None`` entries skipped.

Writing (``storage.ArchiveStorageFile``) patches the archive: every byte is copied as it was and only the changed storages' bytes and their
CRC-32 fields (local header, data descriptor, central directory) are rewritten in place, so records keep their
order, names, compression and 64-byte alignment, and ``torch.jit.load`` runs the same code over new values.
"""
from __future__ import annotations

import collections
import io
import re
import zipfile

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any, BinaryIO, Callable, Hashable, Iterable

    from ..plan import Plan
    from .base import Format
    from .storage import StorageFile

from ..blob import open_file
from ..checkpoint import Checkpoint
from ..errors import FormatError, ParamtoolError, RefusedGlobal
from ..records import replace
from ..toc import FakeTensor, StorageRef, Toc, TorchFile, itemsize
from . import torchfile
from .dtypes import SCRIPT_STORAGE_TYPES
from .unpickle import Global, Hooks, Inert, Unpickler

# What TorchScript's pickler writes besides tensors and ``__torch__`` objects: list markers and type tags,
# identity functions in ``torch/jit/_pickle.py``. Their first argument is the value.
JIT_PICKLE = "torch.jit._pickle"
JIT_HELPERS = frozenset({"build_intlist", "build_tensorlist", "build_doublelist", "build_boollist", "restore_type_tag"})
SCRIPT_ROOT = "__torch__"  # the namespace of every class compiled into an archive
CUSTOM_CLASSES = "__torch__.torch.classes."  # C++ classes (quantized packed weights): no code, never modules
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_CODE = 64 << 20  # one code record: TorchScript source of real models is KBs to a few MBs


def is_archive(path: str) -> bool:
    """Is ``path`` a TorchScript archive: a zip whose archive folder holds ``constants.pkl`` (torch's own test,
    ``torch.serialization._is_torchscript_zip``)? False for anything that does not open as a zip."""
    try:
        with open_file(path) as raw, zipfile.ZipFile(raw) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError):
        return False
    if not names:
        return False
    prefix = names[0].split("/", 1)[0] + "/" if "/" in names[0] else ""
    return prefix + "constants.pkl" in names


def _script_name(module: str) -> bool:
    return (module == SCRIPT_ROOT or module.startswith(SCRIPT_ROOT + ".")) and \
        all(_NAME.fullmatch(p) for p in module.split("."))


class ScriptUnpickler(Unpickler):
    """The inert unpickler, knowing TorchScript's own names: ``__torch__`` classes name code in the archive
    (compiled by ``torch.jit.load``, never imported from Python), so they are kept as inert objects whatever
    their names say; the ``torch.jit._pickle`` list markers return their argument. Anything else is judged as
    in any pickle."""

    def _global(self, module: str, name: str) -> Global:
        if (_script_name(module) and _NAME.fullmatch(name)) or (module == JIT_PICKLE and name in JIT_HELPERS):
            self.globals_seen.add(f"{module}.{name}")
            return Global(module, name)
        return super()._global(module, name)

    def _call(self, func: Any, args: Any) -> Any:
        if isinstance(func, Global) and func.module == JIT_PICKLE and func.qualname in JIT_HELPERS:
            if not isinstance(args, tuple) or not args or len(args) > 2:
                raise FormatError(f"{func.name} with unexpected arguments")
            return args[0]
        return super()._call(func, args)


def _unpickle(data: bytes, storage: Callable[[tuple], StorageRef], path: str, record: str,
              seen: set[str] | None) -> Any:
    """One pickle of the archive through ``ScriptUnpickler``; errors are one line naming the record."""
    u = ScriptUnpickler(io.BytesIO(data), torchfile.TorchHooks(storage))
    try:
        obj = u.load()
        torchfile.check_graph(obj)
    except RefusedGlobal as e:
        raise RefusedGlobal(e.name, f"{path} (record {record})") from None
    except FormatError as e:
        raise FormatError(f"{path}: {record}: {e}") from None
    except Exception as e:  # truncated, corrupt or hostile bytes: one readable line
        msg = " ".join(str(e).split())[:120]
        raise FormatError(f"{path}: {record}: not a readable pickle ({type(e).__name__}: {msg})") from None
    if seen is not None:
        seen.update(u.globals_seen)
    return obj


class ClassDecl:
    """What a class's code declares: is it a module, and which of its attributes are parameters and buffers."""

    __slots__ = ("name", "is_module", "parameters", "buffers")

    def __init__(self, name: str, is_module: bool, parameters: list[str], buffers: list[str]) -> None:
        self.name, self.is_module, self.parameters, self.buffers = name, is_module, parameters, buffers


def _names_list(node: Any, what: str, where: str) -> list[str]:
    import ast

    if not isinstance(node, (ast.List, ast.Tuple)) or not all(
            isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
        raise FormatError(f"{where}: {what} is not a list of names")
    return [e.value for e in node.elts]


def parse_classes(source: str, where: str) -> dict[str, ClassDecl]:
    """The top-level classes of one code record, by name: their bases say whether they are modules, their
    ``__parameters__`` and ``__buffers__`` assignments which attributes are which. ``ast.parse`` only reads
    the text into a tree; nothing is compiled to bytecode or run."""
    import ast

    try:
        body = ast.parse(source, filename=where).body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise FormatError(f"{where}: the archive's code cannot be parsed ({type(e).__name__})") from None
    out: dict[str, ClassDecl] = {}
    for node in body:
        if not isinstance(node, ast.ClassDef):
            continue
        bases = [b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else "" for b in node.bases]
        decl = ClassDecl(node.name, "Module" in bases, [], [])
        for stmt in node.body:
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                target = stmt.targets[0].id
                if target == "__parameters__":
                    decl.parameters = _names_list(stmt.value, target, f"{where}: class {node.name}")
                elif target == "__buffers__":
                    decl.buffers = _names_list(stmt.value, target, f"{where}: class {node.name}")
        out[node.name] = decl
    return out


class _Code:
    """The archive's class declarations, each code record read and parsed once, on first use."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, path: str) -> None:
        self.archive, self.prefix, self.path = archive, prefix, path
        self.files: dict[str, dict[str, ClassDecl]] = {}

    def decl(self, qualified: str) -> ClassDecl:
        """``__torch__.torch.nn.modules.linear.___torch_mangle_0.Linear`` is class ``Linear`` of the record
        ``code/__torch__/torch/nn/modules/linear/___torch_mangle_0.py``, as torch.jit.save names them."""
        module, _, name = qualified.rpartition(".")
        record = f"{self.prefix}code/{module.replace('.', '/')}.py"
        if record not in self.files:
            try:
                info = self.archive.getinfo(record)
            except KeyError:
                raise FormatError(f"{self.path}: no code for class '{qualified}' (record {record} is missing)") from None
            if info.file_size > MAX_CODE:
                raise FormatError(f"{self.path}: code record {record} is {info.file_size} bytes, above {MAX_CODE}")
            try:
                text = torchfile.read_record(self.archive, record, self.path).decode("utf-8")
            except UnicodeDecodeError:
                raise FormatError(f"{self.path}: code record {record} is not UTF-8 text") from None
            self.files[record] = parse_classes(text, f"{self.path}: {record}")
        decl = self.files[record].get(name)
        if decl is None:
            raise FormatError(f"{self.path}: {record} does not define class '{name}'")
        return decl


def class_label(qualified: str) -> str:
    """A class as people name it: ``__torch__.torch.nn.modules.linear.___torch_mangle_3.Linear`` -> ``Linear``."""
    return qualified.rsplit(".", 1)[-1]


def _state_dict(root: Any, code: _Code, path: str) -> tuple[collections.OrderedDict, dict[str, str]]:
    """The tensors ``torch.jit.load(f).state_dict()`` gives, by name, as stand-ins (shared ones stay one
    object), and each module path's class."""
    out: collections.OrderedDict = collections.OrderedDict()
    modules: dict[str, str] = {}
    plain: dict[int, FakeTensor] = {}

    def module_decl(obj: Any) -> ClassDecl | None:
        if not isinstance(obj, Inert) or not _script_name(obj.cls.module) or obj.name.startswith(CUSTOM_CLASSES):
            return None
        decl = code.decl(obj.name)
        return decl if decl.is_module else None

    def tensor(value: Any, name: str, kind: str) -> FakeTensor:
        if type(value) is not FakeTensor:
            what = value.name if isinstance(value, Inert) else type(value).__name__
            raise FormatError(f"{path}: {kind} '{name}' is a {what}, not a tensor paramtool can read")
        if id(value) not in plain:  # state_dict() gives detached tensors: no requires_grad
            plain[id(value)] = replace(value, requires_grad=False, is_parameter=False)
        return plain[id(value)]

    within: set[int] = set()  # the modules on the current path: a module inside itself is no model

    def visit(obj: Any, decl: ClassDecl, prefix: str) -> None:
        if id(obj) in within:
            raise FormatError(f"{path}: module {obj.name} at '{prefix.rstrip('.')}' contains itself: not a model")
        within.add(id(obj))
        modules[prefix.rstrip(".")] = class_label(obj.name)
        state = obj.state
        if not isinstance(state, dict):
            raise FormatError(f"{path}: module {obj.name} ({prefix.rstrip('.') or 'the root'}) is built by its own "
                              "__setstate__ code, which paramtool does not run")
        for kind, names in (("parameter", decl.parameters), ("buffer", decl.buffers)):
            declared = set(names)
            for attr, value in state.items():
                if attr in declared and value is not None:
                    out[prefix + attr] = tensor(value, prefix + attr, kind)
        for attr, value in state.items():
            child = module_decl(value)
            if child is not None:
                visit(value, child, f"{prefix}{attr}.")
        within.discard(id(obj))

    decl = module_decl(root)
    if decl is None:
        raise FormatError(f"{path}: data.pkl does not hold a TorchScript module")
    visit(root, decl, "")
    return out, modules


def read_archive(path: str, fileobj: Any = None) -> tuple[TorchFile, dict[str, str]]:
    """A TorchScript archive read without running it: its state dict (stand-in tensors located in the file)
    and each module path's class. Reads the pickles, the code records' text and the zip directory."""
    try:
        archive = zipfile.ZipFile(fileobj if fileobj is not None else open_file(path))
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError) as e:
        raise FormatError(f"{path}: not a valid torch zip file ({type(e).__name__}: {e})") from None
    with archive:
        torchfile.check_directory_offset(archive, path)
        prefix = torchfile.zip_prefix(archive, path)
        records = {i.filename: i for i in archive.infolist()}
        for name in ("data.pkl", "constants.pkl"):
            info = records.get(prefix + name)
            if info is None:
                raise FormatError(f"{path}: a TorchScript archive without {name}")
            if info.file_size > torchfile.MAX_PICKLE:
                raise FormatError(f"{path}: {name} is {info.file_size} bytes, above the {torchfile.MAX_PICKLE} byte limit")
            if info.compress_type != zipfile.ZIP_STORED:
                raise FormatError(f"{path}: compressed pickle record '{name}' (torch stores records uncompressed)")
        byteorder = records.get(prefix + "byteorder")
        if byteorder is not None and torchfile.read_record(archive, byteorder.filename, path).strip() not in (b"little", b""):
            raise FormatError(f"{path}: big-endian checkpoints are not supported")
        out = TorchFile(None, set())

        def storages(folder: str, seen: dict[str, StorageRef], listed: bool) -> Callable[[tuple], StorageRef]:
            def storage(pid: tuple) -> StorageRef:
                if len(pid) != 5:
                    raise FormatError(f"malformed storage record {pid[:3]!r}")
                _, kind, key, location, numel = pid
                key = str(key)
                if key not in seen:
                    dtype = torchfile.storage_type(kind, SCRIPT_STORAGE_TYPES)
                    record = f"{prefix}{folder}/{key}"
                    info = records.get(record)
                    if info is None:
                        raise FormatError(f"storage record '{folder}/{key}' is missing from the zip")
                    if not isinstance(numel, int) or numel < 0 or numel * itemsize(dtype) > info.file_size:
                        raise FormatError(f"storage '{folder}/{key}' claims {numel} {dtype} elements but its record "
                                          f"holds {info.file_size} bytes")
                    seen[key] = StorageRef((folder, key), dtype, numel, str(location))
                    if listed:
                        out.records[seen[key].key] = record
                return seen[key]
            return storage

        data: dict[str, StorageRef] = {}
        root = _unpickle(torchfile.read_record(archive, prefix + "data.pkl", path), storages("data", data, True),
                         path, "data.pkl", out.globals)
        # the constants the code reads (not in the state dict): read to check them, kept byte for byte
        _unpickle(torchfile.read_record(archive, prefix + "constants.pkl", path), storages("constants", {}, False),
                  path, "constants.pkl", out.globals)
        _scan_other_pickles(archive, records, prefix, path)
        out.root, modules = _state_dict(root, _Code(archive, prefix, path), path)
        f = fileobj if fileobj is not None else open_file(path)
        try:
            used = {t.storage.key for t in out.root.values()}
            for ref in data.values():
                if ref.key in used:
                    out.storages[ref.key] = ref
                    out.data_offset[ref.key] = torchfile.record_data_offset(f, records[out.records[ref.key]])
        finally:
            if fileobj is None:
                f.close()
        out.records = {k: v for k, v in out.records.items() if k in out.storages}
    return out, modules


class _AnyStorage(Hooks):
    """For the archive's other pickles (debug tables, traced inputs): only the names they refer to matter."""

    def persistent_load(self, pid: Any) -> Any:
        return None


def _scan_other_pickles(archive: zipfile.ZipFile, records: dict, prefix: str, path: str) -> None:
    """Refuse, by name, a code-running global in any other pickle record (``traced_inputs.pkl``,
    ``code/…debug_pkl``): torch.jit.load's own unpickler resolves none, but the user should see them."""
    for name, info in records.items():
        if name in (prefix + "data.pkl", prefix + "constants.pkl") or info.file_size > torchfile.MAX_PICKLE \
                or not name.endswith("pkl"):
            continue
        try:
            ScriptUnpickler(io.BytesIO(torchfile.read_record(archive, name, path)), _AnyStorage()).load()
        except RefusedGlobal as e:
            raise RefusedGlobal(e.name, f"{path} (record {name})") from None
        except Exception:  # not a pickle, or a broken one: torch ignores it, and so does paramtool
            continue


class ScriptCheckpoint(Checkpoint):
    """An archive's state dict, with the class of each module path (``Linear``, ``Sequential``) for the tree."""

    modules: dict[str, str] = {}

    def toc(self) -> Toc:
        toc = super().toc()
        toc.modules = dict(self.modules)
        return toc


def refuse_structural(action: str) -> ParamtoolError:
    """The error for an edit a TorchScript archive cannot take without its code changing."""
    return ParamtoolError(
        f"{action} would change what a TorchScript archive's code reads (its tensors' names, shapes, dtypes or "
        "storage sharing); only values can change in an archive (init, set without --untie). Convert it to a "
        "state dict first: paramtool convert ARCHIVE state.pt (or .safetensors)")


class TorchScriptFormat(torchfile.TorchFormat):
    """A TorchScript archive (``torch.jit.save``): its state dict, read without running its code
    (this module); written only as a copy with new values in its storages."""

    def sniff(self, head: bytes, size: int) -> bool:
        return False  # a zip like any torch file: the records decide (sniff_path)

    def sniff_path(self, path: str, head: bytes, size: int) -> bool:
        return head.startswith(b"PK\x03\x04") and is_archive(path)

    def open_storages(self, listing: Checkpoint) -> StorageFile:
        from .storage import ArchiveStorageFile

        return ArchiveStorageFile.open(listing.path, listing.toc(), listing.root, listing.located, torchfile.zip_prefix)

    def _read(self, label: str, path: str, key: str | None,
              load: Callable[[str, TorchFile], Any] | None) -> tuple[TorchFile, Checkpoint]:
        from ..checkpoint import named

        listing, modules = read_archive(path)
        ckpt = named(label, self, listing.root if load is None else load(path, listing), path, key, ScriptCheckpoint)
        ckpt.globals, ckpt.modules = sorted(listing.globals), modules
        return listing, ckpt

    def written_as(self, chosen: Format, asked: bool) -> Format:
        """An edited archive stays an archive where a torch file is written, whatever ``-o``'s extension; its
        state dict where ``--format`` or ``convert`` asks."""
        return self if not asked and chosen.pickled else chosen

    def check_plan(self, plan: Plan) -> None:
        """Only values change in an archive: no rename, drop, cast, resize or untie."""
        if plan.restructure or plan.untie:
            raise refuse_structural(plan.report.action + (" with --untie" if plan.untie else ""))

    def archive_listing(self, path: str, fileobj: BinaryIO | None) -> TorchFile:
        """An archive met where a torch zip was read (``TorchFormat.archive``): its state dict, as ``torch.load``
        hands such a zip to ``torch.jit.load``."""
        return read_archive(path, fileobj)[0]

    def save(self, root: Any, metadata: dict[str, str] | None, path: str) -> None:
        raise refuse_structural("this write")

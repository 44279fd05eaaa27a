"""The one unpickler: an opcode loop of its own that calls nothing a file names.

Every pickle paramtool meets (a torch zip's ``data.pkl``, a legacy torch file, a bare pickle, a DCP
``.metadata``, a pickled record inside a DCP data file) is read here. ``pickle.Unpickler`` is not used: its
``find_class`` hands back objects that REDUCE and BUILD then call. Here a global is only ever a *name*
(``Global``); what REDUCE, NEWOBJ and BUILD do with it is decided by paramtool, by name:

- known values: containers, ``OrderedDict``, ``set``, ``complex``, bytes codecs, ``torch.Size`` (a tuple), the
  tensor rebuild functions (interpreted into ``FakeTensor`` by the ``Hooks`` a format passes in), ``torch.nn``
  module classes (``FakeModule``);
- inert objects: any other name becomes an ``Inert`` record of its name, arguments and state, shown as
  ``argparse.Namespace(lr=0.1)`` and written back as the same GLOBAL, arguments and state;
- refused: names that run code or reach the system when the file is loaded the ordinary way (``DENIED``):
  ``RefusedGlobal`` as soon as the name is read. The verdict is for the user; nothing runs either way.

Imports neither torch nor numpy.
"""
from __future__ import annotations

import codecs
import collections
import collections.abc
import io
import re
import reprlib
import struct

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any, BinaryIO, Callable

from ..errors import FormatError, RefusedGlobal
from ..toc import FakeModule, FakeTensor
from .nn_classes import NN_MODULE_CLASSES

_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
MAX_BYTES = 256 << 20  # one bytes/str value of a pickle (real checkpoints hold nothing near this)
MAX_MEMO = 10_000_000
MAX_DEPTH = 200  # values nested deeper than this are not a checkpoint (and would exhaust a recursive walk)
_NESTED = (tuple, frozenset, list)  # what hashing or comparing a key recurses into (in C, without a guard)
_HASHING = {"collections.OrderedDict", "collections.Counter", "builtins.set", "builtins.frozenset",
            "__builtin__.set", "__builtin__.frozenset"}

# Modules whose every name runs code, reaches the system or loads another pickle: the union of what the public
# scanners (picklescan, modelscan, fickling) flag, by module.
DENIED_MODULES = frozenset({
    "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "sys", "shutil", "socket", "socketserver", "ssl",
    "runpy", "importlib", "imp", "pkgutil", "zipimport", "code", "codeop", "pty", "pdb", "bdb", "trace", "timeit",
    "cProfile", "profile", "webbrowser", "ctypes", "_ctypes", "cffi", "pickle", "_pickle", "cPickle", "marshal",
    "shelve", "dill", "cloudpickle", "joblib", "multiprocessing", "concurrent", "threading", "_thread", "signal",
    "asyncio", "select", "selectors", "http", "httplib", "urllib", "urllib2", "urllib3", "requests", "aiohttp",
    "ftplib", "smtplib", "telnetlib", "xmlrpc", "venv", "ensurepip", "pip", "setuptools", "distutils",
    "tempfile", "glob", "io", "_io", "fileinput", "linecache", "tarfile", "zipfile", "types", "inspect",
    "operator", "functools", "gc", "atexit", "builtins", "__builtin__", "__builtins__", "commands", "popen2",
    "platform", "sysconfig", "site", "spawn", "pexpect", "paramiko", "keras", "tensorflow", "dbm", "sqlite3",
    "_posixsubprocess", "_winapi", "msvcrt", "winreg", "mmap", "resource", "fcntl", "termios", "tty", "readline",
    "rlcompleter", "code", "idlelib", "pydoc", "doctest", "unittest", "test", "lib2to3", "nturl2path",
})
# Names that run code wherever they are reached from (``numpy.testing._private.utils.runstring``, ``x.os``).
DENIED_NAMES = frozenset({
    "system", "popen", "Popen", "spawn", "spawnl", "spawnv", "execv", "execve", "execl", "execvp", "fork",
    "exec", "eval", "compile", "execfile", "__import__", "import_module", "getattr", "setattr", "delattr",
    "globals", "locals", "vars", "open", "load", "loads", "runstring", "run_path", "run_module", "_run_code",
    "call", "check_call", "check_output", "run", "getoutput", "getstatusoutput", "breakpoint", "input", "help",
    "remove", "unlink", "rmtree", "rmdir", "rename", "kill", "attrgetter", "methodcaller", "itemgetter", "partial",
    "reduce", "apply", "__reduce__", "__reduce_ex__", "__setstate__", "__getattribute__", "__subclasses__",
    "__globals__", "__builtins__", "__code__", "write", "write_bytes", "write_text", "read", "read_bytes",
    "read_text", "urlopen", "create_connection", "connect", "ctypes", "cdll", "CDLL", "PyDLL", "LoadLibrary",
    "_load", "_load_from_bytes", "load_state_dict_from_url", "download_url_to_file", "os", "sys", "subprocess",
    "builtins", "__builtin__", "posix", "nt", "runpy", "importlib", "shutil", "socket", "pty", "webbrowser",
    "_popen", "_get_command_stdout", "getstatus", "system_command", "run_command", "pipepager", "tempfilepager",
})
# Prefixes inside torch (and friends) that compile, load, fetch or call native code.
DENIED_PREFIXES = (
    "torch.load", "torch.hub", "torch.jit", "torch._C", "torch.ops", "torch.classes", "torch.package",
    "torch.utils.cpp_extension", "torch.compile", "torch._dynamo", "torch._inductor", "torch.fx",
    "torch.serialization", "torch.storage._load", "torch.distributed.rpc", "torch._ops", "torch.library",
    "torch.cuda", "torch.backends", "torch.multiprocessing", "torch.utils.data", "torch.testing", "torch.export",
    "numpy.testing", "numpy.f2py", "numpy.distutils", "numpy.load", "numpy.lib.npyio", "numpy.ctypeslib",
    "pandas.io", "pandas.read_", "scipy.weave", "IPython", "jupyter", "nbformat", "yaml.load", "yaml.unsafe",
    "transformers.trainer_utils", "huggingface_hub", "__main__.eval", "__main__.exec", "__main__.os",
    "logging.config", "numpy.lib.format", "pandas.read_pickle", "torch.utils.collect_env", "torch.utils.hooks",
    "_osx_support", "_aix_support", "torch.utils.bottleneck", "torch.distributed.elastic", "torch.from_file",
    "torch.save", "numpy.fromfile", "numpy.memmap", "numpy.save", "numpy.core.memmap", "numpy._core.memmap",
)
# Harmless names under an otherwise denied module: plain values the weights-only loader also accepts.
_PLAIN_BUILTINS = ("set", "frozenset", "slice", "complex", "bytearray", "bytes", "str", "int", "float", "bool",
                   "list", "dict", "tuple", "range", "object", "NoneType", "unicode", "long", "Ellipsis",
                   "NotImplemented", "ValueError", "KeyError", "TypeError", "RuntimeError", "Exception")
ALLOWED_IN_DENIED = frozenset({f"{m}.{n}" for m in ("builtins", "__builtin__") for n in _PLAIN_BUILTINS} | {
    "torch.serialization._get_layout", "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.PurePosixPath",
    "pathlib.PureWindowsPath", "pathlib.Path", "types.SimpleNamespace", "types.MappingProxyType",
    "torch._dynamo.decorators._DimRange",  # a jagged nested tensor's ranges: data, which torch's loader accepts
})
SAFE_CODECS = ("latin1", "utf8", "ascii", "iso88591")


def refused(name: str) -> bool:
    """Is ``name`` (``module.qualname``) one that runs code or reaches the system when unpickled normally?"""
    if name in ALLOWED_IN_DENIED:
        return False
    parts = name.split(".")
    if parts[0] in DENIED_MODULES or any(p in DENIED_NAMES for p in parts[1:]):
        return True
    return any(name == p or name.startswith(p + ".") or (p.endswith("_") and name.startswith(p))
               for p in DENIED_PREFIXES)


class Global:
    """A name a pickle refers to (``GLOBAL module name``). Never resolved to a Python object."""

    __slots__ = ("module", "qualname", "name")

    def __init__(self, module: str, qualname: str) -> None:
        self.module, self.qualname = module, qualname
        self.name = f"{module}.{qualname}"

    def __repr__(self) -> str:
        return self.name

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Global) and other.name == self.name

    def __hash__(self) -> int:
        return hash(("Global", self.name))


class Inert:
    """An object of a class paramtool does not know, kept as data: how the pickle builds it, never built.

    ``how`` is "reduce" (``name(*args)``) or "newobj" (``name.__new__(name, *args, **kwargs)``); ``state`` is
    what BUILD gives it; ``list_items`` and ``dict_items`` what APPEND(S) and SETITEM(S) add (list and dict
    subclasses; a dict subclass becomes an ``InertMapping``). The writer emits the same GLOBAL, arguments, items
    and state again.
    """

    def __init__(self, cls: Global, args: tuple = (), how: str = "reduce", kwargs: dict | None = None) -> None:
        self.cls = cls
        self.name = cls.name
        self.args = args
        self.how = how
        self.kwargs = kwargs or {}
        self.state: Any = None
        self.has_state = False
        self.list_items: list = []
        self.dict_items: dict = {}

    def __repr__(self) -> str:
        return describe(self)

    def field(self, key: str, position: int | None = None) -> Any:
        """One field of the object's state (dict state, (dict, slots) state, or positional arguments)."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict) and (
                state[0] is None or isinstance(state[0], dict)):
            merged = dict(state[0] or {})
            merged.update(state[1])
            state = merged
        if isinstance(state, dict) and key in state:
            return state[key]
        if key in self.dict_items:
            return self.dict_items[key]
        seq = self.args if not self.has_state else state
        if position is not None and isinstance(seq, tuple) and position < len(seq):
            return seq[position]
        return None


class _Repr(reprlib.Repr):
    """Bounded reprs: a pickle's values may be shared exponentially or cyclic; nesting stops at a few levels."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother = 3, 50, 60
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = self.maxfrozenset = 6

    def repr_Inert(self, x: Inert, level: int) -> str:
        return describe(x, level=level - 1) if level > 0 else f"{x.name}(...)"

    repr_InertMapping = repr_Inert

    def repr_Global(self, x: Global, level: int) -> str:
        return x.name


_REPR = _Repr()


class InertMapping(Inert, collections.abc.Mapping):
    """An inert object that SETITEM filled (a dict subclass: ``AttributeDict``, ``EasyDict``, ...): its entries
    are a mapping, so tensors kept in it are listed, edited and written back like a dict's."""

    def __getitem__(self, key: Any) -> Any:
        return self.dict_items[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self.dict_items[key] = value

    def __iter__(self) -> Any:
        return iter(self.dict_items)

    def __len__(self) -> int:
        return len(self.dict_items)

    __hash__ = object.__hash__
    __eq__ = object.__eq__
    __repr__ = Inert.__repr__


def _short(v: Any, level: int = 3) -> str:
    return _REPR.repr1(v, level)


_NUMPY_CODES = {"f8": "d", "f4": "f", "f2": "e", "i8": "q", "i4": "i", "i2": "h", "i1": "b", "u8": "Q", "u4": "I",
                "u2": "H", "u1": "B", "b1": "?"}
_NUMPY_NAMES = {"f": "float", "i": "int", "u": "uint", "b": "bool"}


def _numpy_scalar(obj: Inert) -> str | None:
    """``numpy.float64(0.75)`` for a pickled numpy scalar (dtype record + raw bytes), decoded, not built."""
    if not obj.name.endswith("multiarray.scalar") or len(obj.args) != 2 or not isinstance(obj.args[1], bytes):
        return None
    dtype = obj.args[0]
    if not isinstance(dtype, Inert) or not dtype.args or dtype.args[0] not in _NUMPY_CODES:
        return None
    code = dtype.args[0]
    order = dtype.state[1] if isinstance(dtype.state, tuple) and len(dtype.state) > 1 else "<"
    try:
        value = struct.unpack(("<" if order in ("<", "|", "=") else ">") + _NUMPY_CODES[code], obj.args[1])[0]
    except struct.error:
        return None
    kind = _NUMPY_NAMES[code[0]] + (str(int(code[1:]) * 8) if code != "b1" else "_")
    return f"numpy.{kind}({value!r})"


def _numpy_array(obj: Inert) -> str | None:
    """``numpy.ndarray(shape=(3,), dtype='f8')`` for a pickled numpy array (its BUILD state), not built."""
    state = obj.state
    if not obj.name.endswith("multiarray._reconstruct") or not isinstance(state, tuple) or len(state) != 5:
        return None
    dtype = state[2]
    code = dtype.args[0] if isinstance(dtype, Inert) and dtype.args else "?"
    return f"numpy.ndarray(shape={state[1]!r}, dtype={code!r})"


def _plain_value(obj: Any, level: int) -> Any:
    """An omegaconf node's value, or a config container's content as plain dicts and lists (for display)."""
    if level < 0:
        return ...
    if isinstance(obj, Inert) and obj.name.startswith("omegaconf."):
        if obj.name.endswith(("DictConfig", "ListConfig")):
            return _plain_value(obj.field("_content"), level - 1)
        if obj.name.endswith("Node"):  # AnyNode, StringNode, ...: the value is in _val
            return _plain_value(obj.field("_val"), level - 1)
    if isinstance(obj, dict):
        return {k: _plain_value(v, level - 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain_value(v, level - 1) for v in obj]
    return obj


def _short_name(name: str) -> str:
    """``omegaconf.dictconfig.DictConfig`` -> ``omegaconf.DictConfig`` (how the library is usually named)."""
    parts = name.split(".")
    return f"{parts[0]}.{parts[-1]}" if len(parts) > 2 and parts[0] in ("omegaconf", "pathlib") else name


def describe(obj: Inert, limit: int = 200, level: int = 3) -> str:
    """``argparse.Namespace(lr=0.1, model='resnet50')``: the name, its arguments, its state's fields."""
    scalar = _numpy_scalar(obj) or _numpy_array(obj)
    if scalar:
        return scalar
    if obj.name.startswith("pathlib.") and obj.args and all(isinstance(a, str) for a in obj.args):
        joined = "/".join(a.rstrip("/") if i == 0 and a != "/" else a for i, a in enumerate(obj.args))
        return f"{obj.name}({(joined[1:] if joined.startswith('//') else joined)!r})"
    if obj.name.startswith("omegaconf.") and obj.name.endswith(("DictConfig", "ListConfig")):
        text = f"{_short_name(obj.name)}({_short(_plain_value(obj, 6), level)})"
        return text if len(text) <= limit else text[: limit - 4] + "...)"
    parts = [_short(a, level) for a in obj.args if not isinstance(a, Global) or a.name != obj.name]
    parts += [f"{k}={_short(v, level)}" for k, v in obj.kwargs.items()]
    state = obj.state
    if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)) \
            and isinstance(state[1], dict):
        state = {**(state[0] or {}), **state[1]}
    if isinstance(state, dict):
        parts += [f"{k}={_short(v, level)}" for k, v in state.items()]
    elif obj.has_state and state is not None:
        parts.append(f"state={_short(state, level)}")
    if obj.dict_items:
        parts.append(_short(obj.dict_items, level))
    if obj.list_items:
        parts.append(_short(obj.list_items, level))
    text = f"{obj.name}({', '.join(parts)})"
    return text if len(text) <= limit else text[: limit - 4] + "...)"


class Hooks:
    """What a format decides: persistent ids (storages) and the tensor rebuild functions."""

    def persistent_load(self, pid: Any) -> Any:
        raise FormatError(f"unexpected persistent id {str(pid)[:60]!r}")

    def rebuild(self, name: str, args: tuple) -> Any:
        """A ``torch._utils`` rebuild function applied to ``args``; None when it is not one."""
        return None


TORCH_REBUILDS = frozenset({
    "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
    "torch._tensor._rebuild_from_type_v2", "torch._utils._rebuild_qtensor", "torch._utils._rebuild_sparse_tensor",
    "torch._utils._rebuild_meta_tensor_no_storage", "torch._utils._rebuild_nested_tensor",
    "torch._utils._rebuild_wrapper_subclass", "torch._utils._rebuild_device_tensor_from_cpu_tensor",
    "torch._utils._rebuild_device_tensor_from_numpy", "torch.nested._internal.nested_tensor._rebuild_njt",
})


def module_class(name: str) -> type:
    """The ``FakeModule`` subclass standing for one torch.nn class (cached per name)."""
    if name not in _module_classes:
        _module_classes[name] = type(name.rsplit(".", 1)[-1], (FakeModule,), {})
    return _module_classes[name]


_module_classes: dict[str, type] = {}


def new_module(name: str) -> FakeModule:
    obj = FakeModule.__new__(module_class(name))
    obj.cls, obj.state = name, {}
    return obj


_MARK = object()


class Unpickler:
    """One pickle, opcode by opcode. ``globals_seen`` lists every name the pickle refers to."""

    def __init__(self, file: BinaryIO, hooks: Hooks, encoding: str = "utf-8") -> None:
        self.read = file.read
        self.readline = file.readline
        self.hooks = hooks
        self.encoding = encoding
        self.globals_seen: set[str] = set()
        self.memo: dict[int, Any] = {}
        self._depth: dict[int, tuple[Any, int]] = {}  # id -> (tuple or frozenset, its nesting): each walked once

    def hashable(self, values: Any) -> None:
        """Refuse ``values`` (about to be hashed: dict keys, set items) nested deeper than ``MAX_DEPTH``
        before they are hashed: hashing a tuple 200,000 levels deep recurses in C until the process dies."""
        stack = [[values, iter(values), 0]]
        while stack:
            top = stack[-1]
            for child in top[1]:
                if type(child) not in _NESTED:
                    continue
                known = self._depth.get(id(child))
                if known is not None and known[0] is child:
                    top[2] = max(top[2], known[1])
                    continue
                if len(stack) > MAX_DEPTH:
                    raise FormatError(f"values nested deeper than {MAX_DEPTH} levels: not a checkpoint")
                stack.append([child, iter(child), 0])
                break
            else:
                stack.pop()
                depth = top[2] + 1
                if type(top[0]) is not list:  # (a list may still grow: walked again next time)
                    self._depth[id(top[0])] = (top[0], depth)
                if stack:
                    stack[-1][2] = max(stack[-1][2], depth)

    # -- helpers -------------------------------------------------------------------------------------------
    def _n(self, n: int) -> bytes:
        if n < 0 or n > MAX_BYTES:
            raise FormatError(f"a pickle value of {n} bytes")
        data = self.read(n)
        if len(data) != n:
            raise FormatError("the pickle ends early (truncated)")
        return data

    def _line(self) -> bytes:
        line = self.readline(1 << 16)
        if not line.endswith(b"\n"):
            raise FormatError("the pickle ends early (truncated)")
        return line[:-1]

    def _global(self, module: str, name: str) -> Global:
        dotted = f"{module}.{name}"
        if not (_DOTTED.fullmatch(module) and _DOTTED.fullmatch(name)):  # written back as text: no opcodes inside
            raise FormatError(f"the pickle names a global that is not a Python name: {dotted[:80]!r}")
        if refused(dotted):
            raise RefusedGlobal(dotted)
        self.globals_seen.add(dotted)
        return Global(module, name)

    def _pop_mark(self) -> list:
        if not self.metastack:
            raise FormatError("the pickle pops a mark it never set")
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def _pop(self) -> Any:
        if not self.stack:
            raise FormatError("the pickle pops from an empty stack")
        value = self.stack.pop()
        if value is _MARK:
            raise FormatError("the pickle uses a mark as a value")
        return value

    def _top(self) -> Any:
        if not self.stack or self.stack[-1] is _MARK:
            raise FormatError("the pickle works on an empty stack")
        return self.stack[-1]

    def _memo_put(self, idx: int) -> None:
        if idx < 0 or len(self.memo) > MAX_MEMO:
            raise FormatError("the pickle memo is out of bounds")
        self.memo[idx] = self._top()

    def _memo_get(self, idx: int) -> None:
        if idx not in self.memo:
            raise FormatError(f"the pickle refers to memo entry {idx}, which it never stored")
        self.stack.append(self.memo[idx])

    def _text(self, data: bytes) -> Any:
        if self.encoding == "bytes":
            return data
        return data.decode(self.encoding if self.encoding in ("ascii", "latin1", "utf-8") else "latin1",
                           "strict")

    # -- what globals do -----------------------------------------------------------------------------------
    def _call(self, func: Any, args: Any) -> Any:
        """REDUCE / INST / OBJ: ``func(*args)`` interpreted by name; nothing from the file is called."""
        if not isinstance(func, Global):
            raise FormatError(f"the pickle calls a {type(func).__name__}, not a named class or function")
        if not isinstance(args, tuple):
            raise FormatError(f"{func.name} called with non-tuple arguments")
        name = func.name
        if name in TORCH_REBUILDS:
            result = self.hooks.rebuild(name, args)
            if result is not None:
                return result
        if name in NN_MODULE_CLASSES:
            return new_module(name)
        if name in ("copyreg._reconstructor", "copy_reg._reconstructor") and len(args) == 3 \
                and isinstance(args[0], Global):
            return self._new(args[0], (), {}, via=(func, args))
        if name in _HASHING:
            self.hashable(args)
        known = _known_call(name, args)
        if known is not _UNKNOWN:
            return known
        return Inert(func, args, "reduce")

    def _new(self, cls: Any, args: Any, kwargs: Any, how: str = "newobj", via: tuple | None = None) -> Any:
        """NEWOBJ / NEWOBJ_EX: ``cls.__new__(cls, *args)`` interpreted by name."""
        if not isinstance(cls, Global):
            raise FormatError(f"the pickle creates an object of a {type(cls).__name__}, not of a named class")
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise FormatError(f"{cls.name} created with malformed arguments")
        if cls.name in NN_MODULE_CLASSES:
            return new_module(cls.name)
        if cls.name in ("collections.OrderedDict",) and not args and not kwargs:
            return collections.OrderedDict()
        if cls.name in ("builtins.set", "__builtin__.set") and not args:
            return set()
        if cls.name in ("builtins.dict", "__builtin__.dict") and not args:
            return {}
        if cls.name in ("builtins.list", "__builtin__.list") and not args:
            return []
        if cls.name == "torch.nn.parameter.Parameter" and args and isinstance(args[0], FakeTensor):
            result = self.hooks.rebuild("torch._utils._rebuild_parameter", (args[0], bool(args[1:2] and args[1]), None))
            if result is not None:
                return result
        if via is not None:
            return Inert(via[0], via[1], "reduce")
        return Inert(cls, args, how, kwargs)

    def _build(self, inst: Any, state: Any) -> None:
        if isinstance(inst, FakeModule):
            if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
                state = {**(state[0] or {}), **state[1]}
            if not isinstance(state, dict):
                raise FormatError(f"module {inst.cls} built from a {type(state).__name__}")
            inst.state.update(state)
        elif isinstance(inst, Inert):
            if inst.has_state:
                raise FormatError(f"the pickle builds {inst.name} twice")
            inst.state, inst.has_state = state, True
        elif type(inst) is collections.OrderedDict and isinstance(state, dict) and set(state) <= {"_metadata"}:
            inst.__dict__.update(state)  # a state dict's ``_metadata``, as torch's own loader does (nothing else)
        elif type(inst) is collections.OrderedDict and isinstance(state, tuple) and state and state[0] is None:
            pass  # (None, {}) slot state from some pickles
        else:
            raise FormatError(f"the pickle modifies a {type(inst).__name__} after creating it (BUILD): not a checkpoint")

    # -- the loop ------------------------------------------------------------------------------------------
    def load(self) -> Any:
        self.stack: list = []
        self.metastack: list = []
        read = self.read
        while True:
            key = read(1)
            if not key:
                raise FormatError("the pickle ends early (no STOP)")
            op = key[0]
            handler = _DISPATCH.get(op)
            if handler is None:
                raise FormatError(f"unsupported pickle opcode {key!r}")
            if handler is _stop:
                value = self._pop()
                return value
            handler(self)


_UNKNOWN = object()


def _known_call(name: str, args: tuple) -> Any:
    """Plain values built from plain arguments (what the weights-only loader also accepts)."""
    short = name.split(".", 1)[1] if name.startswith(("builtins.", "__builtin__.")) else None
    if name in ("collections.OrderedDict", "collections.Counter"):
        if not args:
            return collections.OrderedDict() if name.endswith("OrderedDict") else collections.Counter()
        if len(args) == 1 and isinstance(args[0], (list, tuple, dict)):
            try:
                value = collections.OrderedDict(args[0])
            except (TypeError, ValueError):
                raise FormatError(f"{name} from malformed entries") from None
            return value if name.endswith("OrderedDict") else collections.Counter(value)
        raise FormatError(f"{name} with unexpected arguments")
    if short in ("set", "frozenset"):
        if not args:
            return set() if short == "set" else frozenset()
        if len(args) == 1 and isinstance(args[0], (list, tuple, set, frozenset)):
            try:
                return set(args[0]) if short == "set" else frozenset(args[0])
            except TypeError:
                raise FormatError(f"{short} of unhashable values") from None
        raise FormatError(f"{short} with unexpected arguments")
    if short == "slice" and len(args) <= 3 and all(a is None or isinstance(a, int) for a in args):
        return slice(*args)
    if short == "complex" and len(args) <= 2 and all(isinstance(a, (int, float)) for a in args):
        return complex(*args)
    if short == "bytearray":
        if not args:
            return bytearray()
        if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
            return bytearray(args[0])
        if len(args) == 2 and isinstance(args[0], str):
            return bytearray(_encode(*args))
        raise FormatError("bytearray with unexpected arguments")
    if short == "bytes" and not args:
        return b""
    if short == "bytes" and len(args) == 1 and isinstance(args[0], (bytes, bytearray, list)):
        try:
            return bytes(args[0])
        except (TypeError, ValueError):
            raise FormatError("bytes with unexpected arguments") from None
    if name == "_codecs.encode":
        return _encode(*args)
    if name == "torch.serialization._get_layout" and len(args) == 1 and isinstance(args[0], str):
        return args[0]  # a layout by its name ("torch.sparse_csr"): what a sparse tensor's rebuild reads
    if name == "torch.Size":
        if len(args) == 1 and isinstance(args[0], (tuple, list)) and all(isinstance(d, int) for d in args[0]):
            return tuple(args[0])
        if not args:
            return ()
        raise FormatError("torch.Size with unexpected arguments")
    return _UNKNOWN


def _encode(text: Any = "", encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """``_codecs.encode``, used by protocol-2 pickles for bytes; only the plain text codecs."""
    if not isinstance(text, str) or not isinstance(encoding, str) or errors != "strict":
        raise FormatError("_codecs.encode with unexpected arguments")
    if encoding.lower().replace("-", "").replace("_", "") not in SAFE_CODECS:
        raise RefusedGlobal(f"_codecs.encode({encoding!r})")
    return codecs.encode(text, encoding, errors)


# -- opcode handlers -------------------------------------------------------------------------------------------
def _stop(u: Unpickler) -> None:  # handled in the loop
    pass


def _proto(u: Unpickler) -> None:
    proto = u._n(1)[0]
    if proto > 5:
        raise FormatError(f"unsupported pickle protocol {proto}")


def _frame(u: Unpickler) -> None:
    u._n(8)  # frames only group opcodes; the reader does not need them


def _mark(u: Unpickler) -> None:
    u.metastack.append(u.stack)
    u.stack = []


def _push(value: Any) -> Callable[[Unpickler], None]:
    def handler(u: Unpickler) -> None:
        u.stack.append(value() if callable(value) else value)
    return handler


def _int_text(u: Unpickler) -> None:
    line = u._line()
    if line == b"00":
        u.stack.append(False)
    elif line == b"01":
        u.stack.append(True)
    else:
        try:
            u.stack.append(int(line, 0) if len(line) < 4000 else _too_long())
        except ValueError:
            raise FormatError("malformed INT in the pickle") from None


def _too_long() -> int:
    raise FormatError("an integer with more than 4000 digits")


def _long_text(u: Unpickler) -> None:
    line = u._line()
    if line.endswith(b"L"):
        line = line[:-1]
    if len(line) > 4000:
        _too_long()
    try:
        u.stack.append(int(line, 0))
    except ValueError:
        raise FormatError("malformed LONG in the pickle") from None


def _long_bin(size: int) -> Callable[[Unpickler], None]:
    def handler(u: Unpickler) -> None:
        n = int.from_bytes(u._n(size), "little", signed=size == 4)
        if n > 4096:
            _too_long()
        u.stack.append(int.from_bytes(u._n(n), "little", signed=True) if n else 0)
    return handler


def _fixed(fmt: str) -> Callable[[Unpickler], None]:
    size = struct.calcsize(fmt)

    def handler(u: Unpickler) -> None:
        u.stack.append(struct.unpack(fmt, u._n(size))[0])
    return handler


def _float_text(u: Unpickler) -> None:
    try:
        u.stack.append(float(u._line()))
    except ValueError:
        raise FormatError("malformed FLOAT in the pickle") from None


def _sized(fmt: str, kind: str) -> Callable[[Unpickler], None]:
    size = struct.calcsize(fmt)

    def handler(u: Unpickler) -> None:
        n = struct.unpack(fmt, u._n(size))[0]
        data = u._n(n)
        if kind == "unicode":
            try:
                u.stack.append(data.decode("utf-8", "surrogatepass"))
            except UnicodeDecodeError:
                raise FormatError("malformed text in the pickle") from None
        elif kind == "bytes":
            u.stack.append(data)
        elif kind == "bytearray":
            u.stack.append(bytearray(data))
        else:  # a Python 2 str
            try:
                u.stack.append(u._text(data))
            except UnicodeDecodeError:
                u.stack.append(data)
    return handler


def _string_text(u: Unpickler) -> None:
    line = u._line()
    if len(line) < 2 or line[:1] != line[-1:] or line[:1] not in (b"'", b'"'):
        raise FormatError("malformed STRING in the pickle")
    try:
        data = codecs.escape_decode(line[1:-1])[0]
        u.stack.append(u._text(data))
    except (ValueError, UnicodeDecodeError):
        raise FormatError("malformed STRING in the pickle") from None


def _unicode_text(u: Unpickler) -> None:
    try:
        u.stack.append(str(u._line(), "raw-unicode-escape"))
    except UnicodeDecodeError:
        raise FormatError("malformed UNICODE in the pickle") from None


def _tuple_n(n: int) -> Callable[[Unpickler], None]:
    def handler(u: Unpickler) -> None:
        if n == 0:
            u.stack.append(())
            return
        items = [u._pop() for _ in range(n)][::-1]
        u.stack.append(tuple(items))
    return handler


def _tuple(u: Unpickler) -> None:
    items = u._pop_mark()  # (before naming u.stack: popping the mark replaces it)
    u.stack.append(tuple(items))


def _list(u: Unpickler) -> None:
    items = u._pop_mark()
    u.stack.append(items)


def _dict(u: Unpickler) -> None:
    items = u._pop_mark()
    if len(items) % 2:
        raise FormatError("DICT with an odd number of items")
    u.hashable(items[0::2])
    u.stack.append(_setitems({}, items))


def _setitems(target: Any, items: list) -> Any:
    for i in range(0, len(items), 2):
        k, v = items[i], items[i + 1]
        try:
            if isinstance(target, Inert):
                if type(target) is Inert:
                    target.__class__ = InertMapping  # a dict subclass: its entries are listed like a dict's
                target.dict_items[k] = v
            elif isinstance(target, dict):
                target[k] = v
            else:
                raise FormatError(f"SETITEM on a {type(target).__name__}: not a checkpoint")
        except TypeError:
            raise FormatError("a dictionary key the pickle gives is unhashable") from None
    return target


def _frozenset(u: Unpickler) -> None:
    items = u._pop_mark()
    u.hashable(items)
    try:
        u.stack.append(frozenset(items))
    except TypeError:
        raise FormatError("a frozenset of unhashable values") from None


def _append(u: Unpickler) -> None:
    value = u._pop()
    _extend(u._top(), [value])


def _appends(u: Unpickler) -> None:
    items = u._pop_mark()
    _extend(u._top(), items)


def _extend(target: Any, items: list) -> None:
    if type(target) is list:
        target.extend(items)
    elif isinstance(target, Inert):
        target.list_items.extend(items)
    else:
        raise FormatError(f"APPEND on a {type(target).__name__}: not a checkpoint")


def _setitem(u: Unpickler) -> None:
    v = u._pop()
    k = u._pop()
    u.hashable([k])
    _setitems(u._top(), [k, v])


def _setitems_op(u: Unpickler) -> None:
    items = u._pop_mark()
    if len(items) % 2:
        raise FormatError("SETITEMS with an odd number of items")
    u.hashable(items[0::2])
    _setitems(u._top(), items)


def _additems(u: Unpickler) -> None:
    items = u._pop_mark()
    target = u._top()
    if type(target) is not set:
        raise FormatError(f"ADDITEMS on a {type(target).__name__}: not a checkpoint")
    u.hashable(items)
    try:
        target.update(items)
    except TypeError:
        raise FormatError("a set of unhashable values") from None


def _pop_op(u: Unpickler) -> None:
    if u.stack:
        u.stack.pop()
    else:
        u._pop_mark()


def _dup(u: Unpickler) -> None:
    u.stack.append(u._top())


def _pop_mark_op(u: Unpickler) -> None:
    u._pop_mark()


def _get_text(u: Unpickler) -> None:
    try:
        u._memo_get(int(u._line()))
    except ValueError:
        raise FormatError("malformed GET in the pickle") from None


def _put_text(u: Unpickler) -> None:
    try:
        u._memo_put(int(u._line()))
    except ValueError:
        raise FormatError("malformed PUT in the pickle") from None


def _memo_op(fmt: str, put: bool) -> Callable[[Unpickler], None]:
    size = struct.calcsize(fmt)

    def handler(u: Unpickler) -> None:
        idx = struct.unpack(fmt, u._n(size))[0]
        (u._memo_put if put else u._memo_get)(idx)
    return handler


def _memoize(u: Unpickler) -> None:
    u._memo_put(len(u.memo))


def _global_text(u: Unpickler) -> None:
    try:
        module = u._line().decode("utf-8")
        name = u._line().decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("malformed GLOBAL in the pickle") from None
    u.stack.append(u._global(module, name))


def _stack_global(u: Unpickler) -> None:
    name = u._pop()
    module = u._pop()
    if not isinstance(module, str) or not isinstance(name, str):
        raise FormatError("STACK_GLOBAL with non-text names")
    u.stack.append(u._global(module, name))


def _ext(size: int) -> Callable[[Unpickler], None]:
    def handler(u: Unpickler) -> None:
        import copyreg

        code = int.from_bytes(u._n(size), "little")
        key = copyreg._inverted_registry.get(code)  # a table lookup in this process, nothing is called
        if key is None:
            raise FormatError(f"the pickle uses unregistered extension code {code}")
        u.stack.append(u._global(*key))
    return handler


def _reduce(u: Unpickler) -> None:
    args = u._pop()
    func = u._pop()
    u.stack.append(u._call(func, args))


def _newobj(u: Unpickler) -> None:
    args = u._pop()
    cls = u._pop()
    u.stack.append(u._new(cls, args, {}))


def _newobj_ex(u: Unpickler) -> None:
    kwargs = u._pop()
    args = u._pop()
    cls = u._pop()
    u.stack.append(u._new(cls, args, kwargs, how="newobj"))


def _inst(u: Unpickler) -> None:
    try:
        module = u._line().decode("utf-8")
        name = u._line().decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("malformed INST in the pickle") from None
    cls = u._global(module, name)
    args = tuple(u._pop_mark())
    u.stack.append(u._call(cls, args))


def _obj(u: Unpickler) -> None:
    items = u._pop_mark()
    if not items:
        raise FormatError("OBJ without a class")
    u.stack.append(u._call(items[0], tuple(items[1:])))


def _build(u: Unpickler) -> None:
    state = u._pop()
    u._build(u._top(), state)


def _persid_text(u: Unpickler) -> None:
    try:
        pid = u._line().decode("ascii")
    except UnicodeDecodeError:
        raise FormatError("malformed PERSID in the pickle") from None
    u.stack.append(u.hooks.persistent_load(pid))


def _binpersid(u: Unpickler) -> None:
    u.stack.append(u.hooks.persistent_load(u._pop()))


def _no_buffers(u: Unpickler) -> None:
    raise FormatError("the pickle uses out-of-band buffers: not a checkpoint")


_DISPATCH: dict[int, Callable[[Unpickler], None]] = {
    ord(b"."): _stop, 0x80: _proto, 0x95: _frame, ord(b"("): _mark,
    ord(b"N"): _push(None), 0x88: _push(True), 0x89: _push(False),
    ord(b"I"): _int_text, ord(b"J"): _fixed("<i"), ord(b"K"): _fixed("<B"), ord(b"M"): _fixed("<H"),
    ord(b"L"): _long_text, 0x8A: _long_bin(1), 0x8B: _long_bin(4),
    ord(b"F"): _float_text, ord(b"G"): _fixed(">d"),
    ord(b"S"): _string_text, ord(b"T"): _sized("<i", "str"), ord(b"U"): _sized("<B", "str"),
    ord(b"V"): _unicode_text, ord(b"X"): _sized("<I", "unicode"), 0x8C: _sized("<B", "unicode"),
    0x8D: _sized("<Q", "unicode"),
    ord(b"B"): _sized("<I", "bytes"), ord(b"C"): _sized("<B", "bytes"), 0x8E: _sized("<Q", "bytes"),
    0x96: _sized("<Q", "bytearray"), 0x97: _no_buffers, 0x98: _no_buffers,
    ord(b")"): _tuple_n(0), 0x85: _tuple_n(1), 0x86: _tuple_n(2), 0x87: _tuple_n(3), ord(b"t"): _tuple,
    ord(b"]"): _push(list), ord(b"l"): _list, ord(b"}"): _push(dict), ord(b"d"): _dict,
    0x8F: _push(set), 0x91: _frozenset, 0x90: _additems,
    ord(b"a"): _append, ord(b"e"): _appends, ord(b"s"): _setitem, ord(b"u"): _setitems_op,
    ord(b"0"): _pop_op, ord(b"2"): _dup, ord(b"1"): _pop_mark_op,
    ord(b"g"): _get_text, ord(b"h"): _memo_op("<B", False), ord(b"j"): _memo_op("<I", False),
    ord(b"p"): _put_text, ord(b"q"): _memo_op("<B", True), ord(b"r"): _memo_op("<I", True), 0x94: _memoize,
    ord(b"c"): _global_text, 0x93: _stack_global, 0x82: _ext(1), 0x83: _ext(2), 0x84: _ext(4),
    ord(b"R"): _reduce, 0x81: _newobj, 0x92: _newobj_ex, ord(b"i"): _inst, ord(b"o"): _obj, ord(b"b"): _build,
    ord(b"P"): _persid_text, ord(b"Q"): _binpersid,
}
OPCODES = frozenset(bytes([op]) for op in _DISPATCH)  # every pickle opcode (pickletools.opcodes' 68), as bytes


def unpickle(data: bytes | BinaryIO, hooks: Hooks | None = None) -> tuple[Any, set[str]]:
    """One pickle from ``data``: the object and the global names it refers to. Raises FormatError or
    RefusedGlobal (without a location: the caller adds the file)."""
    f = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    u = Unpickler(f, hooks or Hooks())
    return u.load(), u.globals_seen

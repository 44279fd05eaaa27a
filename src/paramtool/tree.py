"""Find the tensors inside a checkpoint's container and give them names.

One walk serves every source: the stand-in objects of the listing unpickler (``FakeTensor``, ``FakeModule``)
and real torch objects (tensors, ``nn.Module``) are visited the same way, so a file is named identically
whether it was only listed or fully loaded.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any

from .errors import ParamtoolError, UsageError
from .toc import FakeModule, FakeTensor, TensorInfo, contiguous_stride, kind_text

Path = tuple[object, ...]

# Top-level entries of a training checkpoint that hold optimizer/scheduler state rather than parameters.
# Their tensors are kept on write but are not listed as parameters unless picked with --key.
OPTIMIZER_KEYS = frozenset(
    {
        "optimizer", "optimizers", "optimizer_states", "optimizer_state_dict", "optimizer_state", "optim",
        "opt", "opt_state", "lr_scheduler", "lr_schedulers", "scheduler", "scheduler_state_dict", "scaler",
        "grad_scaler", "amp", "loops", "callbacks",
    }
)


def _torch():
    return sys.modules.get("torch")


def is_tensor(obj: Any) -> bool:
    """A tensor, or a bare storage (listed as the 1-D tensor of its elements, as ``torch.save`` keeps it)."""
    if isinstance(obj, FakeTensor):
        return True
    torch = _torch()
    return torch is not None and isinstance(obj, (torch.Tensor, torch.storage.TypedStorage, torch.UntypedStorage))


def is_module(obj: Any) -> bool:
    if isinstance(obj, FakeModule):
        return True
    torch = _torch()
    return torch is not None and isinstance(obj, torch.nn.Module)


def _inert_state(obj: Any) -> dict | None:
    """An inert object's attributes (its BUILD state as a dict, slots merged), or None: not an object, or one
    whose state is not attributes."""
    from .formats.unpickle import Inert

    if not isinstance(obj, Inert) or not obj.has_state:
        return None
    state = obj.state
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict) and \
            (state[0] is None or isinstance(state[0], dict)):
        return {**(state[0] or {}), **state[1]} if state[0] else state[1]
    return state if isinstance(state, dict) else None


def inert_module(obj: Any) -> bool:
    """An object of a class paramtool does not know (a torchvision or user model) whose attributes are an
    ``nn.Module``'s: its tensors are named as its ``state_dict()`` would name them, read inertly."""
    state = _inert_state(obj)
    return state is not None and isinstance(state.get("_parameters"), Mapping) \
        and isinstance(state.get("_modules"), Mapping)


def _module_dict(mod: Any) -> dict[str, Any]:
    if isinstance(mod, FakeModule):
        return mod.state
    state = _inert_state(mod)
    return state if state is not None else mod.__dict__


def _module_children(mod: Any) -> Iterator[tuple[str, Any]]:
    """A module's entries in ``state_dict`` order: parameters, persistent buffers, then child modules."""
    d = _module_dict(mod)
    skip = set(d.get("_non_persistent_buffers_set") or ())
    for name, value in (d.get("_parameters") or {}).items():
        if value is not None:
            yield name, value
    for name, value in (d.get("_buffers") or {}).items():
        if value is not None and name not in skip:
            yield name, value
    for name, value in (d.get("_modules") or {}).items():
        if value is not None:
            yield name, value


def walk(obj: Any, path: Path = (), _inside: frozenset = frozenset()) -> Iterator[tuple[Path, Any]]:
    """Yield ``(path, tensor)`` for every tensor in ``obj``, depth first, in container order. Objects of
    unknown classes are entered through their attributes (a pickled model by its module structure), never
    twice on one path (an object may link back to its parent)."""
    if is_tensor(obj):
        yield path, obj
    elif is_module(obj) or inert_module(obj):
        if id(obj) in _inside:
            return
        inside = _inside | {id(obj)}
        for name, child in _module_children(obj):
            yield from walk(child, path + (name,), inside)
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from walk(value, path + (key,), _inside)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from walk(value, path + (i,), _inside)
    elif id(obj) not in _inside:
        state = _inert_state(obj)
        if state:  # an object's tensors, named by their attribute path
            inside = _inside | {id(obj)}
            for key, value in state.items():
                if isinstance(key, str):
                    yield from walk(value, path + (key,), inside)


def child(obj: Any, key: Any) -> Any:
    """One step down a path."""
    if is_module(obj) or inert_module(obj):
        for name, value in _module_children(obj):
            if name == key:
                return value
        raise KeyError(key)
    state = _inert_state(obj) if not isinstance(obj, (Mapping, list, tuple)) else None
    if state is not None:
        return state[key]
    return obj[key]


def get_path(root: Any, path: Path) -> Any:
    obj = root
    for key in path:
        obj = child(obj, key)
    return obj


def set_path(root: Any, path: Path, value: Any) -> None:
    """Replace the object at ``path`` (used to give a tensor its own storage)."""
    parent = get_path(root, path[:-1])
    key = path[-1]
    if isinstance(parent, FakeModule) or inert_module(parent):  # a pickled module: its entry in _parameters, ...
        torch = _torch()
        for slot in ("_parameters", "_buffers", "_modules"):
            entries = _module_dict(parent).get(slot)
            if isinstance(entries, dict) and key in entries:
                old = entries[key]
                if torch is not None and isinstance(old, torch.nn.Parameter) and not isinstance(value, torch.nn.Parameter):
                    value = torch.nn.Parameter(value, requires_grad=old.requires_grad)
                entries[key] = value
                return
        raise ParamtoolError(f"cannot replace '{key}': not found in module {getattr(parent, 'cls', parent)}")
    state = _inert_state(parent) if not isinstance(parent, (Mapping, list, tuple)) else None
    if state is not None and not is_module(parent):  # an object's attribute (in its dict, or its slots)
        own = parent.state
        if isinstance(own, tuple):
            own = own[1] if key in own[1] else own[0]
        own[key] = value
        return
    if is_module(parent) and not isinstance(parent, FakeModule):
        torch = _torch()
        old = getattr(parent, key)
        if isinstance(old, torch.nn.Parameter):
            value = torch.nn.Parameter(value, requires_grad=old.requires_grad)
        setattr(parent, key, value)
    elif isinstance(parent, tuple):
        raise ParamtoolError(f"cannot replace '{key}': it sits inside a tuple")
    else:
        parent[key] = value


def find_key(root: Any, key: str) -> Path:
    """Resolve ``--key a.b.c`` to a path; keys may themselves contain dots, so match greedily."""
    path: list[Any] = []
    obj, rest = root, key
    while rest:
        options: list[tuple[str, Any]] = []
        if isinstance(obj, Mapping):
            options = [(str(k), k) for k in obj.keys()]
        elif isinstance(obj, (list, tuple)):
            options = [(str(i), i) for i in range(len(obj))]
        elif is_module(obj) or inert_module(obj):
            options = [(n, n) for n, _ in _module_children(obj)]
        elif _inert_state(obj):
            options = [(k, k) for k in _inert_state(obj) if isinstance(k, str)]
        match = None
        for text, k in sorted(options, key=lambda o: -len(o[0])):
            if rest == text or rest.startswith(text + "."):
                match = (text, k)
                break
        if match is None:
            here = ", ".join(t for t, _ in options[:8]) or "nothing"
            raise UsageError(f"--key '{key}' not found: at '{rest}' the choices are {here}")
        path.append(match[1])
        obj = child(obj, match[1])
        rest = rest[len(match[0]) + 1 :]
    return tuple(path)


def _join(path: Path) -> str:
    return ".".join(str(p) for p in path)


def assign_names(root: Any, key: str | None = None) -> dict[str, Path]:
    """Name every parameter tensor of ``root``: name -> path.

    Tensors are named by their path inside the container only where that is needed to tell them apart:
    a common leading path (``model`` in ``{"epoch": 3, "model": {...}}``) is dropped. Optimizer and
    scheduler state is not listed unless ``key`` picks it.
    """
    base: Path = find_key(root, key) if key else ()
    sub = get_path(root, base)
    found = [(p, t) for p, t in walk(sub)]
    if not key and isinstance(sub, Mapping):
        params = [(p, t) for p, t in found if not (len(p) > 1 and str(p[0]) in OPTIMIZER_KEYS)]
        if params:
            found = params
    rel = [p for p, _ in found]
    strip = 0
    if not key and rel and isinstance(sub, Mapping):
        while all(len(p) > strip + 1 for p in rel) and len({p[strip] for p in rel}) == 1:
            strip += 1
    names: dict[str, Path] = {}
    for p in rel:
        name = _join(p[strip:])
        if name in names:
            raise ParamtoolError(
                f"two tensors would both be named '{name}' ({_join(names[name])} and {_join(p)}); pick one sub-tree with --key"
            )
        names[name] = base + p
    return names


def extras(root: Any, names: dict[str, Path]) -> dict[str, str]:
    """The non-tensor (or unlisted) top-level entries of a container, with a short description."""
    if not isinstance(root, Mapping):
        return {}
    used = {p[0] for p in names.values() if p}
    out: dict[str, str] = {}
    for k, v in root.items():
        if k not in used:
            out[str(k)] = describe_value(v)
    return out


def describe_value(v: Any) -> str:
    from .formats.unpickle import Global, Inert

    if is_tensor(v):
        return "tensor"
    if isinstance(v, (Inert, Global)):  # an object kept as data: its name, arguments and fields
        text = repr(v)
        return text if len(text) <= 120 else text[:117] + "..."
    if isinstance(v, (int, float, bool, str, type(None))):
        text = repr(v)
        return text if len(text) <= 60 else text[:57] + "..."
    n = sum(1 for _ in walk(v))
    kind = type(v).__name__ if not isinstance(v, FakeModule) else v.cls.rsplit(".", 1)[-1]
    size = f"{len(v)} entries" if hasattr(v, "__len__") else ""
    parts = [p for p in (size, f"{n} tensors" if n else "") if p]
    return f"{kind} ({', '.join(parts)})" if parts else kind


def plain_values(obj: Any, depth: int = 0) -> Any:
    """A sub-tree's values as JSON-ready data (Lightning's ``hyper_parameters``, an ``args`` namespace).

    Mappings and sequences stay nested; non-finite floats become ``"nan"``/``"inf"`` (the JSON convention of
    every command); a tensor or module is described, never read; any other object shows its attributes, or its
    repr when it has none.
    """
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else str(obj)
    if is_tensor(obj):
        return f"<tensor {list(obj.shape)} {str(obj.dtype).removeprefix('torch.')}>"
    if is_module(obj) or depth > 100:
        return f"<{describe_value(obj)}>"
    if isinstance(obj, Mapping):
        return {str(k): plain_values(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [plain_values(v, depth + 1) for v in obj]
    if isinstance(obj, (bytes, bytearray)):
        return f"<{len(obj)} bytes>"
    attrs = getattr(obj, "__dict__", None)
    if isinstance(attrs, dict) and attrs:
        return {str(k): plain_values(v, depth + 1) for k, v in attrs.items()}
    return repr(obj)


def tensor_info(name: str, path: Path, t: Any) -> TensorInfo:
    """Describe a stand-in or a real tensor the same way; a real tensor's storage is its data pointer."""
    if isinstance(t, FakeTensor):
        return TensorInfo(name, tuple(t.shape), t.dtype, t.storage.key, t.offset, tuple(t.stride), path, kind_text(t))
    from .values import as_tensor, kind_of

    kind = kind_of(t)
    t = as_tensor(t)
    torch = _torch()
    dtype = str(t.dtype).removeprefix("torch.")
    if t.is_nested or t.layout != torch.strided:  # (no storage of its own, nor a shape for a nested one)
        shape = (t.size(0),) if t.is_nested else tuple(t.shape)
        return TensorInfo(name, shape, dtype, ("own", name), 0, contiguous_stride(shape), path, kind)
    shape = tuple(t.shape)
    if t.is_meta or t.numel() == 0:
        storage: Any = ("own", name)
    else:
        st = t.untyped_storage()
        storage = ("mem", st.data_ptr()) if st.data_ptr() else ("own", name)
    return TensorInfo(name, shape, dtype, storage, t.storage_offset(), tuple(t.stride()) or contiguous_stride(shape), path,
                      kind)


def infos(root: Any, names: dict[str, Path]) -> list[TensorInfo]:
    return [tensor_info(n, p, get_path(root, p)) for n, p in names.items()]

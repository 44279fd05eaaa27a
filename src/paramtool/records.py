"""paramtool's value classes: what it used ``dataclasses`` for, without importing ``dataclasses``.

``dataclasses`` imports ``inspect``, and with it ``ast``, ``dis`` and ``tokenize``: 15-20 ms, about a third
of what ``inspect --json`` may take in all (issue 15 asks for a listing in 0.06 s, Python's start-up
included). paramtool's records need only this: fields from the class's annotations, in order (a base
record's first), with defaults or ``field(default_factory=...)``; a generated ``__init__``, ``__repr__`` and
``__eq__`` (as ``dataclasses`` writes them); ``frozen=True`` refuses assignment and hashes by value; and
``replace`` and ``fields``. Spelled as in ``dataclasses``, so the classes read the same.
"""
from __future__ import annotations

_MISSING = object()


class FrozenInstanceError(AttributeError):
    """Assignment to a field of a frozen record."""


class _Factory:
    __slots__ = ("make",)

    def __init__(self, make: object) -> None:
        self.make = make


def field(*, default_factory: object) -> object:
    """A field whose default is made anew for each instance (``dataclasses.field(default_factory=...)``)."""
    return _Factory(default_factory)


def fields(obj: object) -> tuple[str, ...]:
    """The field names of a record (class or instance), in order."""
    return obj.__record_fields__  # type: ignore[attr-defined]


def replace(obj: object, **changes: object) -> object:
    """A copy of ``obj`` with ``changes`` (``dataclasses.replace``)."""
    values = {name: getattr(obj, name) for name in fields(obj)}
    unknown = set(changes) - set(values)
    if unknown:
        raise TypeError(f"{type(obj).__name__} has no field {sorted(unknown)[0]!r}")
    values.update(changes)
    return type(obj)(**values)


def _frozen_setattr(self: object, name: str, value: object) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_delattr(self: object, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")


def dataclass(cls: type | None = None, /, *, frozen: bool = False):
    """Make ``cls`` a record: ``@dataclass`` or ``@dataclass(frozen=True)``."""

    def wrap(cls: type) -> type:
        names: list[str] = []
        defaults: dict[str, object] = {}
        for base in reversed(cls.__mro__[1:]):  # a base record's fields come first, as in dataclasses
            for name in base.__dict__.get("__record_fields__", ()):
                if name not in names:
                    names.append(name)
                defaults.pop(name, None)
                if name in base.__dict__.get("__record_defaults__", {}):
                    defaults[name] = base.__record_defaults__[name]
        for name in cls.__dict__.get("__annotations__", {}):
            if name not in names:
                names.append(name)
            if name in cls.__dict__:
                defaults[name] = cls.__dict__[name]
                if isinstance(defaults[name], _Factory):
                    delattr(cls, name)  # the class attribute would shadow nothing useful
        env: dict[str, object] = {"_MISSING": _MISSING, "_set": object.__setattr__}
        params, body = [], []
        for name in names:
            default = defaults.get(name, _MISSING)
            if default is _MISSING:
                if any(n in defaults for n in names[:names.index(name)]):
                    raise TypeError(f"non-default field {name!r} follows a default one in {cls.__name__}")
                params.append(name)
                value = name
            elif isinstance(default, _Factory):
                env[f"_f_{name}"] = default.make
                params.append(f"{name}=_MISSING")
                value = f"_f_{name}() if {name} is _MISSING else {name}"
            else:
                env[f"_d_{name}"] = default
                params.append(f"{name}=_d_{name}")
                value = name
            body.append(f"    _set(self, {name!r}, {value})" if frozen else f"    self.{name} = {value}")
        src = f"def __init__(self, {', '.join(params)}):\n" + ("\n".join(body) or "    pass") + "\n"
        exec(src, env)  # one small function per class, compiled once at import, as dataclasses does
        init = env["__init__"]
        init.__qualname__ = f"{cls.__qualname__}.__init__"
        cls.__init__ = init
        cls.__record_fields__ = tuple(names)
        cls.__record_defaults__ = dict(defaults)

        def __repr__(self: object) -> str:
            inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in names)
            return f"{type(self).__qualname__}({inner})"

        def __eq__(self: object, other: object) -> bool:
            if other.__class__ is not self.__class__:
                return NotImplemented
            return tuple(getattr(self, n) for n in names) == tuple(getattr(other, n) for n in names)

        if "__repr__" not in cls.__dict__:
            cls.__repr__ = __repr__
        if "__eq__" not in cls.__dict__:
            cls.__eq__ = __eq__
        if frozen:
            cls.__setattr__ = _frozen_setattr
            cls.__delattr__ = _frozen_delattr
            if "__hash__" not in cls.__dict__ or cls.__dict__["__hash__"] is None:
                cls.__hash__ = lambda self: hash(tuple(getattr(self, n) for n in names))
        elif "__hash__" not in cls.__dict__ or cls.__dict__["__hash__"] is None:
            cls.__hash__ = None  # mutable and compared by value: unhashable, as dataclasses makes it
        return cls

    return wrap if cls is None else wrap(cls)

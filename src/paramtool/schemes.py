"""The initializer registry: scheme name -> options with defaults -> a function that fills a tensor.

Scheme metadata is plain data: listing schemes, resolving a name and checking options import no torch, so
``paramtool schemes`` and ``--help`` stay fast. ``apply`` does the work with ``torch.nn.init`` (its own
functions, given the generator), computing in float32 (float64 for float64 tensors) on a fresh contiguous
CPU buffer whenever the tensor is not itself such a buffer, and always writes back in place: dtype, shape,
layout and ties are kept, and a view (a transpose or slice of a tied tensor) is written through to its base.
"""
from __future__ import annotations

import hashlib
import json
import math

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any

from .errors import ParamtoolError, UsageError
from .records import dataclass


class _Required:
    """The default of an option that must be given (torch has no default for it either)."""

    _instance: "_Required | None" = None

    def __new__(cls) -> "_Required":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "REQUIRED"

    def __reduce__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Option:
    name: str  # the Python name; the CLI flag is ``--`` + name with ``_`` -> ``-``
    type: type  # float, int or str
    default: Any  # REQUIRED when the option must be given
    choices: tuple[str, ...] | None = None
    help: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


# Schemes whose values are exact (not drawn from a distribution): they also take integer and bool tensors.
_EXACT = frozenset({"constant", "zeros", "ones", "eye", "dirac"})


@dataclass(frozen=True)
class Scheme:
    name: str
    options: tuple[Option, ...] = ()
    min_dims: int = 0
    aliases: tuple[str, ...] = ()
    doc: str = ""
    max_dims: int | None = None

    @property
    def needs(self) -> str:
        """The shape requirement in words ("" when any shape will do)."""
        if self.max_dims is not None and self.max_dims == self.min_dims:
            return f"needs exactly {self.min_dims} dims"
        if self.max_dims is not None:
            return f"needs {self.min_dims} to {self.max_dims} dims"
        if self.min_dims:
            return f"needs ≥ {self.min_dims} dims"
        return ""

    def accepts(self, shape: tuple[int, ...], dtype: Any = None, options: dict | None = None) -> str | None:
        """None when the scheme can fill a tensor of this shape, else why it is skipped.

        ``dtype`` (a name such as "int64", or a torch.dtype) and ``options`` (resolved) are optional; given,
        they are checked too: random schemes need a floating-point tensor, and ``dirac``'s groups must
        divide dim 0.
        """
        shape = tuple(shape)
        ndim = len(shape)
        if ndim < self.min_dims or (self.max_dims is not None and ndim > self.max_dims):
            return self.needs
        if self.min_dims >= 2 and any(d == 0 for d in shape):
            return "is empty"
        if dtype is not None:
            kind = _dtype_kind(dtype)
            if self.name not in _EXACT and kind != "float":
                return f"is {_dtype_name(dtype)}, not floating-point"
            if kind == "complex":
                return f"is {_dtype_name(dtype)}, not real"
            if self.name == "constant" and kind in ("int", "bool") and options is not None:
                value = options.get("value")
                if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
                    return f"is {_dtype_name(dtype)} and --value {value} is not an integer"
        if self.name == "dirac" and options is not None:
            groups = options.get("groups", 1)
            if isinstance(groups, int) and groups > 0 and shape[0] % groups:
                return f"dim 0 of {shape[0]} is not divisible by --groups {groups}"
        return None


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_kind(dtype: Any) -> str:
    from .formats.dtypes import kind

    return kind(_dtype_name(dtype))


_GAIN = Option("gain", float, 1.0, help="scaling factor")
_MEAN = Option("mean", float, 0.0, help="mean of the normal distribution")
_STD = Option("std", float, 1.0, help="standard deviation of the normal distribution")
_NONLINEARITIES = ("leaky_relu", "relu", "linear", "sigmoid", "tanh", "selu",
                   "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
_KAIMING = (
    Option("negative_slope", float, 0.0, help="negative slope of the rectifier after this layer (leaky_relu)"),
    Option("mode", str, "fan_in", ("fan_in", "fan_out"), "fan_in keeps the forward variance, fan_out the backward"),
    Option("nonlinearity", str, "leaky_relu", _NONLINEARITIES, "the non-linear function after this layer"),
)

_LIST = [
    Scheme("normal", (_MEAN, _STD), doc="N(mean, std²)"),
    Scheme("uniform", (Option("low", float, 0.0, help="lower bound"), Option("high", float, 1.0, help="upper bound")),
           doc="U(low, high)"),
    Scheme("constant", (Option("value", float, REQUIRED, help="the value"),), doc="every element = value"),
    Scheme("zeros", doc="all 0"),
    Scheme("ones", doc="all 1"),
    Scheme("xavier_uniform", (_GAIN,), 2, ("xavier",), "Glorot: U(±gain·√(6/(fan_in+fan_out)))"),
    Scheme("xavier_normal", (_GAIN,), 2, (), "Glorot: N(0, gain²·2/(fan_in+fan_out))"),
    Scheme("kaiming_uniform", _KAIMING, 2, ("kaiming",), "He: U(±gain·√(3/fan))"),
    Scheme("kaiming_normal", _KAIMING, 2, (), "He: N(0, gain²/fan)"),
    Scheme("trunc_normal", (_MEAN, _STD, Option("low", float, -2.0, help="lower cut-off (absolute, torch's a)"),
                            Option("high", float, 2.0, help="upper cut-off (absolute, torch's b)")),
           doc="N(mean, std²), values outside low..high redrawn"),
    Scheme("orthogonal", (_GAIN,), 2, (), "a (semi-)orthogonal matrix times gain"),
    Scheme("eye", (), 2, (), "the identity matrix", max_dims=2),
    Scheme("dirac", (Option("groups", int, 1, help="number of groups"),), 3, (),
           "Dirac delta: a conv layer passes its input through", max_dims=5),
    Scheme("sparse", (Option("sparsity", float, REQUIRED, help="fraction of zeros in each column"),
                      Option("std", float, 0.01, help="standard deviation of the non-zero values")), 2, (),
           "each column: a fraction sparsity of zeros, the rest N(0, std²)", max_dims=2),
    Scheme("masked_uniform", (Option("low", float, -10.0, help="lower bound"), Option("high", float, 10.0, help="upper bound"),
                              Option("threshold", float, 5.0, help="values with |v| below this become 0")),
           doc="U(low, high), then every |v| < threshold set to 0 (D2L's custom init)"),
]
SCHEMES: dict[str, Scheme] = {s.name: s for s in _LIST}
ALIASES: dict[str, str] = {a: s.name for s in _LIST for a in s.aliases}


def get_scheme(name: str) -> Scheme:
    """The scheme named ``name`` or by one of its aliases; an unknown name is a usage error."""
    canonical = ALIASES.get(name, name)
    if canonical not in SCHEMES:
        valid = ", ".join(f"{s.name} (= {', '.join(s.aliases)})" if s.aliases else s.name for s in _LIST)
        raise UsageError(f"unknown scheme '{name}'; choose one of: {valid}")
    return SCHEMES[canonical]


def _convert(scheme: Scheme, opt: Option, value: Any) -> Any:
    what = {float: "a number", int: "an integer", str: "a string"}.get(opt.type, opt.type.__name__)
    bad = UsageError(f"{opt.flag} must be {what}, not {value!r} (scheme '{scheme.name}')")
    if opt.type is str:
        if not isinstance(value, str):
            raise bad
        return value
    if isinstance(value, bool):
        raise bad
    if opt.type is int:
        if isinstance(value, int):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if not number.is_integer():
            raise bad
        return int(number)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise bad from None
    if not math.isfinite(number) and opt.name != "value":
        raise UsageError(f"{opt.flag} must be a finite number, not {value!r} (scheme '{scheme.name}')")
    return number


def resolve_options(scheme: Scheme, given: dict[str, Any]) -> dict[str, Any]:
    """The scheme's options, defaults filled in and typed; a foreign, missing or invalid option is a usage error."""
    known = {o.name: o for o in scheme.options}
    for name in given:
        if name not in known:
            flag = "--" + str(name).replace("_", "-")
            takes = ", ".join(o.flag for o in scheme.options) or "no options"
            raise UsageError(f"{flag} does not apply to scheme '{scheme.name}' (it takes {takes})")
    out: dict[str, Any] = {}
    for opt in scheme.options:
        value = given.get(opt.name, opt.default)
        if value is REQUIRED or value is None:
            raise UsageError(f"scheme '{scheme.name}' needs {opt.flag}")
        value = _convert(scheme, opt, value)
        if opt.choices and value not in opt.choices:
            raise UsageError(f"{opt.flag} must be one of {', '.join(opt.choices)}, not '{value}'")
        out[opt.name] = value
    if "low" in out and out["low"] > out["high"]:
        raise UsageError(f"--low ({out['low']:g}) is above --high ({out['high']:g})")
    if "std" in out:
        if scheme.name == "trunc_normal" and out["std"] <= 0:
            raise UsageError("--std must be positive for scheme 'trunc_normal'")
        if out["std"] < 0:
            raise UsageError("--std must not be negative")
    if "sparsity" in out and not 0 <= out["sparsity"] <= 1:
        raise UsageError("--sparsity must be between 0 and 1")
    if "groups" in out and out["groups"] < 1:
        raise UsageError("--groups must be at least 1")
    return out


def schemes_table() -> list[dict]:
    """Rows for ``paramtool schemes``: {"name", "options": {name: default, None if required}, "aliases", "doc", ...}."""
    rows = []
    for s in _LIST:
        rows.append({
            "name": s.name,
            "options": {o.name: (None if o.required else o.default) for o in s.options},
            "aliases": list(s.aliases),
            "doc": s.doc,
            "required": [o.name for o in s.options if o.required],
            "choices": {o.name: list(o.choices) for o in s.options if o.choices},
            "needs": s.needs,
        })
    return rows


def generator_for(seed: int | None, scheme: str, options: dict, name: str, shape: Any, dtype: Any) -> Any:
    """A CPU generator whose stream depends only on (seed, scheme, options, name, shape, dtype); None without a seed.

    The 64-bit seed is the head of a SHA-256 over a canonical JSON encoding of those values, so it is the same
    in every process and on every platform, whatever else is selected and in whatever order.
    """
    if seed is None:
        return None
    import torch

    canonical = ALIASES.get(scheme, scheme)
    key = json.dumps(
        [int(seed), canonical, sorted((str(k), v) for k, v in options.items()), name,
         [int(d) for d in shape], _dtype_name(dtype)],
        default=str, ensure_ascii=True, separators=(",", ":"),
    )
    derived = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return torch.Generator(device="cpu").manual_seed(derived)


def _sparse(t: Any, sparsity: float, std: float, g: Any) -> Any:
    """torch.nn.init.sparse_, with the row permutations drawn from ``g`` too (torch's draws them globally)."""
    import torch

    rows, cols = t.shape
    num_zeros = math.ceil(sparsity * rows)
    t.normal_(0, std, generator=g)
    if num_zeros:
        for col in range(cols):
            t[torch.randperm(rows, generator=g)[:num_zeros], col] = 0
    return t


def _fill(scheme: Scheme, o: dict, t: Any, g: Any, target: Any) -> None:
    """Fill ``t`` (contiguous, CPU, float32/float64) with new values, as torch.nn.init does."""
    from torch.nn import init

    name = scheme.name
    if name == "normal":
        init.normal_(t, o["mean"], o["std"], generator=g)
    elif name == "uniform":
        init.uniform_(t, o["low"], o["high"], generator=g)
    elif name == "xavier_uniform":
        init.xavier_uniform_(t, o["gain"], generator=g)
    elif name == "xavier_normal":
        init.xavier_normal_(t, o["gain"], generator=g)
    elif name in ("kaiming_uniform", "kaiming_normal"):
        fn = init.kaiming_uniform_ if name == "kaiming_uniform" else init.kaiming_normal_
        fn(t, o["negative_slope"], o["mode"], o["nonlinearity"], generator=g)
    elif name == "trunc_normal":
        init.trunc_normal_(t, o["mean"], o["std"], o["low"], o["high"], generator=g)
    elif name == "orthogonal":
        init.orthogonal_(t, o["gain"], generator=g)
    elif name == "sparse":
        _sparse(t, o["sparsity"], o["std"], g)
    elif name == "masked_uniform":
        init.uniform_(t, o["low"], o["high"], generator=g)
        if target != t.dtype:  # threshold what will be stored, so no rounded value ends up below it
            t.copy_(t.to(target))
        t.masked_fill_(t.abs() < o["threshold"], 0.0)
    else:
        raise AssertionError(name)


def apply(scheme: Scheme, options: dict, tensor: Any, generator: Any) -> None:
    """Fill ``tensor`` in place with new values; its dtype, shape, layout and storage never change.

    ``tensor`` may be a view of a tied storage (a transpose, a slice): the values are written through it.
    ``options`` are those of ``resolve_options``; ``generator`` is from ``generator_for`` (None: torch's global RNG).
    """
    import torch
    from torch.nn import init

    name = scheme.name
    with torch.no_grad():
        if tensor.is_meta or tensor.numel() == 0:
            return
        shape = tuple(tensor.shape)
        reason = scheme.accepts(shape, tensor.dtype, options)
        if reason:
            raise ParamtoolError(f"scheme '{name}' cannot fill a tensor of shape {list(shape)} ({reason})")
        if name in ("zeros", "ones", "constant"):  # exact values: straight into place, in the tensor's own dtype
            tensor.fill_({"zeros": 0, "ones": 1}.get(name, options.get("value")))
            return
        if name in ("eye", "dirac"):
            buf = torch.empty(shape, dtype=tensor.dtype)
            init.eye_(buf) if name == "eye" else init.dirac_(buf, options.get("groups", 1))
            tensor.copy_(buf)
            return
        work = torch.float64 if tensor.dtype == torch.float64 else torch.float32
        if tensor.dtype == work and tensor.device.type == "cpu" and tensor.is_contiguous():
            _fill(scheme, options, tensor, generator, work)  # straight into place: no second buffer
        else:  # half types, other devices, and views such as a transpose of a tied tensor go through a buffer
            buf = torch.empty(shape, dtype=work)
            _fill(scheme, options, buf, generator, tensor.dtype)
            tensor.copy_(buf)

"""The initializer registry: scheme name -> options with defaults -> a function that fills a tensor.

Scheme metadata is plain data (listing schemes imports no torch); ``apply`` does the work with
``torch.nn.init`` semantics, in float32 where torch cannot compute in the tensor's own dtype, and always
writes back in place, so dtype, shape, layout and ties are kept.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from .errors import UsageError

REQUIRED = None  # an option with this default must be given


@dataclass(frozen=True)
class Option:
    name: str
    type: type
    default: Any
    help: str = ""
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Scheme:
    name: str
    options: tuple[Option, ...] = ()
    min_dims: int = 0
    aliases: tuple[str, ...] = ()
    doc: str = ""
    max_dims: int | None = None

    def accepts(self, shape: tuple[int, ...]) -> str | None:
        """None when the scheme can fill a tensor of this shape, else why not."""
        if self.name == "eye" and len(shape) != 2:
            return "needs exactly 2 dims"
        if self.name == "dirac" and not 3 <= len(shape) <= 5:
            return "needs 3 to 5 dims"
        if len(shape) < self.min_dims:
            return f"needs ≥ {self.min_dims} dims"
        if self.min_dims >= 2 and any(d == 0 for d in shape):
            return "is empty"
        return None


_GAIN = Option("gain", float, 1.0, "scaling factor")
_MEAN = Option("mean", float, 0.0, "mean")
_STD = Option("std", float, 1.0, "standard deviation")
_KAIMING = (
    Option("negative_slope", float, 0.0, "negative slope of the rectifier after this layer"),
    Option("mode", str, "fan_in", "fan_in keeps forward variance, fan_out backward", ("fan_in", "fan_out")),
    Option("nonlinearity", str, "leaky_relu", "the non-linearity after this layer",
           ("leaky_relu", "relu", "linear", "sigmoid", "tanh", "selu", "conv1d", "conv2d", "conv3d")),
)

_LIST = [
    Scheme("normal", (_MEAN, _STD), doc="N(mean, std²)"),
    Scheme("uniform", (Option("low", float, 0.0), Option("high", float, 1.0)), doc="U(low, high)"),
    Scheme("constant", (Option("value", float, REQUIRED, "the value"),), doc="every element = value"),
    Scheme("zeros", doc="all 0"),
    Scheme("ones", doc="all 1"),
    Scheme("xavier_uniform", (_GAIN,), 2, ("xavier",), "Glorot: U(±gain·√(6/(fan_in+fan_out)))"),
    Scheme("xavier_normal", (_GAIN,), 2, (), "Glorot: N(0, gain²·2/(fan_in+fan_out))"),
    Scheme("kaiming_uniform", _KAIMING, 2, ("kaiming",), "He: U(±gain·√(3/fan))"),
    Scheme("kaiming_normal", _KAIMING, 2, (), "He: N(0, gain²/fan)"),
    Scheme("trunc_normal", (_MEAN, _STD, Option("low", float, -2.0), Option("high", float, 2.0)),
           doc="N(mean, std²) redrawn outside [low, high]"),
    Scheme("orthogonal", (_GAIN,), 2, (), "a (semi-)orthogonal matrix times gain"),
    Scheme("eye", (), 2, (), "identity matrix (2-D only)"),
    Scheme("dirac", (Option("groups", int, 1, "number of groups"),), 3, (), "Dirac delta: conv layers keep their input"),
    Scheme("sparse", (Option("sparsity", float, REQUIRED, "fraction of zeros in each column"),
                      Option("std", float, 0.01, "std of the non-zero values")), 2, (), "sparse, N(0, std²) non-zeros"),
    Scheme("masked_uniform", (Option("low", float, -10.0), Option("high", float, 10.0), Option("threshold", float, 5.0)),
           doc="U(low, high), then every |v| < threshold set to 0 (D2L's custom init)"),
]
SCHEMES: dict[str, Scheme] = {s.name: s for s in _LIST}
_ALIASES = {a: s.name for s in _LIST for a in s.aliases}


def get_scheme(name: str) -> Scheme:
    canonical = _ALIASES.get(name, name)
    if canonical not in SCHEMES:
        valid = ", ".join(list(SCHEMES) + list(_ALIASES))
        raise UsageError(f"unknown scheme '{name}'; choose one of: {valid}")
    return SCHEMES[canonical]


def resolve_options(scheme: Scheme, given: dict[str, Any]) -> dict[str, Any]:
    """The scheme's options with defaults filled in; a foreign, missing or invalid option is a usage error."""
    known = {o.name: o for o in scheme.options}
    for name in given:
        if name not in known:
            raise UsageError(f"--{name.replace('_', '-')} does not apply to scheme '{scheme.name}'")
    out: dict[str, Any] = {}
    for opt in scheme.options:
        value = given.get(opt.name, opt.default)
        if value is REQUIRED:
            raise UsageError(f"scheme '{scheme.name}' needs --{opt.name.replace('_', '-')}")
        try:
            value = opt.type(value)
        except (TypeError, ValueError):
            raise UsageError(f"--{opt.name.replace('_', '-')} must be a {opt.type.__name__}, not {value!r}") from None
        if opt.choices and value not in opt.choices:
            raise UsageError(f"--{opt.name.replace('_', '-')} must be one of {', '.join(opt.choices)}, not '{value}'")
        out[opt.name] = value
    if scheme.name in ("uniform", "masked_uniform", "trunc_normal") and out["low"] > out["high"]:
        raise UsageError(f"--low ({out['low']}) is above --high ({out['high']})")
    if "std" in out and out["std"] < 0:
        raise UsageError("--std must not be negative")
    if scheme.name == "sparse" and not 0 <= out["sparsity"] <= 1:
        raise UsageError("--sparsity must be between 0 and 1")
    return out


def schemes_table() -> list[dict]:
    return [
        {"name": s.name, "options": {o.name: o.default for o in s.options}, "aliases": list(s.aliases), "doc": s.doc}
        for s in _LIST
    ]


def generator_for(seed: int | None, scheme: str, options: dict, name: str, shape: tuple, dtype: str) -> Any:
    """A generator whose stream depends only on (seed, scheme, options, name, shape, dtype), or None."""
    if seed is None:
        return None
    import torch

    key = json.dumps([seed, scheme, sorted(options.items()), name, list(shape), dtype], default=str)
    derived = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & ((1 << 63) - 1)
    return torch.Generator().manual_seed(derived)


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def _fill(scheme: Scheme, o: dict, t: Any, g: Any) -> Any:
    """Fill the float32 tensor ``t`` with new values, following torch.nn.init exactly."""
    from torch.nn import init

    shape = tuple(t.shape)
    name = scheme.name
    if name == "normal":
        return t.normal_(o["mean"], o["std"], generator=g)
    if name == "uniform":
        return t.uniform_(o["low"], o["high"], generator=g)
    if name == "constant":
        return t.fill_(o["value"])
    if name == "zeros":
        return t.zero_()
    if name == "ones":
        return t.fill_(1.0)
    if name in ("xavier_uniform", "xavier_normal"):
        fan_in, fan_out = _fans(shape)
        std = o["gain"] * math.sqrt(2.0 / float(fan_in + fan_out))
        if name == "xavier_normal":
            return t.normal_(0.0, std, generator=g)
        bound = math.sqrt(3.0) * std
        return t.uniform_(-bound, bound, generator=g)
    if name in ("kaiming_uniform", "kaiming_normal"):
        fan_in, fan_out = _fans(shape)
        fan = fan_in if o["mode"] == "fan_in" else fan_out
        gain = init.calculate_gain(o["nonlinearity"], o["negative_slope"])
        std = gain / math.sqrt(fan)
        if name == "kaiming_normal":
            return t.normal_(0.0, std, generator=g)
        bound = math.sqrt(3.0) * std
        return t.uniform_(-bound, bound, generator=g)
    if name == "trunc_normal":
        return init.trunc_normal_(t, o["mean"], o["std"], o["low"], o["high"], generator=g)
    if name == "orthogonal":
        return init.orthogonal_(t, o["gain"], generator=g)
    if name == "eye":
        return init.eye_(t)
    if name == "dirac":
        return init.dirac_(t, o["groups"])
    if name == "sparse":
        return init.sparse_(t, o["sparsity"], o["std"], generator=g)
    if name == "masked_uniform":
        t.uniform_(o["low"], o["high"], generator=g)
        return t.masked_fill_(t.abs() < o["threshold"], 0.0)
    raise AssertionError(name)


def apply(scheme: Scheme, options: dict, tensor: Any, generator: Any) -> None:
    """Fill ``tensor`` in place (it may be a view of a tied storage); its dtype and layout never change."""
    import torch

    with torch.no_grad():
        if tensor.dtype == torch.float32 and tensor.is_contiguous():
            _fill(scheme, options, tensor, generator)  # straight into place: no second buffer
        else:  # other dtypes, and views such as a transpose of a tied tensor, go through float32
            tensor.copy_(_fill(scheme, options, torch.empty(tuple(tensor.shape), dtype=torch.float32), generator))

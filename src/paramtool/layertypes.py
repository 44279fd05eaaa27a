"""What kind of layer a tensor belongs to: its module's class where the source knows it, and normalization
layers, recognised by class or (for plain state dicts) by name.

Module classes are known for models built in Python (``nn:`` specs, factories) and for pickled models
(``torch.save(model)``: the listing unpickler keeps each module's class name); a state dict (safetensors, a
``state_dict()`` saved with torch) holds tensor names only.

Normalization layers, the rule (``init`` leaves them alone unless they are named):

- where classes are known: a tensor whose module's class name contains ``Norm`` (``LayerNorm``,
  ``BatchNorm2d``, ``GroupNorm``, ``RMSNorm``, ``LlamaRMSNorm``, ``T5LayerNorm``, …);
- in a state dict: a tensor of at most one dimension whose module's own name (the last part of its module
  path) is ``ln``, starts with ``ln_`` or ``bn``, ends with ``_ln``, or contains ``norm`` in any case
  (``ln_1``, ``ln_f``, ``LayerNorm``, ``input_layernorm``, ``norm``, ``final_layer_norm``, ``bn1``).
  Matrices are never taken for norm parameters.
"""
from __future__ import annotations

import re

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any

from . import tree
from .errors import ParamtoolError, UsageError
from .select import module_path
from .toc import FakeModule

_NORM_NAME = re.compile(r"^(ln|ln_.*|.*_ln|bn\d*|bn_.*|.*norm.*)$", re.IGNORECASE)


def class_name(module: Any) -> str:
    """``Linear`` for a live ``nn.Linear`` and for a pickled one (``torch.nn.modules.linear.Linear``)."""
    return module.cls.rsplit(".", 1)[-1] if isinstance(module, FakeModule) else type(module).__name__


def owner_classes(root: Any, names: dict[str, tree.Path]) -> dict[str, str | None]:
    """Tensor name -> the class of the module that holds it (None where a plain container holds it)."""
    out: dict[str, str | None] = {}
    for name, path in names.items():
        parent = tree.get_path(root, path[:-1]) if path else None
        out[name] = class_name(parent) if parent is not None and tree.is_module(parent) else None
    return out


def is_norm_class(cls: str | None) -> bool:
    return cls is not None and "Norm" in cls


def norm_by_name(name: str, ndim: int) -> bool:
    """A state dict's tensor that the naming rule takes for a normalization layer's (see the module doc)."""
    last = module_path(name).rsplit(".", 1)[-1]
    return ndim <= 1 and bool(last) and bool(_NORM_NAME.match(last))


def norm_tensors(names: list[str], ndims: dict[str, int], classes: dict[str, str | None]) -> list[str]:
    """The names among ``names`` that belong to normalization layers: by class where it is known, else by
    the naming rule."""
    known = any(c is not None for c in classes.values())
    if known:
        return [n for n in names if is_norm_class(classes.get(n))]
    return [n for n in names if norm_by_name(n, ndims[n])]


def _plain(cls: str) -> str:
    """``nn.Linear``, ``torch.nn.Linear`` -> ``Linear``."""
    return cls.rsplit(".", 1)[-1]


def by_type(names: list[str], types: list[str], classes: dict[str, str | None], source: str) -> list[str]:
    """The names held by a module of one of ``types`` (exact class, as ``type(m) == nn.Linear``)."""
    if not any(c is not None for c in classes.values()):
        raise ParamtoolError(
            f"--type needs module classes, and {source} holds only tensor names (a state dict); "
            "select with --layer instead (a module path, a glob such as '*.mlp.*', or a position [0][1])")
    wanted = {_plain(t) for t in types}
    for t in types:
        if not _plain(t) or not _plain(t).isidentifier():
            raise UsageError(f"--type '{t}' is not a class name (e.g. Linear, Conv2d, Embedding)")
    present = sorted({c for c in classes.values() if c is not None})
    missing = sorted(w for w in wanted if w not in present)
    if missing:
        raise ParamtoolError(f"--type {', '.join(missing)}: no module of that class holds tensors here; "
                             f"classes here: {', '.join(present)}")
    return [n for n in names if classes.get(n) in wanted]

"""``FILE.py:FUNC`` and ``package.module:FUNC`` sources.

This imports and runs the user's own code, on purpose: it is how a model that is not a plain
``torch.nn`` composition gets built. Checkpoint files never take this path.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

from .errors import ParamtoolError

_SPEC = re.compile(r"^(?P<target>.+):(?P<func>[A-Za-z_][A-Za-z0-9_]*)$")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def is_factory_spec(source: str) -> bool:
    """True for ``something.py:FUNC`` or ``pkg.mod:FUNC``; never for an existing file, ``-`` or ``nn:``."""
    if source == "-" or source.startswith("nn:") or os.path.exists(source):
        return False
    m = _SPEC.match(source)
    if not m:
        return False
    target = m.group("target")
    return target.endswith(".py") or bool(_DOTTED.match(target))


def _import(target: str) -> Any:
    if target.endswith(".py"):
        if not os.path.isfile(target):
            raise ParamtoolError(f"{target}: no such file")
        directory = os.path.dirname(os.path.abspath(target))
        name = "paramtool_factory_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(target))[0])
        spec = importlib.util.spec_from_file_location(name, target)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, directory)  # so the factory's own imports of its neighbours work
        try:
            spec.loader.exec_module(module)
        finally:
            if sys.path and sys.path[0] == directory:
                sys.path.pop(0)
        return module
    try:
        return importlib.import_module(target)
    except ImportError as e:
        raise ParamtoolError(f"cannot import '{target}': {e}") from None


def call_factory(source: str) -> Any:
    m = _SPEC.match(source)
    if not m:
        raise ParamtoolError(f"'{source}' is not FILE.py:FUNC or module:FUNC")
    target, func_name = m.group("target"), m.group("func")
    try:
        module = _import(target)
    except ParamtoolError:
        raise
    except Exception as e:
        raise ParamtoolError(f"importing {target} raised {type(e).__name__}: {e}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ParamtoolError(f"{target} has no function '{func_name}'")
    try:
        result = func()
    except Exception as e:
        raise ParamtoolError(f"factory {source} raised {type(e).__name__}: {e}") from None
    import torch

    if isinstance(result, torch.nn.Module):
        return result
    if isinstance(result, Mapping) and all(isinstance(k, str) for k in result):
        return result
    raise ParamtoolError(f"factory {source} returned {type(result).__name__}, not an nn.Module or a state dict")

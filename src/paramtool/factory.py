"""``FILE.py:FUNC`` and ``package.module:FUNC`` sources: a model or state dict made by the user's own code.

This imports and runs the user's code, on purpose (like ``python FILE.py`` would): it is how a model that is
not a plain ``torch.nn`` composition gets built. Checkpoint files and ``nn:`` specs never take this path.

- ``path/to/models.py:build``: the file is imported by path under a private module name, with its directory
  first on ``sys.path`` while it is imported and ``build()`` runs, so it can import its neighbours.
- ``pkg.models:build``: ``importlib.import_module("pkg.models")``, with the current directory on ``sys.path``
  for the time of the import and the call (as ``python -m`` and ``uvicorn main:app`` do).

``FUNC`` is called with no arguments and must return a ``torch.nn.Module`` or a state dict (a mapping with
string keys holding tensors, possibly nested as in a training checkpoint). Anything else, an import that
fails, a missing function and any exception the user's code raises (``SystemExit`` included) become a
one-line :class:`ParamtoolError`.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Iterator, Mapping

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any

from .errors import ParamtoolError

_SPEC = re.compile(r"^(?P<target>.+):(?P<func>[A-Za-z_][A-Za-z0-9_]*)$")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
# A dotted "module" ending like a checkpoint file is a file name with a colon typo, not a module.
_FILE_SUFFIXES = {"pt", "pth", "bin", "ckpt", "safetensors", "json", "pkl", "pickle", "tar", "zip", "npz", "h5"}


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_factory_spec(source: str) -> bool:
    """True for ``something.py:FUNC`` or ``pkg.mod:FUNC``; conservative, so never for ``-``, ``nn:...``,
    an existing file or directory (even one whose name contains ':'), a Windows-like ``C:\\x`` or ``C:x``,
    or a dotted name ending in a checkpoint extension (``model.pt:x``)."""
    if not source or source == "-" or source.startswith("nn:") or os.path.exists(source):
        return False
    m = _SPEC.match(source)
    if not m:
        return False
    target = m.group("target")
    if len(target) == 1:  # a drive letter
        return False
    if target.endswith(".py"):
        return len(target) > 3
    if not _DOTTED.match(target):
        return False
    return target.rsplit(".", 1)[-1].lower() not in _FILE_SUFFIXES or "." not in target


def _parse(source: str) -> tuple[str, str]:
    m = _SPEC.match(source)
    if not m:
        raise ParamtoolError(f"'{_one_line(source)}' is not FILE.py:FUNC or package.module:FUNC")
    return m.group("target"), m.group("func")


@contextlib.contextmanager
def _on_sys_path(directory: str) -> Iterator[None]:
    sys.path.insert(0, directory)
    try:
        yield
    finally:
        try:
            sys.path.remove(directory)  # the first occurrence: the one put there, even if the code added more
        except ValueError:
            pass


def _import_file(target: str) -> Any:
    if not os.path.isfile(target):
        raise ParamtoolError(f"{_one_line(target)}: no such file" if not os.path.exists(target)
                             else f"{_one_line(target)}: not a file")
    path = os.path.abspath(target)
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    name = f"paramtool_factory_{stem}_{abs(hash(path)):x}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ParamtoolError(f"{_one_line(target)}: cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses, pickling and typing look the module up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _run(what: str, step: Any) -> Any:
    """Run user code; anything it raises becomes one ParamtoolError line."""
    try:
        return step()
    except ParamtoolError:
        raise
    except KeyboardInterrupt:
        raise
    except SystemExit as e:
        raise ParamtoolError(f"{what} called sys.exit({e.code!r})") from None
    except RecursionError:
        raise ParamtoolError(f"{what} raised RecursionError") from None
    except BaseException as e:
        msg = _one_line(str(e))
        raise ParamtoolError(f"{what} raised {type(e).__name__}" + (f": {msg}" if msg else "")) from None


def _has_tensor(obj: Any, depth: int = 0) -> bool:
    import torch

    if isinstance(obj, torch.Tensor):
        return True
    if depth > 20:
        return False
    if isinstance(obj, Mapping):
        return any(_has_tensor(v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_tensor(v, depth + 1) for v in obj)
    return False


def call_factory(source: str) -> Any:
    """Import ``FILE.py`` or ``package.module``, call ``FUNC()`` and return its nn.Module or state dict."""
    import torch

    target, func_name = _parse(source)
    label = _one_line(source, 120)
    if target.endswith(".py"):
        directory = os.path.dirname(os.path.abspath(target))
        importer = lambda: _import_file(target)  # noqa: E731
    else:
        if not _DOTTED.match(target):
            raise ParamtoolError(f"'{_one_line(target)}' is neither a .py file nor a dotted module name")
        directory = os.getcwd()

        def importer() -> Any:
            try:
                return importlib.import_module(target)
            except ModuleNotFoundError as e:
                if e.name and (target == e.name or target.startswith(e.name + ".")):
                    raise ParamtoolError(f"cannot import '{target}': no module named '{e.name}'") from None
                raise

    with _on_sys_path(directory):
        module = _run(f"importing {_one_line(target)}", importer)
        func = getattr(module, func_name, None)
        if func is None:
            raise ParamtoolError(f"{_one_line(target)} has no function '{func_name}'")
        if not callable(func):
            raise ParamtoolError(f"{_one_line(target)}: '{func_name}' is a {type(func).__name__}, not a function")
        result = _run(f"factory {label}", func)

    if isinstance(result, torch.nn.Module):
        return result
    if isinstance(result, Mapping):
        bad = [k for k in result if not isinstance(k, str)]
        if bad:
            raise ParamtoolError(f"factory {label} returned a mapping with a non-string key "
                                 f"({type(bad[0]).__name__} {_one_line(repr(bad[0]), 40)}), not a state dict")
        if not _has_tensor(result):
            raise ParamtoolError(f"factory {label} returned a mapping without any tensor, not a state dict")
        return result
    raise ParamtoolError(f"factory {label} returned {type(result).__name__}, "
                         "not an nn.Module or a state dict (a mapping of names to tensors)")

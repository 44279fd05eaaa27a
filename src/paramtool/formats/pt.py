"""torch.save files: load with torch under the weights-only rules, save with torch.save."""
from __future__ import annotations

import pickle
import warnings
from typing import Any

from ..errors import FormatError, RefusedGlobal


def load(path: str, fmt: str) -> Any:
    """Load a torch.save file on the CPU, memory-mapped when it is a zip file.

    The caller has already run the listing unpickler over it, which refuses any global outside the
    allowlist; torch's own weights-only unpickler is a second, independent gate.
    """
    import torch

    from .torchfile import torch_safe_globals

    try:
        with torch.serialization.safe_globals(torch_safe_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 0": the allowlist pass already read it
            return torch.load(path, map_location="cpu", weights_only=True, mmap=(fmt == "pt"))
    except pickle.UnpicklingError as e:
        text = str(e)
        marker = "GLOBAL "
        if marker in text:
            name = text.split(marker, 1)[1].split()[0]
            raise RefusedGlobal(name, path) from None
        raise FormatError(f"{path}: cannot load: {text.splitlines()[0] if text else type(e).__name__}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FormatError(f"{path}: cannot load torch checkpoint: {first}") from None


def save(root: Any, path: str) -> None:
    """torch.save in the zip format; shared storages stay shared, as torch.save keeps them.

    Written through a Python file object, not a path: torch's C++ writer on a path aborts the process on a
    write error (disk full), while through a file object the error is an ``OSError`` like any other."""
    import torch

    from ..fsops import write_error

    try:
        with open(path, "wb") as f:
            torch.save(root, f)
    except RuntimeError as e:  # torch's zip writer saw a short write
        raise (write_error(e, path) or e) from None

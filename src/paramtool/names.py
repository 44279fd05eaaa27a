"""The order names are shown in: sorted, with numbers in names compared as numbers.

A checkpoint's own order is kept on disk and in ``--json`` listings, but it cannot be what people read or
count positions in: text sorting puts ``h.10`` before ``h.2``, and the same model arrives in different orders
from different writers (``torch.save`` in definition order, safetensors' ``save_file`` by dtype then name).
So wherever names are ordered for people (the inspect tree, positional selectors, stats, diff, ties), they are
sorted part by part (parts split on ``.``), and runs of digits compare as numbers: ``h.2`` before ``h.10``,
``layer2`` before ``layer10``; a module's own tensors come before its sub-modules. The result does not depend on
the file's order: ``[0][0][2]`` on GPT-2 is ``transformer.h.2`` from a ``.bin`` or a ``.safetensors``.
Works on names only (no torch).
"""
from __future__ import annotations

import re
from collections.abc import Iterable

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any

_DIGITS = re.compile(r"([0-9]+)")


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key: runs of digits compare as numbers (``h.2`` < ``h.10``), the rest as text.

    ``re.split`` with a capture group puts text at even and digits at odd positions, so two keys never
    compare a number with a string. The raw name breaks ties (``01`` vs ``1``).
    """
    parts = _DIGITS.split(name)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name


def people_key(name: str) -> tuple[Any, ...]:
    """Sort key for whole tensor names, as the inspect tree lists them: module by module (``.``-separated
    parts compared one by one, each with ``natural_key``), a module's own tensors before its sub-modules."""
    parts = name.split(".")
    return tuple((0 if i == len(parts) - 1 else 1, natural_key(p)) for i, p in enumerate(parts))


def sibling_order(names: Iterable[str]) -> list[str]:
    """Children of one module (name parts), in the order positions count them: ``0, 1, 2, 10``; ``h, ln_f, wte``."""
    return sorted(dict.fromkeys(names), key=natural_key)


def people_order(names: Iterable[str]) -> list[str]:
    """``names`` in the order people read them (the inspect tree, stats, diff): sorted by ``people_key``."""
    return sorted(names, key=people_key)


def people_sorted(items: Iterable[Any], name: Any = lambda x: x) -> list[Any]:
    """``items`` ordered as ``people_order`` orders their names ``name(item)``."""
    return sorted(items, key=lambda x: people_key(name(x)))

"""The order names are shown in: numbers in names compare as numbers.

A checkpoint's own order is kept on disk, but text sorting puts ``h.10`` before ``h.2``, and files written by
other tools (safetensors' ``save_file`` sorts by dtype, then name) arrive in orders that mean nothing. For
people, the rule is the one PyTorch's module tree suggests:

- siblings (the parts of names under one module) keep the order they first appear in, except that
- siblings that differ only in their numbers (``2`` and ``10``, ``layer2`` and ``layer10``) take each other's
  places in numeric order.

So ``transformer.h.2`` comes before ``transformer.h.10`` whatever the file's order, while ``wte``, ``wpe``,
``h``, ``ln_f`` stay in definition order. Positional selectors (``[0][0][2]``) count children in this order.
Works on names only (no torch).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

_DIGITS = re.compile(r"([0-9]+)")


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key: runs of digits compare as numbers (``h.2`` < ``h.10``), the rest as text.

    ``re.split`` with a capture group puts text at even and digits at odd positions, so two keys never
    compare a number with a string. The raw name breaks ties (``01`` vs ``1``).
    """
    parts = _DIGITS.split(name)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name


def _stem(name: str) -> tuple[str, ...]:
    """What is left of a name without its numbers: ``layer10`` -> ``("layer", "")``."""
    return tuple(_DIGITS.split(name)[0::2])


def sibling_order(names: Iterable[str]) -> list[str]:
    """Siblings in order of first appearance; those that differ only in their numbers are put in numeric
    order among the places they hold (``0, 1, 10, 11, 2`` -> ``0, 1, 2, 10, 11``; ``conv1, bn1, conv2`` stays)."""
    first = list(dict.fromkeys(names))
    slots: dict[tuple[str, ...], list[int]] = {}
    for i, n in enumerate(first):
        if _DIGITS.search(n):
            slots.setdefault(_stem(n), []).append(i)
    out = list(first)
    for places in slots.values():
        if len(places) > 1:
            for place, name in zip(places, sorted((first[i] for i in places), key=natural_key)):
                out[place] = name
    return out


class _Trie:
    __slots__ = ("leaves", "kids")

    def __init__(self) -> None:
        self.leaves: dict[str, str] = {}  # last part -> full name
        self.kids: dict[str, _Trie] = {}


def people_order(names: Iterable[str]) -> list[str]:
    """``names`` as the inspect tree lists them: module by module (a module's own tensors, then its children),
    siblings ordered by ``sibling_order``. Components are split on ``.`` only."""
    root = _Trie()
    for name in names:
        parts = name.split(".")
        node = root
        for part in parts[:-1]:
            node = node.kids.setdefault(part, _Trie())
        node.leaves.setdefault(parts[-1], name)
    out: list[str] = []
    stack = [root]
    while stack:  # depth first, iteratively: names can be deep
        node = stack.pop()
        out.extend(node.leaves[p] for p in sibling_order(node.leaves))
        stack.extend(node.kids[p] for p in reversed(sibling_order(node.kids)))
    return out


def people_sorted(items: Iterable[Any], name: Any = lambda x: x) -> list[Any]:
    """``items`` (with ``name(item)`` unique) reordered as ``people_order`` orders their names."""
    items = list(items)
    rank = {n: i for i, n in enumerate(people_order(name(x) for x in items))}
    return sorted(items, key=lambda x: rank[name(x)])

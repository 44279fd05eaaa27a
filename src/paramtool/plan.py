"""The one plan type of every command that writes (``init``, ``set``, ``convert``, ``rename``, ``drop``,
``resize``, ``merge``, ``lora merge``): what changes, per tensor, and the report of it.

A plan is made on names and the table of contents (no tensor data) by the operation modules (``ops``,
``surgery``, ``merge``, ``lora``) and carried out by the executor (``executor.execute``), which decides from
the plan's data and the formats' behaviour how to write it: a patched copy, a streamed rewrite, or a full load.

- ``actions``: value edits, one tensor each, applied in place to whatever tensor the writer supplies (a mapped
  storage's view, or a loaded tensor); the structure stays as it is.
- ``restructure``: a change of the checkpoint's structure (names, entries, dtypes, shapes), carried out on one
  loaded checkpoint or one listing of stand-ins (a file, or one shard: it touches only the names it holds),
  with ``rename``, ``cast`` and ``resized`` saying what it does for the writers that work without it.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .records import dataclass, field

if TYPE_CHECKING:
    from .checkpoint import Checkpoint


@dataclass
class Report:
    """What an operation changed, for the stderr summary and ``--dry-run --json``."""

    action: str  # "xavier_uniform", "set", "rename", "cast to bfloat16", ...
    changed: list[str] = field(default_factory=list)  # names written to directly
    zeroed: list[str] = field(default_factory=list)  # biases zeroed by --zero-bias
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why the scheme could not take it
    with_ties: dict[str, list[str]] = field(default_factory=dict)  # changed name -> other names that changed with it
    untied: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    renamed: dict[str, str] | None = None  # a structural change (surgery): old -> new names
    dropped: list[str] | None = None  # a structural change (surgery): the names or sub-trees removed

    def all_changed(self) -> list[str]:
        out = list(dict.fromkeys(self.changed + self.zeroed))
        for others in self.with_ties.values():
            out.extend(n for n in others if n not in out)
        return out

    def as_json(self) -> dict:
        out = {
            "action": self.action,
            "changed": self.changed,
            "zeroed": self.zeroed,
            "skipped": self.skipped,
            "ties": self.with_ties,
            "untied": self.untied,
            "warnings": self.warnings,
        }
        if self.renamed is not None or self.dropped is not None:  # what a structural change reports besides
            out.update(renamed=self.renamed or {}, dropped=self.dropped or [])
        return out


@dataclass
class Action:
    """One change to one named tensor, applied in place to whatever tensor the caller supplies."""

    name: str
    apply: Callable[[Any], None]
    overwrites: bool  # writes every element without reading the old values
    global_rng: bool = False  # draws from torch's global generator (no --seed): runs alone, in order


@dataclass
class Plan:
    report: Report
    actions: list[Action] = field(default_factory=list)
    untie: list[str] = field(default_factory=list)  # names to give their own storage before acting
    narrow: bool = False  # write only the --key sub-tree (convert), not the whole container with it changed
    restructure: Callable[[Checkpoint], None] | None = None  # names, entries, dtypes or shapes change
    rename: dict[str, str] = field(default_factory=dict)  # old -> new, for a sharded index
    cast: tuple[str, frozenset[str]] | None = None  # (dtype, names to cast), for the streamed writers
    resized: list[str] = field(default_factory=list)  # names whose shape changes (nothing streams them)
    sidecars: dict[str, bytes] = field(default_factory=dict)  # model-directory files written anew (config.json)

    def changes_values(self) -> bool:
        """Does carrying the plan out change anything in a file, or is it a plain copy (a conversion)?"""
        return bool(self.actions or self.untie or self.restructure)

    def within(self, names: set[str]) -> Plan:
        """The part of the plan that concerns ``names`` (one shard's): its actions and unties there; a
        structural change applies to any part as it is (it touches only the names the part holds)."""
        from .records import replace

        return replace(self, actions=[a for a in self.actions if a.name in names],
                       untie=[n for n in self.untie if n in names])

    def touches(self, names: set[str]) -> bool:
        """Does the plan change anything among ``names`` (a shard to rewrite, or to keep as it is)?"""
        return self.restructure is not None or any(a.name in names for a in self.actions) or \
            any(n in names for n in self.untie)


def apply(plan: Plan, ckpt: Checkpoint) -> None:
    """Carry out a plan on a loaded checkpoint (the in-memory path): its structural change (on each shard of
    a sharded checkpoint, whose names then follow its parts), then its unties and value edits."""
    if plan.restructure is not None:
        _restructure(plan.restructure, ckpt)
    if not plan.untie and not plan.actions:
        return
    import torch

    for name in plan.untie:
        ckpt.replace(name, ckpt.tensor(name).detach().clone())
    with torch.no_grad():
        for action in plan.actions:
            action.apply(ckpt.tensor(action.name))


def _restructure(run: Callable[[Checkpoint], None], ckpt: Checkpoint) -> None:
    parts = getattr(ckpt, "parts", None)
    if not parts:
        run(ckpt)
        return
    for part in parts.values():
        run(part)
    ckpt.root = {s: p.root for s, p in parts.items()}
    ckpt.names = {n: (s,) + tuple(path) for s, p in parts.items() for n, path in p.names.items()}

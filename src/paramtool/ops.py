"""Operations that change tensors: ``init`` (reinitialize with a scheme) and ``set`` (direct edits).

Both work on a loaded ``Checkpoint`` in place and return a report of what changed; writing is the
caller's business. Ties are honoured: a tied storage changes once and every name on it changes with it,
unless ``untie`` gives the selected names their own copy first.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .checkpoint import Checkpoint
from .errors import ParamtoolError
from .select import module_path, select
from .ties import storage_groups
from .toc import TensorInfo
from .tree import OPTIMIZER_KEYS


@dataclass
class Report:
    """What an operation changed, for the stderr summary and ``--dry-run --json``."""

    action: str  # "xavier_uniform", "set", ...
    changed: list[str] = field(default_factory=list)  # names written to directly
    zeroed: list[str] = field(default_factory=list)  # biases zeroed by --zero-bias
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why the scheme could not take it
    with_ties: dict[str, list[str]] = field(default_factory=dict)  # changed name -> other names that changed with it
    untied: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def all_changed(self) -> list[str]:
        out = list(dict.fromkeys(self.changed + self.zeroed))
        for others in self.with_ties.values():
            out.extend(n for n in others if n not in out)
        return out

    def as_json(self) -> dict:
        return {
            "action": self.action,
            "changed": self.changed,
            "zeroed": self.zeroed,
            "skipped": self.skipped,
            "ties": self.with_ties,
            "untied": self.untied,
            "warnings": self.warnings,
        }


def _tie_partners(infos: list[TensorInfo]) -> dict[str, list[str]]:
    """name -> the other names sharing its bytes (checkpoint order)."""
    out: dict[str, list[str]] = {}
    for group in storage_groups(infos):
        names = [t.name for t in group]
        for n in names:
            out[n] = [m for m in names if m != n]
    return out


def _record_ties(report: Report, targets: list[str], partners: dict[str, list[str]]) -> None:
    for name in targets:
        others = [m for m in partners.get(name, []) if m not in targets]
        if others:
            report.with_ties[name] = others


def init(
    ckpt: Checkpoint,
    scheme_name: str,
    options: dict[str, Any],
    layers: list[str],
    param: str = "weight",
    zero_bias: bool = False,
    untie: bool = False,
    seed: int | None = None,
    dry_run: bool = False,
) -> Report:
    from . import schemes

    scheme = schemes.get_scheme(scheme_name)
    opts = schemes.resolve_options(scheme, options)
    names = list(ckpt.names)
    infos = {i.name: i for i in ckpt.infos()}
    selected = select(names, layers, param)
    report = Report(scheme.name)
    targets = []
    for name in selected:
        reason = scheme.accepts(infos[name].shape)
        if reason:
            report.skipped[name] = reason
        else:
            targets.append(name)
    biases: list[str] = []
    if zero_bias:
        modules = {module_path(n) for n in select(names, layers, "all")}
        biases = [n for n in names if module_path(n) in modules and n.rsplit(".", 1)[-1] == "bias"]
    if not targets and not biases:
        why = "; ".join(f"{n}: {r}" for n, r in list(report.skipped.items())[:4])
        raise ParamtoolError(f"scheme '{scheme.name}' can take none of the selected tensors ({why})")
    partners = _tie_partners(list(infos.values()))
    if untie:
        report.untied = [n for n in dict.fromkeys(targets + biases) if partners.get(n)]
        if dry_run:
            partners = {n: p for n, p in partners.items() if n not in report.untied}
        else:
            for name in report.untied:
                ckpt.replace(name, ckpt.tensor(name).detach().clone())
            infos = {i.name: i for i in ckpt.infos()}
            partners = _tie_partners(list(infos.values()))
    report.changed = targets
    report.zeroed = [b for b in biases if b not in targets]
    _record_ties(report, targets + report.zeroed, partners)
    if report.skipped:
        report.warnings.append(
            f"skipped {len(report.skipped)} tensor(s) scheme '{scheme.name}' cannot take: "
            + ", ".join(f"{n} ({r})" for n, r in report.skipped.items())
        )
    if dry_run:
        return report
    done: set[Any] = set()  # a tied storage is initialized once, seeded by the group's first name
    order = {n: i for i, n in enumerate(names)}
    for name in targets:
        group = sorted([name] + partners.get(name, []), key=order.__getitem__)
        info = infos[name]
        view = (info.storage, info.offset, info.shape, info.stride)
        if view in done:  # another name of the same alias group was already initialized
            continue
        done.add(view)
        t = ckpt.tensor(name)
        gen = schemes.generator_for(seed, scheme.name, opts, group[0], tuple(t.shape), info.dtype)
        schemes.apply(scheme, opts, t, gen)
    if report.zeroed:
        import torch

        with torch.no_grad():
            for name in report.zeroed:
                ckpt.tensor(name).zero_()
    _warn_optimizer(ckpt, report)
    return report


def set_values(ckpt: Checkpoint, edit_texts: list[str], dry_run: bool = False) -> Report:
    from .edits import apply_edit, parse_edit

    names = list(ckpt.names)
    edits = [parse_edit(text, names) for text in edit_texts]
    report = Report("set")
    report.changed = list(dict.fromkeys(e.name for e in edits))
    _record_ties(report, report.changed, _tie_partners(ckpt.infos()))
    if not dry_run:
        for e in edits:
            apply_edit(e, ckpt.tensor(e.name))
        _warn_optimizer(ckpt, report)
    return report


def _warn_optimizer(ckpt: Checkpoint, report: Report) -> None:
    """A training checkpoint's optimizer moments belong to the old values: say so."""
    root = ckpt.root
    if not isinstance(root, Mapping):
        return
    changed = set(report.all_changed())
    for key, value in root.items():
        if str(key) not in OPTIMIZER_KEYS or not isinstance(value, Mapping):
            continue
        state = value.get("state")
        if not isinstance(state, Mapping) or not state:
            continue
        # torch optimizers index parameters by position in model.parameters(): map positions to names
        params = [n for n in ckpt.names if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        hit = [params[i] for i in state if isinstance(i, int) and 0 <= i < len(params) and params[i] in changed]
        if hit:
            report.warnings.append(
                f"the optimizer state in '{key}' holds moments for {len(hit)} reinitialized parameter(s) "
                f"({', '.join(hit[:4])}{', ...' if len(hit) > 4 else ''}); they are stale: reset the optimizer when resuming"
            )

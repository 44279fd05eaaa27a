"""Operations that change tensors: ``init`` (reinitialize with a scheme) and ``set`` (direct edits).

Both work on a loaded ``Checkpoint`` in place and return a report of what changed; writing is the
caller's business. Ties are honoured: a tied storage changes once and every name on it changes with it,
unless ``untie`` gives the selected names their own copy first.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from .checkpoint import Checkpoint
from .errors import ParamtoolError
from .plan import Action, Plan, Report
from .select import module_path, select
from .ties import storage_groups
from .toc import TensorInfo


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


def note_ties(report: Report, infos: list[TensorInfo]) -> None:
    """Record, for each name in ``report.changed``, the other names that change with it (they share its bytes)."""
    _record_ties(report, report.changed, _tie_partners(infos))


def _scheme_action(name: str, scheme: Any, opts: dict, seed: int | None, seed_name: str, info: TensorInfo) -> Action:
    from . import schemes

    def run(t: Any) -> None:
        gen = schemes.generator_for(seed, scheme.name, opts, seed_name, tuple(info.shape), info.dtype)
        schemes.apply(scheme, opts, t, gen)

    return Action(name, run, True, seed is None)


def _zero(t: Any) -> None:
    t.zero_()


def plan_init(
    ckpt: Checkpoint,
    scheme_name: str,
    options: dict[str, Any],
    layers: list[str],
    param: str = "weight",
    zero_bias: bool = False,
    untie: bool = False,
    seed: int | None = None,
    types: list[str] | None = None,
) -> Plan:
    """What ``init`` will change; needs only names and the table of contents, no tensor data.

    ``types`` narrows the selection to tensors held by modules of those classes. Normalization layers'
    tensors (``layertypes``) are left alone unless a selector or ``types`` names them."""
    from . import schemes

    scheme = schemes.get_scheme(scheme_name)
    opts = schemes.resolve_options(scheme, options)
    names = list(ckpt.names)
    infos = {i.name: i for i in ckpt.infos()}
    selected = select(names, layers, param)
    norms, named = _norm_guard(ckpt, names, infos, layers, types or [])
    if types:
        from .layertypes import by_type, owner_classes

        typed = set(by_type(names, types, owner_classes(ckpt.root, ckpt.names), ckpt.source))
        selected = [n for n in selected if n in typed]
        if not selected:
            raise ParamtoolError(f"no '{param}' tensor of the selected layers is held by a module of type "
                                 f"{', '.join(types)} (try --param all, or another --layer)")
    report = Report(scheme.name)
    targets = []
    for name in selected:
        reason = scheme.accepts(infos[name].shape, infos[name].dtype, opts)
        if reason:
            report.skipped[name] = reason
        elif name in norms and name not in named:
            report.skipped[name] = NORM_SKIP
        else:
            targets.append(name)
    biases: list[str] = []
    if zero_bias:
        modules = {module_path(n) for n in select(names, layers, "all")}
        biases = [n for n in names if module_path(n) in modules and n.rsplit(".", 1)[-1] == "bias"
                  and not (n in norms and n not in named)]
    if not targets and not biases:
        why = "; ".join(f"{n}: {r}" for n, r in list(report.skipped.items())[:4])
        raise ParamtoolError(f"scheme '{scheme.name}' can take none of the selected tensors ({why})")
    partners = _tie_partners(list(infos.values()))
    plan = Plan(report)
    if untie:
        plan.untie = report.untied = [n for n in dict.fromkeys(targets + biases) if partners.get(n)]
        partners = {n: [m for m in p if m not in plan.untie] for n, p in partners.items() if n not in plan.untie}
    report.changed = targets
    report.zeroed = [b for b in biases if b not in targets]
    _record_ties(report, targets + report.zeroed, partners)
    cannot = {n: r for n, r in report.skipped.items() if r != NORM_SKIP}
    if cannot:
        report.warnings.append(
            f"skipped {len(cannot)} tensor(s) scheme '{scheme.name}' cannot take: "
            + ", ".join(f"{n} ({r})" for n, r in cannot.items())
        )
    kept = [n for n, r in report.skipped.items() if r == NORM_SKIP]
    if kept:
        report.warnings.append(
            f"skipped {len(kept)} normalization-layer tensor(s), left as they are: {', '.join(kept)} "
            "(name them with --layer, or --type, to reinitialize them)")
    done: set[Any] = set()  # a tied storage is initialized once, seeded by its group's first name
    order = {n: i for i, n in enumerate(names)}
    for name in targets:
        info = infos[name]
        view = (name,) if name in plan.untie else (info.storage, info.offset, info.shape, info.stride)
        if view in done:
            continue
        done.add(view)
        seed_name = min([name] + partners.get(name, []), key=order.__getitem__)
        plan.actions.append(_scheme_action(name, scheme, opts, seed, seed_name, info))
    plan.actions += [Action(name, _zero, True) for name in report.zeroed]
    _warn_optimizer(ckpt.root, names, report)
    return plan


NORM_SKIP = "a normalization layer's (not named by --layer or --type)"


def _norm_guard(ckpt: Checkpoint, names: list[str], infos: dict[str, TensorInfo], layers: list[str],
                types: list[str]) -> tuple[set[str], set[str]]:
    """(the tensors of normalization layers, those of them the command line names explicitly)."""
    from .layertypes import norm_tensors, owner_classes
    from .select import named_directly

    classes = owner_classes(ckpt.root, ckpt.names)
    norms = set(norm_tensors(names, {n: len(infos[n].shape) for n in names}, classes))
    named = named_directly(names, layers) if norms else set()
    wanted = {t.rsplit(".", 1)[-1] for t in types}
    named |= {n for n in norms if classes.get(n) in wanted}
    return norms, named


def plan_set(ckpt: Checkpoint, edit_texts: list[str]) -> Plan:
    from .edits import apply_edit, parse_edit

    names = list(ckpt.names)
    edits = [parse_edit(text, names) for text in edit_texts]
    report = Report("set")
    report.changed = list(dict.fromkeys(e.name for e in edits))
    _record_ties(report, report.changed, _tie_partners(ckpt.infos()))
    plan = Plan(report)
    for e in edits:
        plan.actions.append(Action(e.name, lambda t, e=e: apply_edit(e, t), e.op == "=" and e.index is None))
    _warn_optimizer(ckpt.root, names, report)
    return plan


def _warn_optimizer(root: Any, names: list[str], report: Report) -> None:
    """A training checkpoint's optimizer moments belong to the old values: say so.

    An optimizer state dict is recognised by its structure (``state`` and ``param_groups``), wherever it sits:
    ``optimizer``, Lightning's ``optimizer_states`` list, FSDP's ``optim``, or under any other name.
    """
    changed = set(report.all_changed())
    if not changed:
        return
    for where, opt in optimizer_states(root, ()):
        hit = _moment_owners(opt["state"], names, changed)
        if hit:
            place = ".".join(str(p) for p in where) or "(root)"
            report.warnings.append(
                f"the optimizer state in '{place}' holds moments for {len(hit)} changed parameter(s) "
                f"({', '.join(hit[:4])}{', ...' if len(hit) > 4 else ''}); they are stale: reset the optimizer when resuming"
            )


def optimizer_states(obj: Any, path: tuple) -> Iterator[tuple[tuple, Mapping]]:
    """Every ``{"state": {...}, "param_groups": [...]}`` in a container, with its path (tensors and modules
    are not entered: an optimizer state dict is plain containers)."""
    if isinstance(obj, Mapping):
        if isinstance(obj.get("state"), Mapping) and "param_groups" in obj:
            yield path, obj
            return
        for key, value in obj.items():
            yield from optimizer_states(value, path + (key,))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from optimizer_states(value, path + (i,))


def parameter_names(names: list[str]) -> list[str]:
    """The names an optimizer counts (``model.parameters()``), as far as names tell: without norm statistics."""
    return [n for n in names if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))]


def _moment_owners(state: Mapping, names: list[str], changed: set[str]) -> list[str]:
    """The changed names that ``state`` holds moments for. torch optimizers key them by position in
    ``model.parameters()`` (buffers excluded); ``get_state_dict`` and FSDP key them by parameter name."""
    params = parameter_names(names)
    hit = []
    for key in state:
        if isinstance(key, int) and 0 <= key < len(params):
            hit.append(params[key])
        elif isinstance(key, str):
            hit.extend(n for n in params if n == key or n.endswith("." + key) or key.endswith("." + n))
    return [n for n in dict.fromkeys(hit) if n in changed]

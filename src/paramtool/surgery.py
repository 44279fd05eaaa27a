"""Checkpoint surgery: rename, drop, cast (``convert --dtype``) and resize, planned as ``plan.Plan``s.

Each operation is planned on names and the table of contents (no tensor data); its plan's ``restructure`` is
then carried out by the executor (``executor.execute``) on one checkpoint at a time: a file, or each shard of
a sharded checkpoint (whose index follows the names).
Ties are storage identity: a tie group is renamed name by name but cast and resized once, as one storage,
so it stays tied; dropping one name of a group leaves the storage to the others. Safetensors tie metadata
(``{dropped: kept}`` aliases and ``paramtool.ties`` views) is never edited by hand: it is recomputed from the
storages when the file is written, so it always names what is really there.

Where input and output are the same byte-range format, or shards go into one file, ``surgery_stream`` writes
the result one storage at a time: untouched tensor bytes are copied verbatim and memory stays near one tensor.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from . import formats, tree
from .checkpoint import Checkpoint
from .errors import ParamtoolError, UsageError
from .formats.dtypes import ALIASES, PLAIN_FLOATS
from .plan import Plan, Report
from .records import dataclass, field
from .select import module_path, select, unknown_name
from .ties import storage_groups
from .toc import TensorInfo
from .tree import OPTIMIZER_KEYS

# --dtype spellings -> torch dtype names


def _report(action: str, **given: Any) -> Report:
    """A surgery report: it says which names were renamed or removed, besides what a value edit says."""
    return Report(action, **{"renamed": {}, "dropped": [], **given})


# ---------------------------------------------------------------- rename


@dataclass(frozen=True)
class Rule:
    text: str
    pattern: re.Pattern
    repl: str
    count: int  # 0: every match (the g flag); 1: the first


def _split_unescaped(body: str, delim: str) -> list[str]:
    parts, cur, i = [], [], 0
    while i < len(body):
        c = body[i]
        if c == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            cur.append(nxt if nxt == delim else c + nxt)  # \/ is a literal delimiter
            i += 2
            continue
        if c == delim:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def parse_rule(text: str) -> Rule:
    """``s/REGEX/REPL/`` (Python regex, ``\\1`` groups; any punctuation as the delimiter, as in sed), optional
    ``g`` flag: replace every match rather than the first."""
    if len(text) < 4 or text[0] != "s" or text[1].isalnum() or text[1] in " \\":
        raise UsageError(f"bad rename rule '{text}': write s/REGEX/REPLACEMENT/ (e.g. 's/^module\\.//')")
    parts = _split_unescaped(text[2:], text[1])
    if len(parts) != 3 or parts[2] not in ("", "g"):
        raise UsageError(f"bad rename rule '{text}': write s/REGEX/REPLACEMENT/ with an optional g flag "
                         f"(escape a '{text[1]}' inside as '\\{text[1]}')")
    try:
        pattern = re.compile(parts[0])
        pattern.sub(parts[1], "")  # checks the replacement's group references now, not at the first match
    except re.error as e:
        raise UsageError(f"bad regular expression in rename rule '{text}': {e}") from None
    return Rule(text, pattern, parts[1], 0 if parts[2] == "g" else 1)


def strip_prefix_rule(prefix: str) -> Rule:
    return Rule(f"--strip-prefix {prefix}", re.compile("^" + re.escape(prefix)), "", 1)


def rename_map(names: list[str], rules: list[Rule]) -> tuple[dict[str, str], list[str]]:
    """old -> new for every name a rule changes, and the rules that matched nothing.

    Rules apply in order, each to the result of the one before. Two names ending up as one (or a new name
    equal to a name left as it is) is an error naming both."""
    mapping: dict[str, str] = {}
    used = {r.text: False for r in rules}
    for name in names:
        new = name
        for r in rules:
            out = r.pattern.sub(lambda m, r=r: m.expand(r.repl), new, count=r.count)
            used[r.text] |= out != new or bool(r.pattern.search(new))
            new = out
        if new != name:
            if not new:
                raise ParamtoolError(f"rename would make '{name}' an empty name")
            mapping[name] = new
    owner: dict[str, str] = {}
    for name in names:
        new = mapping.get(name, name)
        if new in owner:
            raise ParamtoolError(f"rename collision: '{owner[new]}' and '{name}' would both be named '{new}'")
        owner[new] = name
    return mapping, [t for t, hit in used.items() if not hit]


def plan_rename(ckpt: Checkpoint, rules: list[Rule]) -> Plan:
    """Rename tensors by rules; ties, the container and every non-tensor entry stay as they are."""
    names = list(ckpt.names)
    mapping, unused = rename_map(names, rules)
    report = _report("rename", changed=list(mapping), renamed=mapping)
    for text in unused:
        report.warnings.append(f"rule '{text}' matched no tensor name")
    if not mapping:
        report.warnings.append("no tensor name changed")
    for old, new in mapping.items():
        _check_movable(ckpt, old, new)
    return Plan(report, restructure=lambda c: rename_in(c, mapping), rename=mapping)


def _key_prefix(name: str, path: tree.Path) -> str:
    """The part of ``name`` that names containers above its own key (``""`` for a flat state dict)."""
    key = str(path[-1])
    return name[: len(name) - len(key)] if name.endswith(key) else name


def _check_movable(ckpt: Checkpoint, old: str, new: str) -> None:
    path = ckpt.names[old]
    if tree.is_module(ckpt.root):
        return  # a model source is renamed as its state dict, which is flat
    prefix = _key_prefix(old, path)
    if not isinstance(path[-1], str) or not new.startswith(prefix) or not new[len(prefix):]:
        raise ParamtoolError(f"cannot rename '{old}' to '{new}': it sits at '{prefix}' inside nested containers, "
                             "and a rule may only change its own key there")


def _flatten_module(ckpt: Checkpoint) -> None:
    """A model source (nn: or a factory) is edited as its state dict."""
    if tree.is_module(ckpt.root):
        ckpt.root = ckpt.root.state_dict()
        ckpt.names = {n: (n,) for n in ckpt.root}
        ckpt.layout = formats.MODULE


def _rebuilt(parent: Mapping, renames: dict[Any, Any]) -> Mapping:
    """A copy of ``parent`` with some keys renamed, in the same order and of the same type. A state dict's
    ``_metadata`` (module path -> version, read by ``load_state_dict``) follows the module paths the
    renames move (``module.0`` -> ``0`` when ``module.`` is stripped)."""
    items = [(renames.get(k, k), v) for k, v in parent.items()]
    out = type(parent)(items) if isinstance(parent, dict) else dict(items)
    meta = getattr(parent, "_metadata", None)
    if meta is not None:
        moved = {module_path(str(k)): module_path(str(v)) for k, v in renames.items()}
        out._metadata = type(meta)((moved.get(k, k), v) for k, v in meta.items())  # type: ignore[attr-defined]
    return out


def rename_in(ckpt: Checkpoint, mapping: dict[str, str]) -> None:
    """Carry out a rename on a loaded checkpoint: each renamed tensor's key is renamed in its container."""
    _flatten_module(ckpt)
    _forget_tie_metadata(ckpt)
    by_parent: dict[tree.Path, dict[Any, Any]] = {}
    for old, new in mapping.items():
        if old not in ckpt.names:
            continue
        path = ckpt.names[old]
        by_parent.setdefault(path[:-1], {})[path[-1]] = new[len(_key_prefix(old, path)):]
    for parent_path, renames in sorted(by_parent.items(), key=lambda kv: -len(kv[0])):
        parent = tree.get_path(ckpt.root, parent_path)
        if not isinstance(parent, Mapping):
            raise ParamtoolError(f"cannot rename inside a {type(parent).__name__}")
        new_parent = _rebuilt(parent, renames)
        if parent_path:
            tree.set_path(ckpt.root, parent_path, new_parent)
        else:
            ckpt.root = new_parent
    names: dict[str, tree.Path] = {}
    for name, path in ckpt.names.items():
        new = mapping.get(name, name)
        names[new] = path[:-1] + (new[len(_key_prefix(name, path)):],) if name in mapping else path
    ckpt.names = names


def _forget_tie_metadata(ckpt: Checkpoint) -> None:
    """Drop safetensors tie entries from the metadata: the writer records the ties anew from the storages."""
    if ckpt.metadata:
        from .formats.safetensors_fmt import TIES_KEY

        ckpt.metadata = {k: v for k, v in ckpt.metadata.items() if k != TIES_KEY and k not in ckpt.meta_ties}
    ckpt.meta_ties = {}


# ---------------------------------------------------------------- drop


def plan_drop(ckpt: Checkpoint, layers: list[str], keys: list[str]) -> Plan:
    """Remove the selected tensors (``layers``) or whole sub-trees (``keys``, e.g. ``optimizer``)."""
    if bool(layers) == bool(keys):
        raise UsageError("give --layer SEL… (tensors) or --key PATH… (sub-trees), one of the two")
    names = list(ckpt.names)
    report = _report("drop")
    if layers:
        gone = select(names, layers, "all")
        if len(gone) == len(names):
            raise ParamtoolError(f"dropping {', '.join(layers)} would remove every tensor; nothing would be left")
        partners = {t.name: [m.name for m in g if m.name not in gone] for g in storage_groups(ckpt.infos()) for t in g}
        kept_for = {n: partners[n] for n in gone if partners.get(n)}
        report.changed = report.dropped = gone
        for n, others in kept_for.items():
            report.warnings.append(f"'{n}' is tied to {', '.join(others)}: the storage stays for them")
        _warn_positional_optimizer(ckpt.root, report)
        return Plan(report, restructure=lambda c: drop_names(c, set(gone)))
    if tree.is_module(ckpt.root) or ckpt.layout.flat:
        raise UsageError("--key drops a sub-tree of a torch.save training checkpoint; this checkpoint is one flat "
                         "state dict (use --layer)")
    paths = [tree.find_key(ckpt.root, k) for k in keys]
    gone = [n for n, p in ckpt.names.items() if any(p[: len(q)] == q for q in paths)]
    if len(gone) == len(names):
        raise ParamtoolError(f"dropping --key {', '.join(keys)} would remove every tensor; nothing would be left")
    report.changed = report.dropped = [".".join(str(x) for x in p) for p in paths]
    return Plan(report, restructure=lambda c: drop_keys(c, paths))


def drop_names(ckpt: Checkpoint, gone: set[str]) -> None:
    """Remove named tensors from their containers; what the others share stays with them."""
    _flatten_module(ckpt)
    _forget_tie_metadata(ckpt)
    for name in [n for n in ckpt.names if n in gone]:
        _remove(ckpt.root, ckpt.names[name])
        del ckpt.names[name]


def drop_keys(ckpt: Checkpoint, paths: list[tree.Path]) -> None:
    for path in paths:
        _remove(ckpt.root, path)
    ckpt.names = tree.assign_names(ckpt.root, ckpt.key)


def _remove(root: Any, path: tree.Path) -> None:
    parent = tree.get_path(root, path[:-1])
    if isinstance(parent, Mapping):
        del parent[path[-1]]  # type: ignore[attr-defined]
    else:
        raise ParamtoolError(f"cannot remove '{'.'.join(map(str, path))}' from a {type(parent).__name__}")


def _warn_positional_optimizer(root: Any, report: Report) -> None:
    """torch optimizers index parameters by position: removing parameters makes the state point elsewhere."""
    from .ops import optimizer_states  # (one recogniser of optimizer state dicts: by structure, anywhere)

    for where, opt in optimizer_states(root, ()):
        if opt.get("state"):
            key = ".".join(str(p) for p in where) or "(root)"
            report.warnings.append(f"the optimizer state in '{key}' indexes parameters by position; after dropping "
                                   f"parameters it no longer matches the model: drop it too (--key {key}) or "
                                   "reset the optimizer when resuming")


# ---------------------------------------------------------------- cast


def target_dtype(text: str) -> str:
    if text not in ALIASES:
        raise UsageError(f"--dtype must be bf16, fp16 or fp32, not '{text}'")
    return ALIASES[text]


def plan_cast(ckpt: Checkpoint, dtype: str, keep: list[str], directory: str | None = None) -> Plan:
    """Cast floating-point tensors to ``dtype``; integers, bools and the ``keep`` selection stay as they are.

    A tie group is one storage: it is cast as a whole, or (when any name in it is kept) not at all. FP8
    tensors are refused by name unless kept: their values only mean something with their scales, whose
    layout is the quantizer's. In a model directory config.json's dtype follows (``Plan.sidecars``)."""
    infos = ckpt.infos()
    names = [i.name for i in infos]
    kept = set(select(names, keep, "all", flag="--keep-dtype")) if keep else set()
    fp8 = [i.name for i in infos if i.dtype.startswith("float8") and i.name not in kept]
    if fp8:
        shown = ", ".join(fp8[:4]) + (", ..." if len(fp8) > 4 else "")
        raise ParamtoolError(f"--dtype {dtype}: {len(fp8)} tensor(s) are FP8 ({shown}), scaled by tensors of their "
                             "quantizer's layout; paramtool does not dequantize them: keep them (and their scales) "
                             "with --keep-dtype to cast the rest")
    groups = {t.name: [m.name for m in g] for g in storage_groups(infos) for t in g}
    report = _report(f"cast to {dtype}")
    todo: list[str] = []
    for info in infos:
        if info.dtype not in PLAIN_FLOATS or info.dtype == dtype:
            continue
        group = groups.get(info.name, [info.name])
        if kept & set(group):
            if info.name not in kept:
                report.skipped[info.name] = f"tied to kept {', '.join(sorted(kept & set(group)))}"
            continue
        todo.append(info.name)
    if not todo:
        floats = [i for i in infos if i.dtype in PLAIN_FLOATS]
        why = ("no floating-point tensors" if not floats else
               f"every floating-point tensor is already {dtype} or kept")
        raise ParamtoolError(f"nothing to cast to {dtype}: {why}")
    report.changed = todo
    if report.skipped:
        report.warnings.append("kept as they are, because a name they are tied to is kept: "
                               + ", ".join(report.skipped))
    chosen = frozenset(todo)
    sidecars: dict[str, bytes] = {}
    if directory is not None:
        from .formats import modeldir

        new_config = modeldir.config_with_dtype(modeldir.read_config(directory)[0], dtype)
        if new_config is not None:
            sidecars["config.json"] = new_config
    return Plan(report, restructure=lambda c: cast_in(c, dtype, chosen, report), cast=(dtype, chosen),
                sidecars=sidecars)


def cast_in(ckpt: Checkpoint, dtype: str, chosen: frozenset[str], report: Report) -> None:
    """Cast the chosen names of a loaded checkpoint, one storage at a time; views keep their layout."""
    import torch

    from .convert_stream import cast_storage
    from .surgery_stream import record_overflow

    _flatten_module(ckpt)
    _forget_tie_metadata(ckpt)
    infos = [i for i in ckpt.infos() if i.name in chosen]
    by_storage: dict[Any, list[TensorInfo]] = {}
    for info in infos:
        by_storage.setdefault(info.storage, []).append(info)
    overflows: dict[str, int] = {}
    for members in by_storage.values():
        first = ckpt.tensor(members[0].name)
        size = first.untyped_storage().nbytes() // first.element_size()
        flat = torch.empty(0, dtype=first.dtype).set_(first.untyped_storage(), 0, (size,), (1,))
        new, overflow = cast_storage(flat, dtype)
        if overflow:
            overflows[members[0].name] = overflow
        for info in members:
            _replace_like(ckpt, info.name, new.as_strided(info.shape, info.stride, info.offset))
    record_overflow(report, overflows, dtype)


def _replace_like(ckpt: Checkpoint, name: str, value: Any) -> None:
    """Put ``value`` where ``name`` was, as a Parameter if it was one (its requires_grad kept)."""
    import torch

    old = ckpt.tensor(name)
    if isinstance(old, torch.nn.Parameter) and not tree.is_module(ckpt.root):
        value = torch.nn.Parameter(value, requires_grad=old.requires_grad and value.is_floating_point())
    ckpt.replace(name, value)


# ---------------------------------------------------------------- resize


@dataclass(frozen=True)
class NewRows:
    """Where added rows come from: a scheme (with init's options and seed), or the mean of the existing rows."""

    scheme: str | None = None
    options: dict = field(default_factory=dict)
    seed: int | None = None


def plan_resize(ckpt: Checkpoint, name: str, rows: int, fill: NewRows, also: list[str] = (),
                directory: str | None = None) -> Plan:
    """Grow or shrink dim 0 of ``name``; every name sharing its storage (and ``also``) is resized with it.

    In a model directory (``directory``), config.json decides too: a name it ties but the file does not
    store stands for its embedding, the other embedding of the pair is resized with it (``vocab_partners``),
    and config.json's ``vocab_size`` follows (``Plan.sidecars``)."""
    if rows <= 0:
        raise UsageError(f"--rows must be at least 1, not {rows}")
    infos = {i.name: i for i in ckpt.infos()}
    sidecars: dict[str, bytes] = {}
    if directory is not None:
        from .formats import modeldir

        config = modeldir.read_config(directory)[0]
        name = modeldir.config_ties(config, list(infos.values())).absent.get(name, name)  # lm_head -> wte
        also = list(also) + modeldir.vocab_partners(config, list(infos.values()), name)
        new_config = modeldir.config_with_vocab(config, list(infos.values()), name, rows)
        if new_config is not None:
            sidecars["config.json"] = new_config
    if name not in infos:
        raise ParamtoolError(unknown_name(name, list(infos)))
    info = infos[name]
    if not info.shape:
        raise ParamtoolError(f"'{name}' is a scalar: it has no rows to resize")
    group = next(([m.name for m in g] for g in storage_groups(list(infos.values())) if name in [m.name for m in g]),
                 [name])
    for other in group:
        o = infos[other]
        if (o.offset, o.shape, o.stride) != (info.offset, info.shape, info.stride):
            raise ParamtoolError(f"cannot resize '{name}': '{other}' is a partial view of its storage, not a whole alias")
    for other in also:
        if other in infos and other not in group and infos[other].shape[:1] != info.shape[:1]:
            raise ParamtoolError(f"'{other}' is tied to '{name}' by the config but has a different number of rows")
    if fill.scheme is not None:
        from . import schemes

        scheme = schemes.get_scheme(fill.scheme)
        opts = schemes.resolve_options(scheme, fill.options)
        new_shape = (max(rows - info.shape[0], 1),) + tuple(info.shape[1:])
        reason = scheme.accepts(new_shape, info.dtype, opts)
        if reason and rows > info.shape[0]:
            raise ParamtoolError(f"scheme '{scheme.name}' cannot fill the new rows of '{name}' ({reason})")
        fill = NewRows(scheme.name, opts, fill.seed)
    elif rows > info.shape[0] and info.shape[0] == 0:
        raise ParamtoolError(f"'{name}' has no rows to take the mean of; give --scheme for the new rows")
    partners = [n for n in group if n != name] + [n for n in also if n in infos and n not in group]
    report = _report(f"resize to {rows} rows", changed=[name])
    if partners:
        report.with_ties[name] = partners
    if rows == info.shape[0]:
        report.warnings.append(f"'{name}' already has {rows} rows")
    _warn_stale_optimizer(ckpt.root, report)
    return Plan(report, restructure=lambda c: resize_in(c, [name] + partners, rows, fill), resized=[name] + partners,
                sidecars=sidecars)


def _warn_stale_optimizer(root: Any, report: Report) -> None:
    if isinstance(root, Mapping) and any(str(k) in OPTIMIZER_KEYS for k in root):
        report.warnings.append("the optimizer state keeps the old shape: reset the optimizer when resuming")


def resized(t: Any, rows: int, fill: NewRows, seed_name: str) -> Any:
    """A new tensor: ``t`` with ``rows`` rows; added rows from ``fill`` (transformers' mean resizing uses the mean
    of the existing rows; it adds noise from their covariance, which this leaves out so the result is
    deterministic)."""
    import torch

    old = t.shape[0]
    if rows <= old:
        return t[:rows].clone()
    out = torch.empty((rows,) + tuple(t.shape[1:]), dtype=t.dtype)
    out[:old] = t
    extra = out[old:]
    with torch.no_grad():
        if fill.scheme is None:
            work = torch.float64 if t.dtype == torch.float64 else torch.float32
            extra.copy_(t.to(work).mean(dim=0, keepdim=True).expand_as(extra).round()
                        if not t.is_floating_point() else t.to(work).mean(dim=0, keepdim=True).expand_as(extra))
        else:
            from . import schemes

            gen = schemes.generator_for(fill.seed, fill.scheme, fill.options, seed_name, tuple(extra.shape), t.dtype)
            schemes.apply(schemes.get_scheme(fill.scheme), fill.options, extra, gen)
    return out


def resize_in(ckpt: Checkpoint, names: list[str], rows: int, fill: NewRows) -> None:
    """Resize the first of ``names`` and give every other one the same new tensor (those sharing its storage)
    or its own resized copy (config ties in another storage)."""
    _flatten_module(ckpt)
    present = [n for n in names if n in ckpt.names]
    if not present:
        return
    done: dict[Any, Any] = {}
    infos = {i.name: i for i in ckpt.infos()}
    for n in present:
        storage = infos[n].storage
        if storage not in done:
            done[storage] = resized(ckpt.tensor(n), rows, fill, names[0])
        _replace_like(ckpt, n, done[storage])
    _forget_tie_metadata(ckpt)

r"""``--layer`` and ``--param``: choose tensors by module path, name, glob or position.

Works on names only (no torch). Module paths are names without their last part; components are split on
``.`` only (never on spaces), so ``0.block 1.0.bias`` lives in module ``0.block 1.0``.

A selector is, in this order of precedence:

1. a positional path ``[0][1][0]`` (``^(\[\d+\])+$``): children indexed exactly as the inspect tree lists
   them (``tree_paths``; ``names.sibling_order``: sorted, numbers as numbers, so ``h.2`` before ``h.10`` whatever
   the file's order), as ``rgnet[0][1][0]`` indexes ``nn.Sequential``. The tree, and so the count, holds every
   module with tensors, the names config.json ties (a model directory's ``lm_head``, listed though not stored),
   and, where the model itself is read (``nn:``, factories, ``torch.save(model)``), its parameterless modules
   (``ReLU``). A state dict holds only modules with tensors: there a ``ReLU`` is not counted;
2. a module path or a full tensor name, matched exactly: ``0`` selects ``0.weight``, ``0.bias`` and everything
   under module ``0`` (``0.block 1.0.weight``), never ``10.weight``;
3. a glob, if the selector contains ``*``, ``?`` or ``[``: ``fnmatch`` rules, case-sensitive, matched against
   the WHOLE of every module path (selecting the tensors under it) and of every tensor name. ``*`` and ``?``
   cross dots as in ``fnmatch`` (``*.attn.*`` finds attention modules at any depth; ``h.*.mlp`` matches
   ``h.0.mlp`` but also ``h.0.x.mlp``), and ``[...]`` is a character class (``0.block [12]``).
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

from .errors import ParamtoolError, UsageError
from .names import sibling_order

POSITIONAL = re.compile(r"^(\[\d+\])+$")
PARAMS = ("weight", "bias", "all")


def module_path(name: str) -> str:
    """``0.block 1.0.bias`` -> ``0.block 1.0``; a top-level name (``bias``) -> ``""``."""
    return name.rsplit(".", 1)[0] if "." in name else ""


def module_paths(names: list[str]) -> list[str]:
    """Every module path and its ancestors, in order of first appearance."""
    seen: dict[str, None] = {}
    for name in names:
        parts = name.split(".")[:-1]
        for i in range(1, len(parts) + 1):
            seen.setdefault(".".join(parts[:i]), None)
    return list(seen)


def _under(name: str, path: str) -> bool:
    return name == path or name.startswith(path + ".")


def tree_paths(names: Iterable[str], modules: Iterable[str] = ()) -> list[str]:
    """The module paths the inspect tree shows, which positions count: those ``names`` live under (the names
    config.json ties included: GPT-2's ``lm_head``) and a model's own modules (``modules``, as ``Toc.modules``
    lists them: a ``ReLU`` holds no tensor, yet it is ``net[1]`` and a line of the tree)."""
    return list(dict.fromkeys(module_paths(list(names)) + [m for m in modules if m]))


def _positional(paths: list[str], selector: str, flag: str = "--layer") -> str:
    """``[0][1][0]`` -> the module path reached by indexing children as the tree lists them (``paths``, from
    ``tree_paths``; sorted, numbers as numbers): on GPT-2, ``[0][0][2]`` is ``transformer.h.2`` whatever the
    file's order."""
    indices = [int(i) for i in re.findall(r"\d+", selector)]
    split = [p.split(".") for p in paths]
    prefix: list[str] = []
    for depth, index in enumerate(indices):
        kids = sibling_order(parts[depth] for parts in split if len(parts) > depth and parts[:depth] == prefix)
        if index >= len(kids):
            where = f"module '{'.'.join(prefix)}'" if prefix else "the top level"
            shown = ", ".join(f"'{k}'" for k in kids[:8]) + (", ..." if len(kids) > 8 else "")
            raise ParamtoolError(
                f"{flag} '{selector}': {where} has {len(kids)} child module(s) ({shown or 'none'}), no index {index} "
                "(counted as the inspect tree lists them; a state dict holds no parameterless module such as ReLU)")
        prefix.append(kids[index])
    return ".".join(prefix)


def at_position(names: list[str], selector: str, shown: list[str] | None = None, flag: str = "--layer") -> str:
    """The module path a positional selector reaches (children counted in ``shown``, the tree's module paths;
    by default those of ``names``); an error if nothing in ``names`` lives there (a ``ReLU``)."""
    path = _positional(module_paths(names) if shown is None else shown, selector, flag)
    if not any(_under(n, path) for n in names):
        raise ParamtoolError(f"{flag} '{selector}' is module '{path}', which holds no tensors")
    return path


def as_paths(names: list[str], layers: list[str], shown: list[str] | None = None, flag: str = "--layer") -> list[str]:
    """``layers`` with each positional selector replaced by the module path it reaches (``at_position``), so
    that what is done with them later (plans, tables) needs no tree to count in."""
    return [at_position(names, s, shown, flag) if POSITIONAL.match(s) else s for s in layers]


def _match(names: list[str], selector: str, shown: list[str] | None, flag: str = "--layer") -> list[str]:
    if POSITIONAL.match(selector):
        path = at_position(names, selector, shown, flag)
        return [n for n in names if _under(n, path)]
    exact = [n for n in names if _under(n, selector)]
    if exact or not any(c in selector for c in "*?["):
        return exact
    # a glob must match a whole module path (selecting what is under it) or a whole name
    pattern = re.compile(fnmatch.translate(selector))
    hit_modules = {m for m in module_paths(names) if pattern.match(m)}
    return [n for n in names if pattern.match(n) or any(a in hit_modules for a in _ancestors(n))]


def _ancestors(name: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b`` (the module paths ``name`` lives under)."""
    parts = name.split(".")[:-1]
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def select(names: list[str], layers: list[str], param: str = "all", flag: str = "--layer",
           shown: list[str] | None = None) -> list[str]:
    """The names chosen by the union of ``layers`` (all when empty), narrowed by ``param``; input order kept.

    ``shown``: the module paths positions count (``tree_paths``: what the inspect tree shows, a model's
    parameterless modules included); by default those of ``names``.

    Globs follow ``fnmatch``: ``*`` also crosses dots, so ``*.attn.*`` finds attention at any depth.
    Raises ParamtoolError when a selector matches nothing (naming it as ``flag``, the option it came from), or
    ``param`` leaves nothing; UsageError for a bad ``param``.
    """
    if param not in PARAMS:
        raise UsageError(f"--param must be weight, bias or all, not '{param}'")
    chosen: set[str] = set()
    for selector in layers:
        hit = _match(names, selector, shown, flag)
        if not hit:
            paths = module_paths(names)
            shown = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
            raise ParamtoolError(f"{flag} '{selector}' matches nothing; module paths here: {shown or '(none)'}")
        chosen.update(hit)
    picked = [n for n in names if not layers or n in chosen]
    if param != "all":
        narrowed = [n for n in picked if n.rsplit(".", 1)[-1] == param]
        if not narrowed:
            raise ParamtoolError(f"no '{param}' tensors among the {len(picked)} selected (try --param all)")
        picked = narrowed
    return picked


def named_directly(names: list[str], layers: list[str]) -> set[str]:
    """The names a selector names itself, or names the module of, rather than reaching them through an ancestor:
    ``h.3.ln_1`` and ``*.ln_1`` name ``h.3.ln_1.weight``; ``h.3`` selects it without naming it, and so does a glob
    that also matches the level above (``h.*`` matches ``h.3`` as well as ``h.3.ln_1``; ``*`` matches all)."""
    out: set[str] = set()
    for selector in layers:
        if POSITIONAL.match(selector):
            path = at_position(names, selector)
            out.update(n for n in names if module_path(n) == path)
        elif any(c in selector for c in "*?[") and not any(_under(n, selector) for n in names):
            pattern = re.compile(fnmatch.translate(selector))

            def names_it(n: str, up: str) -> bool:  # the glob stops at n: it does not match the level above
                return bool(pattern.match(n)) and not (up and pattern.match(up))

            out.update(n for n in names if names_it(n, module_path(n))
                       or names_it(module_path(n), module_path(module_path(n))))
        else:
            out.update(n for n in names if n == selector or module_path(n) == selector)
    return out


NAMED_POSITION = re.compile(r"^((?:\[\d+\])+)(?:\.(.+))?$")


def resolve_name(name: str, names: list[str], aliases: dict[str, str] | None = None,
                 shown: list[str] | None = None) -> str:
    """A tensor name as typed -> the stored name: a positional prefix (``[0][1][0].bias``, children counted as
    ``--layer`` counts them, in ``shown``) becomes its module path, and a name config.json ties (``aliases``:
    name -> stored name) becomes the stored one."""
    m = NAMED_POSITION.match(name)
    if m:
        path = _positional(module_paths(names) if shown is None else shown, m.group(1), "NAME")
        name = f"{path}.{m.group(2)}" if m.group(2) else path
    return (aliases or {}).get(name, name)


def resolve_leading_name(text: str, names: list[str], aliases: dict[str, str] | None = None,
                         shown: list[str] | None = None) -> str:
    """An edit (``[0][1][0].weight[0, 0] = 1``, ``lm_head.weight[0] = 0``) with its tensor name resolved as
    ``resolve_name`` does; anything else is left as it is."""
    stripped = text.lstrip()
    m = re.match(r"((?:\[\d+\])+)\.", stripped)
    if m:
        path = _positional(module_paths(names) if shown is None else shown, m.group(1), "NAME")
        stripped = path + "." + stripped[m.end():]
    for alias in sorted(aliases or {}, key=len, reverse=True):
        if stripped.startswith(alias) and stripped[len(alias):len(alias) + 1] in ("", "[", " ", "=", "+", "-", "*", "/"):
            return aliases[alias] + stripped[len(alias):]
    return stripped if m else text


def config_selectors(names: list[str], layers: list[str], aliases: dict[str, str], flag: str = "--layer",
                     shown: list[str] | None = None) -> tuple[list[str], list[str]]:
    """Selectors with positions made module paths (counted in ``shown``, as ``as_paths`` does) and those that
    reach only names config.json ties (``aliases``) replaced by the stored names; and the aliases so resolved
    (for a note on stderr)."""
    out, used = [], []
    for selector in as_paths(names + [a for a in aliases if a not in names], layers, shown, flag):
        try:
            select(names, [selector], flag=flag)
            out.append(selector)
            continue
        except ParamtoolError as e:
            try:
                hit = select(list(aliases), [selector]) if aliases else []
            except ParamtoolError:
                hit = []
            if not hit:
                raise e
        out.extend(dict.fromkeys(aliases[h] for h in hit))
        used.extend(hit)
    return out, used


def unknown_name(name: str, names: list[str]) -> str:
    """The error for a tensor name that is not there, with the closest names (the CLI escapes the line)."""
    import difflib

    close = difflib.get_close_matches(name, names, n=3)
    quoted = [f"'{n}'" for n in (close or names[:6])]  # names may hold spaces: each quoted, as it is typed
    hint = f"; did you mean {', '.join(quoted)}?" if close else f"; names here: {', '.join(quoted)}"
    return f"no tensor named '{name}'{hint}"

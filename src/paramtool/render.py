"""Turn results into text: rich trees and tables for people, plain JSON for programs.

Every name that came from a file goes through ``safe_name`` before it reaches a terminal, so a tensor
named with control characters cannot drive the terminal.
"""
from __future__ import annotations

import json
import math

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any, Callable

    from .grad import GradReport, ParamGrad

from .names import people_order, people_sorted, sibling_order
from .records import dataclass, field
from .select import module_path
from .ties import tied_to, unique_counts
from .toc import TensorInfo, Toc


class _Lazy:
    """A rich class imported on first use, so the ``--json`` paths never load rich (start-up time)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def _get(self) -> Any:
        import importlib

        return getattr(importlib.import_module(self.module), self.name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._get()(*args, **kwargs)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._get(), attr)


Table, Text, Tree = _Lazy("rich.table", "Table"), _Lazy("rich.text", "Text"), _Lazy("rich.tree", "Tree")


def _escaped(text: str, spell: Callable[[int], str]) -> str:
    """``text`` with each non-printable character (C0 and C1 controls, bidi overrides and isolates, format
    characters, lone surrogates) written as ``spell(code point)``."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else spell(ord(ch)) for ch in text)


def _python_escape(code: int) -> str:
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _json_escape(code: int) -> str:
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # a surrogate pair, as JSON spells characters beyond the BMP
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def safe_name(name: Any) -> str:
    """Printable form of a name: control and other non-printable characters become escapes. Every renderer
    (tree, tables, stats, diff, warnings, errors) shows names through this."""
    return _escaped(str(name), _python_escape)


def safe_text(name: Any, style: str = "") -> Text:
    """A name for a rich renderer (table cell, tree label): ``safe_name``'s text as a ``Text``, which rich
    never parses for markup (a plain ``str`` cell would make ``[link=...]`` a hyperlink)."""
    return Text(safe_name(name), style=style)


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError


def dumps(obj: Any) -> str:
    """JSON for stdout: no colour, no wrapping, one document; non-finite numbers are the strings "nan", "inf"
    and "-inf" (the contract's one convention, applied here for every command)."""
    # the characters safe_name escapes are written as \\u escapes (json.dumps escapes only C0 controls: a C1
    # control or a bidi override would reach the terminal as it is); the same document once parsed
    return _escaped(json.dumps(_json_safe(obj), ensure_ascii=False, allow_nan=False), _json_escape)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else ("nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf"))
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


# --- schemes -----------------------------------------------------------------------------------------


def schemes_table(table: list[dict]) -> Table:
    """``schemes``: one row per initializer, its options with their defaults, and its note."""
    t = Table(box=None, show_header=True, header_style="bold")
    t.add_column("scheme")
    t.add_column("options")
    t.add_column("note")
    for row in table:
        opts = " ".join(f"--{k.replace('_', '-')} {'(required)' if v is None else v}" for k, v in row["options"].items())
        alias = f" (= {', '.join(row.get('aliases', []))})" if row.get("aliases") else ""
        t.add_row(Text(row["name"] + alias), Text(opts), Text(row.get("doc", "")))  # Text: no markup parsing
    return t


# --- inspect -----------------------------------------------------------------------------------------


def values_tree(toc: Toc) -> Tree:
    """A ``--key`` sub-tree without tensors, as a tree of its values (nested mappings and lists as branches)."""
    head = Text()
    head.append(safe_name(toc.source), style="bold")
    head.append(f"  {toc.format}  --key {safe_name(toc.key)}  no tensors", style="dim")
    tree = Tree(head, guide_style="dim")

    def scalar(v: Any) -> str:
        return safe_name(repr(v) if not isinstance(v, list) else "[" + ", ".join(map(scalar, v)) + "]")

    def branch(v: Any) -> bool:
        return isinstance(v, dict) and bool(v) or isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v)

    def add(parent: Tree, value: Any) -> None:
        items = value.items() if isinstance(value, dict) else ((f"[{i}]", v) for i, v in enumerate(value))
        for k, v in items:
            if branch(v):
                add(parent.add(Text(safe_name(k), style="bold")), v)
            else:
                parent.add(Text.assemble((safe_name(k), "cyan"), ": ", scalar(v)))

    if branch(toc.values):
        add(tree, toc.values)
    else:
        tree.add(Text(scalar(toc.values)))
    return tree


@dataclass
class _Node:
    name: str
    path: str
    children: dict[str, "_Node"] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)

    def all_tensors(self) -> list[TensorInfo]:
        out = list(self.tensors)
        for c in self.children.values():
            out.extend(c.all_tensors())
        return out


def _module_tree(tensors: list[TensorInfo], modules: dict[str, str]) -> _Node:
    """Modules nested as in the model; tensors and siblings sorted as people read them (``names.py``)."""
    root = _Node("", "")

    def node_for(path: str) -> _Node:
        node = root
        if not path:
            return node
        parts = path.split(".")
        for i, part in enumerate(parts):
            key = part
            if key not in node.children:
                node.children[key] = _Node(part, ".".join(parts[: i + 1]))
            node = node.children[key]
        return node

    # module sources list every module, parameter-free ones (ReLU) included, in definition order
    for path in modules:
        if path:
            node_for(path)
    for t in people_sorted(tensors, lambda t: t.name):
        node_for(module_path(t.name)).tensors.append(t)
    stack = [root]
    while stack:
        node = stack.pop()
        node.children = {k: node.children[k] for k in sibling_order(node.children)}
        stack.extend(node.children.values())
    return root


def human_count(n: int) -> str:
    """Exact below 100,000 (the small models of a tutorial), else three digits: ``7.09M``, ``85.1M``, ``124K``."""
    if n < 100_000:
        return f"{n:,}"
    value = float(n)
    for unit in ("K", "M", "B", "T"):
        value /= 1000
        if value < 999.5 or unit == "T":
            return f"{value:.3g}{unit}" if value < 100 else f"{value:.0f}{unit}"
    raise AssertionError


def _totals(tensors: list[TensorInfo]) -> str:
    """``85.1M params, float32, 324.6 MiB``: tied storage counted once; several dtypes joined by ``/``."""
    n, nbytes = unique_counts(tensors)
    dtypes = "/".join(dict.fromkeys(t.dtype for t in tensors))
    return f"{human_count(n)} params, {dtypes}, {human_bytes(nbytes)}"


@dataclass
class _Ties:
    """Who is tied to whom, for marking tensors and for telling blocks apart."""

    to: dict[str, str]  # name -> first name of its group (every tied name but the first)
    partners: dict[str, list[str]]  # first name -> the other names of its group

    @classmethod
    def of(cls, tensors: list[TensorInfo]) -> "_Ties":
        to = tied_to(tensors)
        partners: dict[str, list[str]] = {}
        for name, first in to.items():
            partners.setdefault(first, []).append(name)
        return cls(to, partners)

    def is_tied(self, name: str) -> bool:
        return name in self.to or name in self.partners


def _where(name: str, base: str) -> tuple[str, str]:
    """A tie target as seen from block ``base``: relative (``attn.b``) inside it, else the whole name."""
    return ("in", name[len(base) + 1 :]) if name.startswith(base + ".") else ("out", name)


def _signature(node: _Node, base: str, ties: _Ties, modules: dict[str, str]) -> tuple:
    """A block's structure relative to its own path: tensor names, shapes, dtypes, module kinds and ties (ties
    inside the block relative, ties leaving it absolute). Blocks with equal signatures are interchangeable."""
    def tie(t: TensorInfo) -> tuple:
        if t.name in ties.to:
            return ("=", _where(ties.to[t.name], base))
        if t.name in ties.partners:
            return ("tied",) + tuple(sorted(_where(p, base) for p in ties.partners[t.name]))
        return ()

    leaves = tuple((t.name[len(base):], t.shape, t.dtype, tie(t)) for t in node.tensors)
    kids = tuple((c.name, modules.get(c.path), _signature(c, base, ties, modules)) for c in node.children.values())
    return leaves, kids


def _numbered(name: str) -> tuple[str, int] | None:
    """``("", 3)`` for an index (``3``), ``("block ", 3)`` for a named run's member (``block 3``, ``layer3``):
    a stem and a plain decimal number (not ``01``); None for any other name."""
    digits = len(name) - len(name.rstrip("0123456789"))
    number = name[len(name) - digits:] if digits else ""
    if not number.isascii() or not number or str(int(number)) != number:
        return None
    return name[: len(name) - digits], int(number)


def _runs(children: list[_Node], ties: _Ties, modules: dict[str, str]) -> list[list[_Node]]:
    """Children split into runs: consecutive numbers of one stem (``h.3``, ``h.4``; ``block 0``, ``block 1``)
    with tensors and equal signatures form one run (a named one of three or more); anything else is a run of
    one. A differing block, another stem or a gap in the numbering ends a run."""
    runs: list[list[_Node]] = []
    last_sig: tuple | None = None
    for c in children:
        numbered = _numbered(c.name)
        sig = _signature(c, c.path, ties, modules) if numbered and c.all_tensors() else None
        run = runs[-1] if runs else None
        before = _numbered(run[-1].name) if run else None
        if (sig is not None and run is not None and sig == last_sig and before is not None
                and numbered == (before[0], before[1] + 1)):
            run.append(c)
        else:
            runs.append([c])
        last_sig = sig
    # a named run needs three members: two named siblings alike (GPT-2's ln_1 and ln_2) are not a series
    out: list[list[_Node]] = []
    for run in runs:
        named = _numbered(run[0].name)[0] if _numbered(run[0].name) else ""
        out.extend([[c] for c in run] if named and len(run) < 3 else [run])
    return out


def inspect_tree(toc: Toc, tensors: list[TensorInfo], depth: int | None = None, expand: bool = False) -> Tree:
    """The parameter tree: modules nested as in the model, each with its parameter count, dtype and bytes, and
    each tensor with shape, dtype and tie. Consecutive identical blocks (``h.0`` ... ``h.11``) are shown once
    under a ``12 ×`` line unless ``expand``; a block that differs (or is tied elsewhere) breaks the run."""
    ties = _Ties.of(toc.tensors)
    num_params, nbytes = unique_counts(tensors)
    head = Text()
    head.append(safe_name(toc.source), style="bold")
    head.append(f"  {toc.format}  {len(tensors)} tensors  {num_params:,} params  {human_bytes(nbytes)}", style="dim")
    if any(ties.is_tied(t.name) for t in tensors):
        head.append("  (tied storage counted once)", style="dim")
    tree = Tree(head, guide_style="dim")
    root = _module_tree(tensors, toc.modules)

    def leaf_line(t: TensorInfo, node: _Node, block: str | None) -> Text:
        leaf = t.name[len(node.path) + 1 :] if node.path else t.name
        line = Text()
        line.append(safe_name(leaf), style="cyan")
        line.append(f"  {shape_text(t.shape)}  {t.dtype}  {t.numel:,}")
        if t.kind:
            line.append(f"  [{t.kind}]", style="dim")
        if t.name in ties.to:
            target = ties.to[t.name]
            if block is not None and target.startswith(block + "."):  # a tie inside every block of a run
                shown = f"{target[len(block) + 1:]} (in each block)"
            else:
                shown = target
            line.append(f"  = {safe_name(shown)}", style="magenta")
        elif t.name in ties.partners:
            line.append("  (tied)", style="magenta")
        return line

    def module_line(label: str, kind: str | None, sub: list[TensorInfo]) -> Text:
        line = Text()
        line.append(safe_name(label), style="bold")
        if kind:
            line.append(f"  {safe_name(kind)}", style="green")
        if sub:
            line.append(f"  ({_totals(sub)})", style="dim")
        return line

    def run_line(prefix: str, run: list[_Node]) -> Text:
        first, last = run[0], run[-1]
        each, _ = unique_counts(first.all_tensors())
        sub = [t for c in run for t in c.all_tensors()]
        total, total_bytes = unique_counts(sub)
        dtypes = "/".join(dict.fromkeys(t.dtype for t in sub))
        line = Text()
        line.append(safe_name(f"{prefix}{first.name} … {prefix}{last.name}"), style="bold")
        line.append(f"  {len(run)} ×")
        kind = toc.modules.get(first.path)
        if kind:
            line.append(f" {safe_name(kind)}", style="green")
        line.append(f" ({human_count(each)} params each, {human_count(total)} total, {dtypes}, "
                    f"{human_bytes(total_bytes)})", style="dim")
        return line

    def add(parent: Tree, node: _Node, level: int, block: str | None) -> None:
        for t in node.tensors:
            parent.add(leaf_line(t, node, block))
        children = list(node.children.values())
        for run in ([[c] for c in children] if expand else _runs(children, ties, toc.modules)):
            shown = depth is None or level < depth
            if len(run) > 1:
                branch = parent.add(run_line("", run))
                if shown:
                    add(branch, run[0], level + 1, run[0].path)
                continue
            c = run[0]
            inner = [] if expand or c.tensors or not shown else _runs(list(c.children.values()), ties, toc.modules)
            if len(inner) == 1 and len(inner[0]) > 1:  # a ModuleList of identical blocks: one line for both
                branch = parent.add(run_line(c.name + ".", inner[0]))
                if depth is None or level + 1 < depth:
                    add(branch, inner[0][0], level + 2, inner[0][0].path)
                continue
            branch = parent.add(module_line(c.name, toc.modules.get(c.path), c.all_tensors()))
            if shown:
                add(branch, c, level + 1, block)

    add(tree, root, 1, None)
    return tree


def extras_lines(toc: Toc) -> list[Text]:
    lines = []
    for k, v in toc.extras.items():
        lines.append(Text.assemble((safe_name(k), "bold"), ": ", safe_name(v)))
    from .formats.safetensors_fmt import split_metadata

    if toc.metadata:
        _, _, rest = split_metadata(toc.metadata, {t.name for t in toc.tensors})
        for k, v in rest.items():
            lines.append(Text.assemble(("metadata ", "dim"), (safe_name(k), "bold"), ": ", safe_name(v)))
    if toc.globals:
        from .formats.weights_only import beyond

        needed = beyond(toc.globals)
        if needed:
            lines.append(Text.assemble(("globals", "bold"), ": ", safe_name(", ".join(needed)),
                                       (" (beyond torch's weights_only allowlist: torch.load(weights_only=True) "
                                        "refuses this file; paramtool reads it without running anything)", "dim")))
    return lines


def config_tie_lines(toc: Toc) -> list[Text]:
    """The names a model directory's config.json ties that its weights do not store (listed in the tree)."""
    return [Text.assemble((safe_name(n), "bold"), f" = {safe_name(s)}: not stored (config.json ties them)")
            for n, s in toc.config_ties.items()]


# --- ties --------------------------------------------------------------------------------------------


def ties_lines(toc: Toc, groups: list) -> list[Text]:
    """One line per tie group: names, shape, dtype, and the bytes the tie saves."""
    if not groups:
        return [Text("no ties")]
    by_name = {t.name: t for t in toc.tensors}
    lines = []
    for g in groups:
        first = by_name[g.names[0]]
        line = Text()
        if g.kind == "slices":  # one storage, no shared bytes: views side by side, not one value under two names
            line.append(", ".join(safe_name(n) for n in g.names), style="bold")
            line.append(f"  {first.dtype}  slices of one storage  ({g.source})")
            lines.append(line)
            continue
        line.append(" = ".join(safe_name(n) for n in g.names), style="bold")
        line.append(f"  {shape_text(first.shape)}  {first.dtype}  {g.kind}  ({g.source})")
        if g.source != "values":
            saved = sum(by_name[n].nbytes for n in g.names) - unique_counts([by_name[n] for n in g.names])[1]
            line.append(f"  saves {human_bytes(saved)}", style="dim")
        else:
            line.append(f"  could save {human_bytes(first.nbytes * (len(g.names) - 1))}", style="dim")
        lines.append(line)
    return lines


# --- stats and diff ----------------------------------------------------------------------------------


def _g(v: float) -> str:
    return f"{v:.4g}"


def stats_table(results: list) -> Table:
    """One row per tensor, ordered as the inspect tree lists them, then a total per top-level module; NaN/Inf
    in red."""
    results = people_sorted(results, lambda r: r.name)
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("name", "mean", "std", "min", "max", "zeros", "norm", "nan/inf"):
        table.add_column(col, justify="left" if col == "name" else "right")
    for r in results:
        bad = r.nan + r.inf
        table.add_row(safe_text(r.name), _g(r.mean), _g(r.std), _g(r.min), _g(r.max), f"{r.zeros:.1%}", _g(r.norm),
                      Text(f"{r.nan}/{r.inf}", style="bold red") if bad else "0/0")
    modules: dict[str, list] = {}
    for r in results:
        top = r.name.split(".", 1)[0] if "." in r.name else ""
        if top:
            modules.setdefault(top, []).append(r)
    if len(modules) > 1:
        table.add_section()
        for mod, rs in modules.items():
            n = sum(r.numel for r in rs)
            norm = sum(r.norm ** 2 for r in rs) ** 0.5
            zeros = sum(r.zeros * r.numel for r in rs) / n if n else 0.0
            bad = sum(r.nan + r.inf for r in rs)
            table.add_row(safe_text(f"{mod} (total)", style="bold"), "", "", _g(min(r.min for r in rs)),
                          _g(max(r.max for r in rs)), f"{zeros:.1%}", _g(norm),
                          Text(str(bad), style="bold red") if bad else "0")
    return table


def diff_lines(d) -> list[Text]:
    """Removed, added, changed (each ordered as the inspect tree lists names), then ties gained and lost."""
    lines = []
    for n in people_order(d.removed):
        lines.append(Text(f"- {safe_name(n)}", style="red"))
    for n in people_order(d.added):
        lines.append(Text(f"+ {safe_name(n)}", style="green"))
    for c in people_sorted(d.changed, lambda c: c["name"]):
        a, b = c["a"], c["b"]
        if not c.get("quantization") and (a["shape"], a["dtype"]) != (b["shape"], b["dtype"]):
            what = f"{shape_text(a['shape'])} {a['dtype']} -> {shape_text(b['shape'])} {b['dtype']}"
            if c.get("max_abs_diff") is not None:  # a cast: its values compared in float64
                what += f", max abs diff {c['max_abs_diff']:.4g}"
                if c.get("cosine") is not None:
                    what += f", cosine {c['cosine']:.6f}"
            for side in ("a", "b"):
                bad = c[side].get("nonfinite") or {}
                for key in ("nan", "inf"):
                    if bad.get(key):
                        what += f", {side}: {bad[key]} {key} (first at {bad[f'first_{key}']})"
        else:
            cos = c.get("cosine")
            what = f"max abs diff {c['max_abs_diff']:.4g}" if c["max_abs_diff"] is not None else "differs (nan/inf)"
            if c.get("max_rel_diff") is not None:
                what += f", rel {c['max_rel_diff']:.3g}"
            if cos is not None:
                what += f", cosine {cos:.6f}"
            if c.get("quantization"):  # a GGUF file against its checkpoint: the stored type, the file's name
                what += f"  ({safe_name(c['quantization'])} {safe_name(c['gguf_name'])})"
        lines.append(Text(f"~ {safe_name(c['name'])}  {what}", style="yellow"))
    for g in d.ties_gained:
        lines.append(Text(f"+ tie {' = '.join(map(safe_name, g))}", style="green"))
    for g in d.ties_lost:
        lines.append(Text(f"- tie {' = '.join(map(safe_name, g))}", style="red"))
    if d.adapter:  # two LoRA adapter directories
        for k, (va, vb) in d.adapter["config"].items():
            lines.append(Text(f"~ adapter {safe_name(k)}: {safe_name(str(va))} -> {safe_name(str(vb))}", style="yellow"))
        if d.adapter["updates_changed"]:
            lines.append(Text("~ adapter updates changed for: " + ", ".join(map(safe_name, d.adapter["updates_changed"])),
                              style="yellow"))
    lines.append(Text(f"{d.same} same, {len(d.changed)} changed, {len(d.added)} added, {len(d.removed)} removed", style="dim"))
    return lines


# --- grad --------------------------------------------------------------------------------------------


def grad_lines(report: GradReport, params: list[ParamGrad]) -> list[Any]:
    """The forward pass as ``net(X)`` prints it, the loss, a table of gradients ("no gradient" in red), and a
    line per tied parameter adding up its uses."""
    from .values import tensor_text

    lines: list[Any] = []
    for shape in report.inputs:
        lines.append(Text(f"input: {shape_text(shape)} {report.input_dtype} (torch.rand, seed {report.seed})", style="dim"))
    for label, t in report.outputs:
        lines.append(Text.assemble((f"{label}: ", "bold"), f"{shape_text(tuple(t.shape))}"))
        lines.append(Text(tensor_text(t)))
    lines.append(Text.assemble(("backward: ", "bold"), report.loss))
    lines.append(grad_table(params))
    lines.extend(grad_use_line(p) for p in params if len(p.names) > 1 or len(p.uses) > 1)
    return lines


def grad_table(params: list[ParamGrad]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("name", "shape", "grad norm", "mean", "max |g|"):
        table.add_column(col, justify="left" if col in ("name", "shape") else "right")
    for p in params:
        name = Text(" = ".join(safe_name(n) for n in p.names), style="magenta" if len(p.names) > 1 else "")
        if p.grad is None:
            why = "no gradient" if p.requires_grad else "no gradient (requires_grad=False)"
            table.add_row(name, shape_text(p.shape), Text(why, style="bold red"), "", "")
        else:
            table.add_row(name, shape_text(p.shape), _g(p.number("norm")), _g(p.number("mean")), _g(p.number("max")))
    return table


def grad_use_line(p: ParamGrad) -> Text:
    """``2.weight = 4.weight: ‖g‖ 0.41, the norm of the vector sum of 2 uses: use at 2 ‖g‖ 0.25, use at 4 ‖g‖ 0.2
    sum error 0`` (norms of a vector sum do not add up: the line says what is summed)."""
    line = Text()
    line.append(" = ".join(safe_name(n) for n in p.names), style="magenta")
    if p.grad is None:
        line.append(": no gradient", style="bold red")
        return line
    uses = ", ".join(f"use at {safe_name(u.at)} ‖g‖ {_g(p.use_norm(u))}" for u in p.uses)
    what = f"the norm of the vector sum of {len(p.uses)} uses: {uses}" if p.uses else "no use seen"
    line.append(f": ‖g‖ {_g(p.number('norm'))}, {what}")
    err = p.sum_error
    if err is not None:
        line.append(f"  sum error {_g(err)}", style="dim")
    return line


# --- LoRA adapters -------------------------------------------------------------------------------------


def adapter_lines(adapter: dict) -> list[Text]:
    """A PEFT adapter directory under its tree: rank, alpha, targets, and what each pair does to which base
    tensor (``lora.Adapter.describe``)."""
    rs = ", rsLoRA (scale alpha/sqrt(r))" if adapter["use_rslora"] else ""
    fif = ", fan_in_fan_out" if adapter["fan_in_fan_out"] else ""
    targets = adapter["target_modules"]
    shown = ", ".join(map(safe_name, targets)) if isinstance(targets, list) else safe_name(str(targets))
    lines = [Text.assemble(("adapter ", "bold"), f"{safe_name(str(adapter['peft_type']))} r={adapter['r']} "
                           f"alpha={adapter['lora_alpha']}{rs}{fif}; targets: {shown}")]
    if adapter["variant"]:
        lines.append(Text(f"  variant: {safe_name(adapter['variant'])} (lora merge refuses it)"))
    for p in adapter["pairs"]:
        a, b = "×".join(map(str, p["a_shape"])), "×".join(map(str, p["b_shape"]))
        how = "(B·A)ᵀ" if p["embedding"] else "B·A"
        lines.append(Text.assemble("  ", (safe_name(p["modifies"]), "bold"),
                                   f" += {p['scale']:g} · {how}  (r={p['rank']}, B {b}, A {a})"))
    for r in adapter["replaces"]:
        lines.append(Text.assemble("  ", (safe_name(r["replaces"]), "bold"), " replaced by the adapter's copy"))
    return lines


def update_lines(updates: list[dict]) -> list[Text]:
    """``stats`` on an adapter directory: each pair's update (scale · B·A) by the base tensor it modifies."""
    lines = [Text("\nadapter updates (scale · B·A):", style="bold")]
    width = max(len(safe_name(u["modifies"])) for u in updates)
    for u in updates:
        lines.append(Text(f"  {safe_name(u['modifies']):<{width}}  r={u['rank']:<4} scale {u['scale']:<8g} "
                          f"norm {_g(u['norm'])}"))
    return lines


# --- GGUF ------------------------------------------------------------------------------------------------


def quantization_lines(toc: Toc, tensors: list[TensorInfo]) -> list[Text]:
    """A GGUF file's stored types: one line per type, with how many of the listed tensors have it and which
    (values are shown dequantized, as float32, in the tree)."""
    by_type: dict[str, list[str]] = {}
    for t in tensors:
        if t.name in toc.quantization:
            by_type.setdefault(toc.quantization[t.name], []).append(t.name)
    lines = []
    for kind, names in by_type.items():
        shown = ", ".join(safe_name(n) for n in names[:4]) + (f", ... ({len(names) - 4} more)" if len(names) > 4 else "")
        lines.append(Text.assemble(("stored as ", "dim"), (safe_name(kind), "bold"), f" ({len(names)}): {shown}"))
    return lines

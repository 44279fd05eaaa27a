"""Turn results into text: rich trees and tables for people, plain JSON for programs.

Every name that came from a file goes through ``safe_name`` before it reaches a terminal, so a tensor
named with control characters cannot drive the terminal.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

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


def safe_name(name: Any) -> str:
    """Printable form of a name: control and other non-printable characters become escapes."""
    s = str(name)
    if s.isprintable():
        return s
    out = []
    for ch in s:
        if ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError


def dumps(obj: Any) -> str:
    """JSON for stdout: no colour, no wrapping, one document."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=True)


def shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


# --- inspect -----------------------------------------------------------------------------------------


def inspect_json(toc: Toc, tensors: list[TensorInfo]) -> dict:
    ties = tied_to(toc.tensors)
    num_params, nbytes = unique_counts(tensors)
    out = {
        "source": toc.source,
        "format": toc.format,
        "tensors": [
            {
                "name": t.name,
                "shape": list(t.shape),
                "dtype": t.dtype,
                "numel": t.numel,
                "nbytes": t.nbytes,
                "tied_to": ties.get(t.name),
            }
            for t in tensors
        ],
        "num_tensors": len(tensors),
        "num_params": num_params,
        "nbytes": nbytes,
    }
    if toc.extras:
        out["extras"] = toc.extras
    if toc.metadata:
        out["metadata"] = toc.metadata
    if toc.modules:
        out["modules"] = toc.modules
    return out


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
    for t in tensors:
        node_for(module_path(t.name)).tensors.append(t)
    return root


def _count_label(tensors: list[TensorInfo]) -> str:
    n, _ = unique_counts(tensors)
    return f"{n:,} params"


def inspect_tree(toc: Toc, tensors: list[TensorInfo], depth: int | None = None) -> Tree:
    """The parameter tree: modules nested as in the model, each tensor with shape, dtype and tie."""
    ties = tied_to(toc.tensors)
    num_params, nbytes = unique_counts(tensors)
    head = Text()
    head.append(safe_name(toc.source), style="bold")
    head.append(f"  {toc.format}  {len(tensors)} tensors  {num_params:,} params  {human_bytes(nbytes)}", style="dim")
    tied_names = {n for n in ties} | set(ties.values())
    if any(t.name in tied_names for t in tensors):
        head.append("  (tied storage counted once)", style="dim")
    tree = Tree(head, guide_style="dim")
    root = _module_tree(tensors, toc.modules)

    def add(parent: Tree, node: _Node, level: int) -> None:
        for t in node.tensors:
            leaf = t.name[len(node.path) + 1 :] if node.path else t.name
            line = Text()
            line.append(safe_name(leaf), style="cyan")
            line.append(f"  {shape_text(t.shape)}  {t.dtype}  {t.numel:,}")
            if t.name in ties:
                line.append(f"  = {safe_name(ties[t.name])}", style="magenta")
            elif t.name in tied_names:
                line.append("  (tied)", style="magenta")
            parent.add(line)
        for c in node.children.values():
            line = Text()
            line.append(safe_name(c.name), style="bold")
            kind = toc.modules.get(c.path)
            if kind:
                line.append(f"  {safe_name(kind)}", style="green")
            sub = c.all_tensors()
            if sub:
                line.append(f"  ({_count_label(sub)})", style="dim")
            branch = parent.add(line)
            if depth is None or level < depth:
                add(branch, c, level + 1)

    add(tree, root, 1)
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
    return lines


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
    """One row per tensor, then a total per top-level module; NaN/Inf in red."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("name", "mean", "std", "min", "max", "zeros", "norm", "nan/inf"):
        table.add_column(col, justify="left" if col == "name" else "right")
    for r in results:
        bad = r.nan + r.inf
        table.add_row(safe_name(r.name), _g(r.mean), _g(r.std), _g(r.min), _g(r.max), f"{r.zeros:.1%}", _g(r.norm),
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
            table.add_row(Text(f"{safe_name(mod)} (total)", style="bold"), "", "", _g(min(r.min for r in rs)),
                          _g(max(r.max for r in rs)), f"{zeros:.1%}", _g(norm),
                          Text(str(bad), style="bold red") if bad else "0")
    return table


def diff_lines(d) -> list[Text]:
    lines = []
    for n in d.removed:
        lines.append(Text(f"- {safe_name(n)}", style="red"))
    for n in d.added:
        lines.append(Text(f"+ {safe_name(n)}", style="green"))
    for c in d.changed:
        a, b = c["a"], c["b"]
        if (a["shape"], a["dtype"]) != (b["shape"], b["dtype"]):
            what = f"{shape_text(a['shape'])} {a['dtype']} -> {shape_text(b['shape'])} {b['dtype']}"
        else:
            cos = c.get("cosine")
            what = f"max abs diff {c['max_abs_diff']:.4g}" if c["max_abs_diff"] is not None else "differs (nan/inf)"
            if c.get("max_rel_diff") is not None:
                what += f", rel {c['max_rel_diff']:.3g}"
            if cos is not None:
                what += f", cosine {cos:.6f}"
        lines.append(Text(f"~ {safe_name(c['name'])}  {what}", style="yellow"))
    for g in d.ties_gained:
        lines.append(Text(f"+ tie {' = '.join(map(safe_name, g))}", style="green"))
    for g in d.ties_lost:
        lines.append(Text(f"- tie {' = '.join(map(safe_name, g))}", style="red"))
    lines.append(Text(f"{d.same} same, {len(d.changed)} changed, {len(d.added)} added, {len(d.removed)} removed", style="dim"))
    return lines

"""The code's structure, measured from the source with ``ast`` (issue 24): the imports the modules really make
(at module level and inside functions), so what a review would count is what these tests count.

- no module imports another module's private name (``from .x import _y``, ``x._y``);
- no import cycle beyond the ones known today (``KNOWN_CYCLES``: shrink it as cycles are broken, never grow it);
- every import points to the same or a lower layer (``LAYERS``, as ``docs/architecture.md`` sets them) beyond the
  arrows known to point up today (``KNOWN_UP``: shrink-only too), and every module has its layer;
- one table per fact: dtype tables only in ``formats/dtypes.py``, extension lists only in the registry
  (``formats/__init__.py``).
"""
from __future__ import annotations

import ast
import pathlib

import paramtool

ROOT = pathlib.Path(paramtool.__file__).parent

# The strongly connected groups of the import graph today; a group may shrink or vanish, never gain a member,
# and no new group may form. Cycles through:
#   (checkpoint -> formats, formats.base <-> formats.dcp, formats.torchfile <-> formats.torchscript,
#   formats.modeldir <-> writer/sources, blob <-> remote and remote -> formats are broken:
#   test_checkpoint_and_the_formats_form_no_cycle keeps the first ones so.)
KNOWN_CYCLES: list[set[str]] = [
]

# The layer of every module, lowest first (``docs/architecture.md``). An import may point to its own layer or a lower
# one. 0 core (the in-memory model, pure), 1 bytes (the byte seam), 2 formats, 3 io (resolve, write, commit),
# 4 operations, 5 the command line.
CORE, BYTES, FORMATS, IO, OPERATIONS, CLI = range(6)
LAYERS = {
    "errors": CORE, "records": CORE, "names": CORE, "pipeline": CORE, "formats.dtypes": CORE,
    "formats.nn_classes": CORE, "formats.weights_only": CORE, "formats.unpickle": CORE, "toc": CORE, "values": CORE,
    "numeric": CORE, "tree": CORE, "checkpoint": CORE, "select": CORE, "schemes": CORE, "edits": CORE,
    "layertypes": CORE, "ties": CORE, "stats": CORE, "printing": CORE, "plan": CORE,
    "fsops": BYTES, "formats.pins": BYTES, "blob": BYTES, "blobio": BYTES, "remote": BYTES,
    "formats": FORMATS, "formats.base": FORMATS, "formats.dcp": FORMATS, "formats.diagnose": FORMATS,
    "formats.gguf": FORMATS, "formats.modeldir": FORMATS, "formats.pt": FORMATS, "formats.safetensors_fmt": FORMATS,
    "formats.sharded": FORMATS, "formats.storage": FORMATS, "formats.torchfile": FORMATS,
    "formats.torchscript": FORMATS, "formats.remote_storage": FORMATS,
    "sources": IO, "writer": IO, "convert_stream": IO, "surgery_stream": IO, "nnspec": IO,
    "factory": IO, "executor": IO, "commit": IO, "remote_io": IO,
    "ops": OPERATIONS, "surgery": OPERATIONS, "merge": OPERATIONS, "lora": OPERATIONS, "compare": OPERATIONS,
    "check": OPERATIONS, "grad": OPERATIONS, "queries": OPERATIONS,
    "cli": CLI, "output": CLI, "render": CLI, "launch": CLI, "__main__": CLI, "": CLI,
}
# entries for modules issue 24 plans (the one plan type; an executor, a commit module, the query functions): placed
# before they exist, so whoever adds them need not guess
OPTIONAL: set[str] = set()

# The imports that point up today, ``(importer, imported)``: may shrink, never grow.
KNOWN_UP: set[tuple[str, str]] = set()


def _modules() -> dict[str, pathlib.Path]:
    """Every module of the package by its name relative to the package (``""``: the package itself)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _absolute(module: str, node: ast.ImportFrom) -> str | None:
    """The package-relative module an ``ImportFrom`` names; None for a module outside the package."""
    if node.level == 0:
        name = node.module or ""
        if name != "paramtool" and not name.startswith("paramtool."):
            return None
        return name.removeprefix("paramtool").removeprefix(".")
    base = module.split(".") if module else []
    if MODULES[module].name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(module: str, runtime_only: bool) -> list[tuple[str, str | None, int]]:
    """``(target module, imported name or None, line)`` for every import of a package module in ``module``, at
    any depth; ``runtime_only``: without the ``if TYPE_CHECKING:`` blocks, which never run."""
    found: list[tuple[str, str | None, int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if runtime_only and _is_type_checking(child):
                continue
            if isinstance(child, ast.ImportFrom):
                target = _absolute(module, child)
                if target is not None:
                    for alias in child.names:
                        sub = f"{target}.{alias.name}".lstrip(".")
                        found.append((sub, None, child.lineno) if sub in MODULES else (target, alias.name, child.lineno))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name == "paramtool" or alias.name.startswith("paramtool."):
                        found.append((alias.name.removeprefix("paramtool").removeprefix("."), None, child.lineno))
            visit(child)

    visit(ast.parse(MODULES[module].read_text()))
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_module_uses_another_modules_private_names():
    """``from .x import _y`` and ``x._y`` (``x`` a package module imported under that name) across modules."""
    bad = []
    for module, path in MODULES.items():
        aliases = {}  # local name -> package module it stands for
        for target, name, line in _imports(module, runtime_only=False):
            if name is None:
                continue
            if _private(name) and target != module:
                bad.append(f"{module}:{line} imports {target}.{name}")
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _absolute(module, node) is not None:
                for alias in node.names:
                    sub = f"{_absolute(module, node)}.{alias.name}".lstrip(".")
                    if sub in MODULES:
                        aliases[alias.asname or alias.name] = sub
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and _private(node.attr) and aliases[node.value.id] != module):
                bad.append(f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert bad == []


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in _imports(m, runtime_only=True) if t != m and t in MODULES} for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.add(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(group)
    return groups


def test_cycle_finder_finds_a_cycle():
    """The measure itself: a cycle of three and a separate pair are found, a chain is not."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d"}, "f": {"a"}, "g": set()}
    assert sorted(map(sorted, _cycles(graph))) == [["a", "b", "c"], ["d", "e"]]


def test_import_graph_sees_function_level_imports():
    """An import inside a function counts (it runs when the function does): ``ties`` imports ``numeric`` there."""
    assert "numeric" in _graph()["ties"]


def test_no_new_import_cycle():
    """Every cycle of the import graph lies inside one of ``KNOWN_CYCLES``: no new cycle, no module joining one
    (the cycles broken in issue 24, ``fsops``/``formats.pins``, ``numeric``/``formats.storage``, ``compare``/``ties``,
    ``surgery``/``surgery_stream``, stay broken)."""
    cycles = _cycles(_graph())
    new = [sorted(g) for g in cycles if not any(g <= known for known in KNOWN_CYCLES)]
    assert new == [], "a new import cycle: move the function to the module that owns the job"
    assert [sorted(k) for k in KNOWN_CYCLES if k not in cycles] == [], "a known cycle shrank: write it as it is now"


def test_no_import_cycle_through_annotations_either():
    """The imports of ``if TYPE_CHECKING:`` blocks, which never run, make no cycle either: the types name the
    modules data flows to, one way (``formats.pt``/``formats.torchfile`` met through ``TorchFile``, now in ``toc``;
    ``checkpoint``/``formats.base``/``formats.gguf``/``plan`` through ``Format`` and ``Pairing``, now protocols of
    the lower module)."""
    graph = {m: {t for t, _, _ in _imports(m, runtime_only=False) if t != m and t in MODULES} for m in MODULES}
    assert _cycles(graph) == []


def test_checkpoint_and_the_formats_form_no_cycle():
    """Among ``checkpoint`` and the ``formats`` modules no import cycle is left (issue 24 broke ``checkpoint`` ->
    ``formats``, ``formats.base`` <-> ``formats.dcp``, ``formats.torchfile`` <-> ``formats.torchscript``): the
    remaining known group closes only through ``blob``/``remote``."""
    graph = _graph()
    inside = {m for m in graph if m == "checkpoint" or m == "formats" or m.startswith("formats.")}
    assert _cycles({m: graph[m] & inside for m in inside}) == []


def test_every_module_has_a_layer():
    """A new module must be placed in ``LAYERS``; an entry for a module that does not exist is a planned one."""
    assert sorted(set(MODULES) - set(LAYERS)) == []
    assert sorted(set(LAYERS) - set(MODULES) - OPTIONAL) == []


def _up_arrows(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """``(importer, imported)`` for every import into a higher layer."""
    return {(m, t) for m, targets in graph.items() for t in targets if LAYERS[t] > LAYERS[m]}


def test_layer_check_finds_an_arrow_up():
    """The measure itself: ``checkpoint`` importing ``cli`` or ``formats`` points up; ``formats`` importing
    ``checkpoint``, and ``checkpoint`` importing ``tree`` (its own layer), do not."""
    graph = {"checkpoint": {"cli", "formats", "tree"}, "formats": {"checkpoint"}, "tree": set(), "cli": set()}
    assert _up_arrows(graph) == {("checkpoint", "cli"), ("checkpoint", "formats")}


def test_imports_point_to_the_same_or_a_lower_layer():
    """Data flows one way, command line -> operations -> io -> formats -> bytes -> core: every import (module- or
    function-level; ``if TYPE_CHECKING:`` blocks never run) points to its own layer or a lower one, beyond
    ``KNOWN_UP``."""
    arrows = _up_arrows(_graph())
    new = sorted(arrows - KNOWN_UP)
    assert new == [], "an import pointing up: move the function down, or pass what it needs in"
    assert sorted(KNOWN_UP - arrows) == [], "an arrow of KNOWN_UP is gone: remove it from the list"


# -- one table per fact --------------------------------------------------------------------------------------

# literals keyed by dtype that are not dtype facts: the cast kernel's bit masks per target (numeric)
NOT_DTYPE_TABLES = {("numeric", "_CAST_TO")}


def _literal_strings(node: ast.AST) -> list[str]:
    """The string constants a dict, set, list or tuple literal holds (keys and values)."""
    if isinstance(node, ast.Dict):
        items = [*node.keys, *node.values]
    elif isinstance(node, (ast.Set, ast.List, ast.Tuple)):
        items = node.elts
    else:
        return []
    return [i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)]


def _tables(strings: set[str], least: int, *, skip: str) -> list[str]:
    """``module:line`` of every literal outside module ``skip`` holding ``least`` or more of ``strings``."""
    found = []
    for module, path in MODULES.items():
        if module == skip:
            continue
        tree = ast.parse(path.read_text())
        allowed = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign) and any(
            isinstance(t, ast.Name) and (module, t.id) in NOT_DTYPE_TABLES for t in n.targets)}
        for node in ast.walk(tree):
            if id(node) not in allowed and sum(s in strings for s in _literal_strings(node)) >= least:
                found.append(f"{module}:{node.lineno}")
    return found


def test_dtype_tables_live_in_dtypes():
    """A literal naming three dtypes or more is a dtype table: it belongs in ``formats/dtypes.py``."""
    from paramtool.formats.dtypes import SIZES

    assert _tables(set(SIZES), 3, skip="formats.dtypes") == []


def test_extension_lists_live_in_the_registry():
    """A literal naming two checkpoint extensions or more is an extension list: it belongs in the registry
    (``formats/__init__.py``)."""
    from paramtool import formats

    known = {e for f in formats.REGISTRY for e in f.extensions}
    assert {".pt", ".safetensors", ".gguf"} <= known
    assert _tables(known, 2, skip="formats") == []


def test_architecture_doc_names_every_module():
    """The module table of ``docs/architecture.md`` (its ``## Modules``) names every module that exists
    (``cli.py``, ``formats/dcp.py``), so a newcomer finds each one there."""
    doc = (ROOT.parent.parent / "docs" / "architecture.md").read_text()
    section = doc.split("\n## Modules\n", 1)[1].split("\n## ", 1)[0]
    missing = [m for m, path in MODULES.items() if m not in ("", "__main__")
               and f"`{path.relative_to(ROOT).as_posix()}`" not in section]
    assert missing == []


# -- format identity asked of the format -----------------------------------------------------------------------

# Modules outside ``formats/`` that still name a format to decide what to do (shrink-only): none.
KNOWN_FORMAT_CHECKS: set[str] = set()
# flags true for exactly one format, still read outside ``formats/`` as ``.layout.FLAG`` (shrink-only): each should
# become behaviour of that format (a method that does the thing)
KNOWN_ONE_FORMAT_FLAGS: dict[str, set[str]] = {
    "convert_stream": {"split"},
    "executor": {"sidecars", "split", "placeholder_values", "in_memory"},
    "sources": {"split", "in_memory"},
    "writer": {"split", "in_memory"},
}


def _format_checks(module: str, names: set[str]) -> list[str]:
    """Comparisons in ``module`` that ask which format something is: ``x.kind``/``x.format``/``x.name`` compared
    to a registry name (``== "dcp"``, ``in ("sharded", "dcp")``), or a value compared to a registry constant
    (``layout is formats.DCP``)."""
    constants = {n for n in dir(__import__("paramtool.formats").formats) if n.isupper()}
    found = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        asked = any(isinstance(s, ast.Attribute) and s.attr in ("kind", "format", "name") for s in sides)
        strings = {c.value for s in sides for c in ast.walk(s) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
        registry = any(isinstance(s, ast.Attribute) and isinstance(s.value, ast.Name) and s.value.id == "formats"
                       and s.attr in constants for s in sides)
        if (asked and strings & names) or registry:
            found.append(f"{module}:{node.lineno} {ast.unparse(node)}")
    return found


def test_no_format_name_compared_outside_formats():
    """Outside ``formats/`` no code asks which format it holds (issue 24): no ``.kind``/``.format`` compared to a
    format's name, no identity check against a registry constant; the format is asked to do the thing."""
    from paramtool import formats

    names = {f.name for f in formats.REGISTRY}
    found = {m: _format_checks(m, names) for m in MODULES if m != "formats" and not m.startswith("formats.")}
    assert sorted(m for m, f in found.items() if f and m not in KNOWN_FORMAT_CHECKS) == [], \
        [f for m, fs in found.items() if m not in KNOWN_FORMAT_CHECKS for f in fs]
    assert sorted(m for m in KNOWN_FORMAT_CHECKS if not found.get(m)) == [], "a known check is gone: shrink the list"


def test_format_check_finder_finds_one(tmp_path):
    """The measure itself: a kind compared to a format's name, and an identity check against a registry constant,
    are found; a source kind that is no format (``"nn"``) is not."""
    import textwrap

    code = textwrap.dedent('''
        def f(src, layout):
            a = src.kind == "dcp"
            b = src.format in ("sharded", "pt")
            c = layout is not formats.DCP
            d = src.kind == "nn"
    ''')
    path = tmp_path / "probe.py"
    path.write_text(code)
    MODULES["_probe"] = path
    try:
        found = _format_checks("_probe", {"dcp", "sharded", "pt"})
    finally:
        del MODULES["_probe"]
    assert [f.split(" ", 1)[0] for f in found] == ["_probe:3", "_probe:4", "_probe:5"]


def test_flags_of_one_format_are_not_read_outside_formats():
    """A capability only one format has is behaviour of that format (a method), not a flag read elsewhere: the
    reads left are ``KNOWN_ONE_FORMAT_FLAGS``, which may shrink, never grow."""
    from paramtool import formats
    from paramtool.formats.base import Format
    from paramtool.records import fields

    flags = [f for f in fields(Format) if isinstance(getattr(formats.REGISTRY[0], f), bool)]
    single = {f for f in flags if sum(bool(getattr(fmt, f)) for fmt in formats.REGISTRY) == 1}
    assert {"values_only", "dequantized", "placeholder_values"} <= single
    found: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        if module == "formats" or module.startswith("formats."):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            owner = node.value if isinstance(node, ast.Attribute) else None
            if node.__class__ is ast.Attribute and node.attr in single and (
                    (isinstance(owner, ast.Attribute) and owner.attr == "layout")
                    or (isinstance(owner, ast.Name) and owner.id == "layout")):
                found.setdefault(module, set()).add(node.attr)
    new = {m: sorted(f - KNOWN_ONE_FORMAT_FLAGS.get(m, set())) for m, f in found.items()}
    assert {m: f for m, f in new.items() if f} == {}, "ask the format to do the thing (a method in its module)"
    gone = {m: sorted(f - found.get(m, set())) for m, f in KNOWN_ONE_FORMAT_FLAGS.items()}
    assert {m: f for m, f in gone.items() if f} == {}, "a known read is gone: shrink KNOWN_ONE_FORMAT_FLAGS"

"""``nn:EXPR`` sources: a model built from ``torch.nn`` classes, parsed and never evaluated.

Grammar (``EXPR`` is the text after ``nn:``)::

    spec     := "let" binding ("," binding)* "in" spec  |  expr
    binding  := NAME "=" expr
    expr     := CLASS "(" [arg ("," arg)*] ")"            a torch.nn module class, called
              | NAME                                      a name bound by an enclosing let
              | literal | "-" number | "+" number
              | "(" expr, ... ")" | "[" expr, ... "]"     tuples and lists (of literals or modules)
              | "{" STRING ":" expr, ... "}"              dicts with string keys (for ModuleDict)
    arg      := expr | KEYWORD "=" expr
    literal  := int | float | string | True | False | None

Both ``let a = X in let b = Y in Z`` and ``let a = X, b = Y in Z`` are accepted (and mixed); a binding may
use the names bound before it, never after; a name may be bound only once. A let-bound name is one object
wherever it is used, which is how layers are tied: in
``let s = Linear(8, 8) in Sequential(Linear(4, 8), ReLU(), s, ReLU(), s)``, ``net[2] is net[4]``.
A binding may also hold a literal (``let n = 8 in Linear(n, n)``).

``CLASS`` is a public attribute of ``torch.nn`` that is a subclass of ``torch.nn.Module`` (``Linear``,
``Sequential``, ``Conv2d``, ``ModuleList``, ``ModuleDict`` ...); the ``Lazy*`` classes are refused, since
they have no shapes until they see data. The keyword ``dtype=`` takes a string naming a torch dtype
(``Linear(4, 8, dtype='bfloat16')``); ``device=`` is refused (models are built on the CPU).

Safety: the text is parsed by Python's own parser (``ast.parse``, after the ``let`` prefixes are peeled off
by a small scanner) and the syntax tree is walked here, accepting only the node kinds above. Nothing is
passed to ``eval``/``exec``/``compile``: there is no attribute access, indexing, lambda, comprehension,
f-string, operator, builtin or name starting with ``_`` to reach.

Size guard: before a call allocates anything it is tried on PyTorch's ``meta`` device (shapes only, no
memory; module arguments are replaced by meta twins of themselves), and a call whose new parameters and
buffers exceed ``MAX_ELEMENTS`` elements is refused, as is a whole model that would exceed it. Where a
constructor cannot run on ``meta``, a cheaper guard is used instead: the product of the call's integer
arguments (including those inside tuples and lists) must not exceed ``MAX_ELEMENTS``.

Errors are :class:`ParamtoolError` with one line; ``col N`` counts characters from the start of ``EXPR``
(1-based, the first character after ``nn:``).
"""
from __future__ import annotations

import ast
import copy
import math
import re
import warnings
from typing import Any

from .errors import ParamtoolError

MAX_ELEMENTS = 2**31  # per call, and for the whole model: parameter + buffer elements
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEYWORDS = {"let", "in"}

_NODE_WORDS = {
    "Attribute": "attribute access ('.')",
    "Subscript": "indexing ('[...]')",
    "Lambda": "lambda",
    "ListComp": "comprehensions",
    "SetComp": "comprehensions",
    "DictComp": "comprehensions",
    "GeneratorExp": "comprehensions",
    "JoinedStr": "f-strings",
    "FormattedValue": "f-strings",
    "BinOp": "arithmetic",
    "BoolOp": "'and'/'or'",
    "Compare": "comparisons",
    "IfExp": "'if' expressions",
    "NamedExpr": "':='",
    "Starred": "'*' unpacking",
    "Set": "sets",
    "Await": "'await'",
    "Yield": "'yield'",
    "YieldFrom": "'yield'",
}


def _fail(what: str, col: int | None = None, why: str = "") -> ParamtoolError:
    """``<what> in nn: spec (at col N)[: <why>]``, one line."""
    where = f" (at col {max(col, 1)})" if col is not None else ""
    return ParamtoolError(f"{what} in nn: spec{where}" + (f": {why}" if why else ""))


def _printable(text: str, limit: int = 60) -> str:
    """User text for a message: one line, control characters escaped, at most ``limit`` characters."""
    text = " ".join(text.split())
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _nn_class(name: str) -> Any:
    """The ``torch.nn`` module class called ``name``, or None."""
    import torch

    if name.startswith("_"):
        return None
    obj = vars(torch.nn).get(name)
    if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
        return obj
    return None


# --- the let prefix -----------------------------------------------------------------------------------------

def _is_word_at(text: str, i: int, word: str) -> bool:
    if not text.startswith(word, i):
        return False
    before = text[i - 1] if i > 0 else " "
    after = text[i + len(word)] if i + len(word) < len(text) else " "
    return not (before.isalnum() or before == "_") and not (after.isalnum() or after == "_")


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _split_top(text: str, start: int) -> tuple[int, str]:
    """Scan from ``start`` to the first ``,`` or ``in`` outside brackets and strings: (position, which)."""
    depth, i, quote = 0, start, ""
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and c == ",":
            return i, ","
        elif depth == 0 and _is_word_at(text, i, "in"):
            return i, "in"
        i += 1
    return len(text), ""


def _parse_lets(text: str) -> tuple[list[tuple[str, int, int, int]], int]:
    """Peel the ``let ... in`` prefixes: ([(name, expr start, expr end, name position)], body start)."""
    bindings: list[tuple[str, int, int, int]] = []
    seen: set[str] = set()
    i = _skip_ws(text, 0)
    while _is_word_at(text, i, "let"):
        i += 3
        while True:
            i = _skip_ws(text, i)
            m = _IDENT.match(text, i)
            if not m or m.group() in _KEYWORDS:
                raise _fail("expected a name after 'let' or ','", i + 1)
            name = m.group()
            if name.startswith("_"):
                raise _fail(f"the name '{name}' starts with '_', which is not allowed", i + 1)
            if _nn_class(name):
                raise _fail(f"'let {name}' would hide the torch.nn class of that name", i + 1)
            if name in seen:
                raise _fail(f"'{name}' is bound twice", i + 1)
            seen.add(name)
            j = _skip_ws(text, m.end())
            if not text.startswith("=", j) or text.startswith("==", j):
                raise _fail(f"expected '=' after 'let {name}'", j + 1)
            end, sep = _split_top(text, j + 1)
            if not sep:
                raise _fail(f"'let {name} = ...' needs 'in' followed by the model", end + 1)
            bindings.append((name, j + 1, end, i + 1))
            i = end + len(sep)
            if sep == "in":
                break
        i = _skip_ws(text, i)
    return bindings, i


# --- the walk -----------------------------------------------------------------------------------------------

def _dtype(value: Any, col: int | None) -> Any:
    import torch

    dtype = getattr(torch, value, None) if isinstance(value, str) and not value.startswith("_") else None
    if not isinstance(dtype, torch.dtype):
        raise _fail(f"dtype= takes the name of a torch dtype, e.g. 'float16', not {value!r}", col)
    return dtype


def _module_tensors(module: Any) -> list[Any]:
    return [*module.parameters(), *module.buffers()]


def _modules_in(value: Any) -> list[Any]:
    import torch

    if isinstance(value, torch.nn.Module):
        return [value]
    if isinstance(value, (list, tuple)):
        return [m for v in value for m in _modules_in(v)]
    if isinstance(value, dict):
        return [m for v in value.values() for m in _modules_in(v)]
    return []


def _ints_in(values: list[Any]) -> list[int]:
    out: list[int] = []
    for v in values:
        if isinstance(v, bool):
            continue
        if isinstance(v, int):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out += _ints_in(list(v))
    return out


class _Builder:
    def __init__(self, text: str) -> None:
        self.text = text
        self.bound: dict[str, Any] = {}
        self.total = 0  # elements allocated so far
        self._lines: list[str] = []
        self._base = 0

    # positions -----------------------------------------------------------------------------------------
    def col(self, node: ast.AST) -> int | None:
        """1-based column in the whole EXPR of a node of the piece being built."""
        lineno, offset = getattr(node, "lineno", None), getattr(node, "col_offset", None)
        if lineno is None or offset is None:
            return None
        before = sum(len(line) + 1 for line in self._lines[: lineno - 1])
        line = self._lines[lineno - 1] if lineno - 1 < len(self._lines) else ""
        chars = len(line.encode("utf-8")[:offset].decode("utf-8", "replace"))  # col_offset counts bytes
        return self._base + before + chars + 1

    def fail(self, node: ast.AST, what: str, why: str = "") -> ParamtoolError:
        return _fail(what, self.col(node), why)

    def source(self, node: ast.AST) -> str:
        piece = "\n".join(self._lines)
        return _printable(ast.get_source_segment(piece, node) or "call")

    # building --------------------------------------------------------------------------------------------
    def build(self, start: int, end: int) -> Any:
        piece = self.text[start:end]
        stripped = piece.lstrip()
        self._base = start + len(piece) - len(stripped)
        stripped = stripped.rstrip()
        self._lines = stripped.split("\n")
        if not stripped:
            raise _fail("expected an expression", self._base + 1)
        try:
            tree = ast.parse(stripped, mode="eval")
        except SyntaxError as e:
            col = None
            if e.lineno is not None and e.offset is not None:
                before = sum(len(line) + 1 for line in self._lines[: e.lineno - 1])
                col = self._base + before + e.offset
            msg = _printable(e.msg or "invalid syntax", 100)
            raise _fail("invalid syntax", col, msg) from None
        except (ValueError, MemoryError, RecursionError) as e:
            raise _fail(f"cannot parse: {type(e).__name__}") from None
        try:
            return self.value(tree.body)
        except RecursionError:
            raise _fail("the expression is nested too deeply") from None

    def value(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            if isinstance(node.value, (bool, int, float, str, type(None))):
                return node.value
            raise self.fail(node, f"the literal {type(node.value).__name__} is not allowed "
                                  "(only numbers, strings, True, False, None)")
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = self.value(node.operand)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise self.fail(node, "a sign applies only to numbers")
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, (ast.Tuple, ast.List)):
            items = [self.value(e) for e in node.elts]
            return tuple(items) if isinstance(node, ast.Tuple) else items
        if isinstance(node, ast.Dict):
            out = {}
            for k, v in zip(node.keys, node.values):
                if not (isinstance(k, ast.Constant) and isinstance(k.value, str)):
                    raise self.fail(k if k is not None else v, "dict keys must be strings")
                out[k.value] = self.value(v)
            return out
        if isinstance(node, ast.Name):
            if node.id.startswith("_"):
                raise self.fail(node, f"the name '{node.id}' starts with '_', which is not allowed")
            if node.id in self.bound:
                return self.bound[node.id]
            if _nn_class(node.id):
                raise self.fail(node, f"'{node.id}' must be called, e.g. {node.id}()")
            raise self.fail(node, f"unknown name '{node.id}'",
                            "only torch.nn classes and names bound by let can be used")
        if isinstance(node, ast.Call):
            return self.call(node)
        kind = type(node).__name__
        raise self.fail(node, f"{_NODE_WORDS.get(kind, kind)} not allowed",
                        "only torch.nn calls, literals, tuples, lists and let-bound names")

    def call(self, node: ast.Call) -> Any:
        if not isinstance(node.func, ast.Name):
            if isinstance(node.func, ast.Attribute):
                raise self.fail(node.func, "attribute access ('.') not allowed",
                                "call torch.nn classes by their bare name, e.g. Linear(4, 8)")
            raise self.fail(node.func, "calling this is not allowed",
                            "only torch.nn classes can be called, by their bare name")
        name = node.func.id
        if name.startswith("_"):
            raise self.fail(node.func, f"the name '{name}' starts with '_', which is not allowed")
        cls = _nn_class(name)
        if cls is None:
            if name in self.bound:
                raise self.fail(node.func, f"'{name}' called", "it is bound by let, not a torch.nn class; use it uncalled")
            raise self.fail(node.func, f"unknown torch.nn class '{name}'")
        if getattr(cls, "cls_to_become", None) is not None or name.startswith("Lazy"):
            raise self.fail(node.func, f"lazy module {name} refused", "it has no shapes until it sees data; use "
                                f"{name[4:] or 'the non-lazy form'} with explicit sizes")
        args = []
        for a in node.args:
            if isinstance(a, ast.Starred):
                raise self.fail(a, "'*' unpacking not allowed")
            args.append(self.value(a))
        kwargs: dict[str, Any] = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise self.fail(kw.value, "'**' unpacking not allowed")
            if kw.arg.startswith("_"):
                raise self.fail(kw, f"the keyword '{kw.arg}' starts with '_', which is not allowed")
            if kw.arg == "device":
                raise self.fail(kw, "device= is not supported (nn: models are built on the CPU)")
            value = self.value(kw.value)
            kwargs[kw.arg] = _dtype(value, self.col(kw.value)) if kw.arg == "dtype" and value is not None else value
        self.guard(node, cls, args, kwargs)
        import torch

        try:
            module = cls(*args, **kwargs)
        except Exception as e:  # the constructor's own complaint, in one line
            lines = [line for line in str(e).strip().splitlines() if line.strip()]
            reason = f"{type(e).__name__}: {_printable(lines[0], 200)}" if lines else type(e).__name__
            raise self.fail(node, f"{self.source(node)} failed", reason) from None
        if not isinstance(module, torch.nn.Module):  # pragma: no cover - a torch.nn class always builds one
            raise self.fail(node, f"{name}(...) did not build a module")
        self.total += self.new_elements(module, args, kwargs)
        return module

    @staticmethod
    def new_elements(module: Any, args: list[Any], kwargs: dict[str, Any]) -> int:
        known = {id(t) for m in _modules_in([args, kwargs]) for t in _module_tensors(m)}
        seen: set[int] = set()
        n = 0
        for t in _module_tensors(module):
            if id(t) not in known and id(t) not in seen:
                seen.add(id(t))
                n += t.numel()
        return n

    def guard(self, node: ast.Call, cls: Any, args: list[Any], kwargs: dict[str, Any]) -> None:
        """Refuse a call that would allocate more than MAX_ELEMENTS, before it allocates."""
        import torch

        name = node.func.id  # type: ignore[attr-defined]
        # Meta twins of the module arguments, so that a constructor that copies them copies no memory.
        memo: dict[int, Any] = {}
        for m in _modules_in([args, kwargs]):
            for p in m.parameters():
                memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for b in m.buffers():
                memo.setdefault(id(b), torch.empty_like(b, device="meta"))
        n: int | None = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dry_args, dry_kwargs = copy.deepcopy((args, kwargs), memo)
                with torch.device("meta"):
                    dry = cls(*dry_args, **dry_kwargs)
            n = self.new_elements(dry, dry_args, dry_kwargs)
        except Exception:
            n = None  # the constructor cannot run on meta (or will fail for real): the cheap guard decides
        if n is None:
            ints = _ints_in([*args, *kwargs.values()])
            if math.prod(abs(i) or 1 for i in ints) > MAX_ELEMENTS:
                raise self.fail(node, f"{self.source(node)} refused", "its integer arguments multiply to more "
                                f"than {MAX_ELEMENTS} (2**31) elements")
            return
        if n > MAX_ELEMENTS:
            raise self.fail(node, f"{self.source(node)} refused", f"it would allocate {n} elements, more than "
                                  f"{MAX_ELEMENTS} (2**31)")
        if self.total + n > MAX_ELEMENTS:
            raise self.fail(node, f"{name}(...) refused", f"the model would exceed {MAX_ELEMENTS} (2**31) elements")


def build_module(expr: str, seed: int | None = None) -> Any:
    """Build the ``torch.nn.Module`` an ``nn:`` spec describes (``expr`` is the text after ``nn:``).

    Parameters get torch's default initialization; with ``seed``, the build runs under
    ``torch.random.fork_rng()`` after ``torch.manual_seed(seed)``, so it is deterministic and the
    caller's random state is left untouched. Raises :class:`ParamtoolError` (one line) for anything
    outside the grammar in the module docstring, an unknown class, a failing constructor or a model
    that is too large.
    """
    import torch

    if not isinstance(expr, str):
        raise ParamtoolError("nn: spec must be text")
    if "\x00" in expr:
        raise _fail("a NUL character is not allowed")
    bindings, body_start = _parse_lets(expr)
    builder = _Builder(expr)

    def run() -> Any:
        for name, start, end, _pos in bindings:
            builder.bound[name] = builder.build(start, end)
        result = builder.build(body_start, len(expr))
        if not isinstance(result, torch.nn.Module):
            raise _fail("the model must be a torch.nn module call, e.g. Sequential(Linear(4, 8), ReLU())")
        return result

    if seed is None:
        return run()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return run()

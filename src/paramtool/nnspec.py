"""``nn:EXPR`` sources: a model built from ``torch.nn`` classes, parsed and never evaluated.

Grammar::

    spec    := "let" NAME "=" expr ("," NAME "=" expr)* "in" spec  |  expr
    expr    := CLASS "(" [arg ("," arg)*] ")"  |  NAME  |  literal  |  "(" expr, ... ")"  |  "[" expr, ... "]"
    arg     := expr | KEYWORD "=" expr

CLASS is a ``torch.nn`` module class (``Linear``, ``Sequential``, ``Conv2d``, ...); literals are numbers,
strings, booleans and None. Each call is checked against that allowlist on Python's own syntax tree
(``ast``), so there is no attribute access, subscript, lambda or builtin to reach. A name bound by ``let``
is one module wherever it is used, which is how layers are tied.
"""
from __future__ import annotations

import ast
import math
import re
from typing import Any

from .errors import ParamtoolError

MAX_ELEMENTS = 2**31  # a call whose integer arguments multiply beyond this is refused before allocating
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _nn_class(name: str) -> Any:
    import torch

    obj = getattr(torch.nn, name, None) if not name.startswith("_") else None
    if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
        return obj
    return None


def _split_top(text: str, start: int) -> tuple[int, str]:
    """Scan from ``start`` to the first top-level ``,`` or ``in`` keyword: (position, which)."""
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
        elif depth == 0 and text.startswith("in", i) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")) \
                and (i + 2 == len(text) or not (text[i + 2].isalnum() or text[i + 2] == "_")):
            return i, "in"
        i += 1
    return len(text), ""


def _parse_lets(text: str) -> tuple[list[tuple[str, str]], str]:
    """Peel ``let a = X, b = Y in`` prefixes: ([(name, expr text)], body text)."""
    bindings: list[tuple[str, str]] = []
    rest = text.strip()
    while re.match(r"let\s", rest):
        pos = 3
        while True:
            m = _IDENT.match(rest, len(rest) - len(rest[pos:].lstrip()))
            if not m or m.group() in ("let", "in"):
                raise ParamtoolError(f"nn: spec: expected a name after 'let' in '{text}'")
            after = rest[m.end():].lstrip()
            if not after.startswith("=") or after.startswith("=="):
                raise ParamtoolError(f"nn: spec: expected '=' after 'let {m.group()}'")
            expr_start = len(rest) - len(after) + 1
            end, sep = _split_top(rest, expr_start)
            if not sep:
                raise ParamtoolError(f"nn: spec: 'let {m.group()} = ...' needs 'in' followed by the model")
            bindings.append((m.group(), rest[expr_start:end].strip()))
            pos = end + (1 if sep == "," else 2)
            if sep == "in":
                break
        rest = rest[pos:].strip()
    return bindings, rest


class _Builder:
    def __init__(self, text: str) -> None:
        self.text = text
        self.bound: dict[str, Any] = {}

    def fail(self, node: ast.AST, why: str) -> ParamtoolError:
        col = getattr(node, "col_offset", None)
        return ParamtoolError(f"nn: spec: {why}" + (f" (at column {col + 1})" if col is not None else ""))

    def build(self, expr_text: str) -> Any:
        try:
            tree = ast.parse(expr_text.strip(), mode="eval")
        except SyntaxError as e:
            raise ParamtoolError(f"nn: spec: invalid syntax in '{expr_text.strip()}': {e.msg}") from None
        return self.value(tree.body)

    def value(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool, type(None))):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = self.value(node.operand)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise self.fail(node, "a sign applies only to numbers")
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.Tuple):
            return tuple(self.value(e) for e in node.elts)
        if isinstance(node, ast.List):
            return [self.value(e) for e in node.elts]
        if isinstance(node, ast.Name):
            if node.id in self.bound:
                return self.bound[node.id]
            if _nn_class(node.id):
                raise self.fail(node, f"'{node.id}' must be called, e.g. {node.id}()")
            raise self.fail(node, f"unknown name '{node.id}' (only torch.nn classes and let-bound names)")
        if isinstance(node, ast.Call):
            return self.call(node)
        raise self.fail(node, f"{type(node).__name__.lower()} expressions are not allowed (only torch.nn calls and literals)")

    def call(self, node: ast.Call) -> Any:
        if not isinstance(node.func, ast.Name):
            raise self.fail(node, "only plain torch.nn class names can be called")
        cls = _nn_class(node.func.id)
        if cls is None:
            raise self.fail(node, f"unknown torch.nn class '{node.func.id}'")
        args = [self.value(a) for a in node.args if not isinstance(a, ast.Starred) or self._no_star(a)]
        kwargs = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise self.fail(node, "**kwargs are not allowed")
            kwargs[kw.arg] = self.value(kw.value)
        ints = [v for v in list(args) + list(kwargs.values()) if isinstance(v, int) and not isinstance(v, bool)]
        ints += [x for v in list(args) + list(kwargs.values()) if isinstance(v, (tuple, list))
                 for x in v if isinstance(x, int) and not isinstance(x, bool)]
        if math.prod(abs(i) or 1 for i in ints) > MAX_ELEMENTS:
            raise self.fail(node, f"{node.func.id}(...) would allocate more than {MAX_ELEMENTS} elements")
        try:
            return cls(*args, **kwargs)
        except Exception as e:  # the constructor's own complaint, in one line
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise self.fail(node, f"{node.func.id}(...) failed: {msg}") from None

    def _no_star(self, node: ast.AST) -> bool:
        raise self.fail(node, "*args are not allowed")


def build_module(expr: str, seed: int | None = None) -> Any:
    """Build the model an ``nn:`` spec describes (``expr`` is the text after ``nn:``)."""
    import torch

    bindings, body = _parse_lets(expr)
    builder = _Builder(expr)

    def run() -> Any:
        for name, text in bindings:
            if _nn_class(name):
                raise ParamtoolError(f"nn: spec: 'let {name}' would hide the torch.nn class of that name")
            builder.bound[name] = builder.build(text)
        result = builder.build(body)
        if not isinstance(result, torch.nn.Module):
            raise ParamtoolError("nn: spec: the model must be a torch.nn module call, e.g. Sequential(...)")
        return result

    if seed is None:
        return run()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return run()

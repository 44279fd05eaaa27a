"""``paramtool grad``: the chapter's forward pass and gradients, for a model source.

The model is built (``nn:EXPR``, ``FILE.py:FUNC``) or rebuilt from a pickled ``torch.nn`` model without calling
anything the file names; a seeded random input goes forward, ``output.sum()`` goes backward, and each parameter's
``.grad`` is summarised. A parameter used in several places (one module object at two paths, or one Parameter
registered under two names) gets one gradient, the sum of what each use contributes: each use is measured by
swapping, for the time of one module call, a differentiable view of the parameter into the module
(``view_as`` + ``retain_grad``), so torch's own ``.grad`` is untouched and the views' gradients are the parts.

Nothing here knows about terminals: :func:`compute` returns a :class:`GradReport`, the CLI renders it.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from .errors import ParamtoolError, UsageError, first_line
from .records import dataclass, field
from .toc import FakeModule

if TYPE_CHECKING:
    from .sources import Source

NEEDS_MODEL = "grad needs a model: give nn:EXPR, FILE.py:FUNC or a pickled module"
_SHAPE = re.compile(r"^\s*[(\[]?\s*(\d+(\s*[,x]\s*\d+)*)?\s*,?\s*[)\]]?\s*$")
OUTPUT_VALUES = 16  # values of each output kept in the JSON (row-major, from the start)


def parse_shape(text: str) -> tuple[int, ...]:
    """``2,20``, ``2x20``, ``(2, 20)`` or ``[2, 20]`` -> ``(2, 20)``; anything else is a usage error."""
    m = _SHAPE.match(text)
    if not m or not m.group(1) or ("," in m.group(1) and "x" in m.group(1)):
        raise UsageError(f"--input '{text}' is not a shape: give sizes separated by ',' or 'x', e.g. 2,20 or 2x20")
    return tuple(int(d) for d in re.split(r"\s*[,x]\s*", m.group(1).strip()))


# --- the model ---------------------------------------------------------------------------------------------


def build_model(src: Source, seed: int) -> Any:
    """The ``nn.Module`` a source describes. nn: and factory models are built under ``torch.manual_seed(seed)``
    (in a forked RNG), so their default initialization, and thus the report, is reproducible."""
    import torch

    if src.kind == "nn":
        from .nnspec import build_module

        return build_module(src.text[3:], seed)
    if src.kind == "factory":
        from .factory import call_factory

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            obj = call_factory(src.text)
        if not isinstance(obj, torch.nn.Module):
            raise ParamtoolError(f"{src.text}: returned a state dict; {NEEDS_MODEL}")
        return obj
    if src.kind == "file" and src.layout.pickled:
        return _pickled_model(src)
    raise ParamtoolError(f"{src.label}: a {src.format or src.kind} checkpoint holds no module; {NEEDS_MODEL}")


def _pickled_model(src: Source) -> Any:
    """A ``torch.save(model)`` file as a real module: loaded by the inert unpickler (tensors rebuilt by
    paramtool), then the known torch.nn classes instantiated by ``pt.real_module``."""
    from . import sources
    from .formats.pt import real_module

    ckpt = sources.load(src)
    if not isinstance(ckpt.root, FakeModule):
        raise ParamtoolError(f"{src.label}: a state dict, not a whole model; {NEEDS_MODEL}")
    return real_module(ckpt.root)


# --- the pass ----------------------------------------------------------------------------------------------


@dataclass
class Use:
    """One call of a module that holds the parameter, and the gradient that call contributed."""

    at: str
    grad: Any


@dataclass
class ParamGrad:
    names: list[str]  # every name of the parameter (tied: several), in named_parameters order
    shape: tuple[int, ...]
    dtype: str
    requires_grad: bool
    grad: Any  # torch's own .grad, or None
    uses: list[Use] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.names[0]

    def number(self, what: str) -> float | None:
        if self.grad is None:
            return None
        g = self.grad.detach().double()
        if what == "norm":
            return float(g.norm())
        if what == "mean":
            return float(g.mean()) if g.numel() else 0.0
        return float(g.abs().max()) if g.numel() else 0.0

    def use_norm(self, use: Use) -> float:
        return float(use.grad.detach().double().norm())

    @property
    def sum_error(self) -> float | None:
        """Largest |(sum of the uses' gradients) - .grad|: 0 up to float rounding when every use was seen."""
        if self.grad is None or not self.uses:
            return None
        total = sum(u.grad.detach().double() for u in self.uses)
        return float((total - self.grad.detach().double()).abs().max()) if self.grad.numel() else 0.0

    def as_json(self) -> dict:
        return {
            "name": self.name,
            "names": list(self.names),
            "shape": list(self.shape),
            "dtype": self.dtype,
            "requires_grad": self.requires_grad,
            "has_grad": self.grad is not None,
            "grad_norm": self.number("norm"),
            "grad_mean": self.number("mean"),
            "grad_max_abs": self.number("max"),
            "uses": [{"at": u.at, "norm": self.use_norm(u)} for u in self.uses],
            "sum_error": self.sum_error,
        }


@dataclass
class GradReport:
    source: str
    seed: int
    inputs: list[tuple[int, ...]]
    outputs: list[tuple[str, Any]]  # (label, tensor): "output", or "output[0]" ... for tuple outputs
    loss: str
    params: list[ParamGrad]
    names: list[str] = field(default_factory=list)  # every parameter name, tied ones included, in model order
    input_dtype: str = "float32"
    modules: list[str] = field(default_factory=list)  # every module path (a ReLU's too): what positions count

    def as_json(self, params: list[ParamGrad]) -> dict:
        outs = [_output_json(label, t) for label, t in self.outputs]
        return {
            "source": self.source,
            "seed": self.seed,
            "inputs": [list(s) for s in self.inputs],
            "input_dtype": self.input_dtype,
            "output": {k: v for k, v in outs[0].items() if k != "at"},
            "outputs": outs,
            "loss": self.loss,
            "params": [p.as_json() for p in params],
        }


def _output_json(label: str, t: Any) -> dict:
    import torch

    flat = t.detach().reshape(-1)[:OUTPUT_VALUES]
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    values = [float(v) if flat.is_floating_point() else v for v in flat.tolist()]
    return {"at": label, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
            "values": values}


def _flatten(out: Any, label: str = "output") -> list[tuple[str, Any]]:
    """The tensors of a forward's result: the tensor itself, or those inside tuples, lists and dicts."""
    import torch

    if isinstance(out, torch.Tensor):
        return [(label, out)]
    if isinstance(out, (tuple, list)):
        return [x for i, v in enumerate(out) for x in _flatten(v, f"{label}[{i}]")]
    if isinstance(out, dict):
        return [x for k, v in out.items() for x in _flatten(v, f"{label}[{k!r}]")]
    return []


class _UseTracker:
    """Forward hooks that give each call of a parameter's owning modules its own differentiable view."""

    def __init__(self, model: Any, params: list[Any]) -> None:
        wanted = {id(p) for p in params if p.requires_grad}
        self.owners: dict[Any, list[tuple[str, Any]]] = {}
        for m in model.modules():
            held = [(a, p) for a, p in m._parameters.items() if p is not None and id(p) in wanted]
            if held:
                self.owners[m] = held
        self.paths: dict[int, list[str]] = {}
        for path, m in model.named_modules(remove_duplicate=False):
            self.paths.setdefault(id(m), []).append(path)
        self.calls: dict[int, int] = {}
        self.views: dict[int, list[tuple[Any, int, Any]]] = {}  # id(param) -> [(module, call index, view)]
        self.handles: list[Any] = []

    def __enter__(self) -> "_UseTracker":
        for m in self.owners:
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post, always_call=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self._restore_all()

    def _pre(self, module: Any, args: Any) -> None:
        index = self.calls.get(id(module), 0)
        self.calls[id(module)] = index + 1
        for attr, p in self.owners[module]:
            view = p.view_as(p)
            view.retain_grad()
            module._parameters[attr] = view  # Module.__getattr__ finds it: forward uses the view
            self.views.setdefault(id(p), []).append((module, index, view))

    def _post(self, module: Any, args: Any, out: Any) -> None:
        for attr, p in self.owners[module]:
            module._parameters[attr] = p

    def _restore_all(self) -> None:
        for m, held in self.owners.items():
            for attr, p in held:
                m._parameters[attr] = p

    def uses(self, p: Any) -> list[Use]:
        """The calls that used ``p``, named by module path (by call number when calls and paths differ)."""
        out = []
        for module, index, view in self.views.get(id(p), []):
            paths = self.paths.get(id(module)) or ["?"]
            label = paths[0] or "(model)"
            if self.calls[id(module)] == len(paths):
                label = paths[index] or "(model)"
            elif self.calls[id(module)] > 1:
                label = f"{label} call {index + 1}"
            if view.grad is not None:  # None: this call did not read the parameter (an RNN reads its own list)
                out.append(Use(label, view.grad))
        return out


def input_dtype(model: Any) -> Any:
    """float32, or the one dtype all the model's floating-point parameters share (a bfloat16 model gets
    ``torch.rand(...).to(torch.bfloat16)``), so a half-precision model can be run without a dtype error."""
    import torch

    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _param_groups(model: Any) -> list[tuple[list[str], Any]]:
    """Each parameter once, with all its names (a tied one has several), in named_parameters order."""
    groups: dict[int, tuple[list[str], Any]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), ([], p))[0].append(name)
    return list(groups.values())


def compute(model: Any, shapes: list[tuple[int, ...]], seed: int, source: str = "") -> GradReport:
    """Forward ``torch.rand`` inputs (drawn in order after ``torch.manual_seed(seed)``, in :func:`input_dtype`),
    backpropagate the sum of the output, and collect every parameter's gradient with its per-use parts.

    The same numbers come from ``torch.manual_seed(seed); X = torch.rand(*shape); model(X).sum().backward()``.
    The caller's RNG state is left as it was.
    """
    import torch

    groups = _param_groups(model)
    for _, p in groups:
        p.grad = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dtype = input_dtype(model)
        xs = [torch.rand(*shape).to(dtype) for shape in shapes]
        with _UseTracker(model, [p for _, p in groups]) as tracker:
            try:
                with torch.enable_grad():
                    out = model(*xs)
            except Exception as e:  # a shape mismatch, a wrong dtype: torch's own words, one line
                given = " and ".join("[" + ", ".join(map(str, s)) + "]" for s in shapes)
                raise ParamtoolError(f"forward pass failed on input {given}: {first_line(e)}") from None
            outputs = _flatten(out)
            parts = [(label, t) for label, t in outputs if t.requires_grad]
            if not parts:
                raise ParamtoolError("the output does not depend on any parameter that requires grad: "
                                     "nothing to backpropagate")
            loss = sum(t.sum() for _, t in parts)
            try:
                loss.backward()
            except RuntimeError as e:
                raise ParamtoolError(f"backward pass failed: {first_line(e)}") from None
            params = [ParamGrad(names, tuple(p.shape), str(p.dtype).removeprefix("torch."), p.requires_grad,
                                p.grad, tracker.uses(p)) for names, p in groups]
    loss_text = " + ".join(f"{label}.sum()" for label, _ in parts)
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    modules = [n for n, _ in model.named_modules(remove_duplicate=False)]
    return GradReport(source, seed, list(shapes), outputs, loss_text, params, names,
                      str(dtype).removeprefix("torch."), modules)


def select_params(report: GradReport, layers: list[str] | None) -> list[ParamGrad]:
    """``--layer``: a parameter is reported when any of its names is selected."""
    if not layers:
        return list(report.params)
    from .select import select, tree_paths

    chosen = set(select(report.names, list(layers), shown=tree_paths(report.names, report.modules)))
    return [p for p in report.params if chosen.intersection(p.names)]

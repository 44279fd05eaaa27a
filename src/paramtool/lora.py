"""PEFT LoRA adapters: read one (``adapter_config.json`` beside ``adapter_model.safetensors`` or ``.bin``),
describe it, merge it into its base, or extract one from a fine-tune.

An adapter's tensors are named ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (``lora_embedding_A``
/ ``_B`` for an embedding); the other tensors it holds (``modules_to_save``, trained biases) replace the base's.
The merge is PEFT's ``merge_and_unload()``: W += scale · B·A, transposed for ``Conv1D`` (``fan_in_fan_out``) and
embeddings, scale = alpha / r (alpha / √r with rsLoRA; ``rank_pattern`` / ``alpha_pattern`` per module), computed in
float32 and rounded once into the base's dtype. Variants whose merge is something else (DoRA, ...) are refused by
name.

Whether a weight is a ``Conv1D`` (stored transposed) cannot be told from a square shape: where the base is a model
directory whose ``config.json`` names a transformers architecture, the model is built on the meta device (no
memory, nothing from the file runs: the class is transformers' own) and its modules' classes decide, as they decide
for PEFT; else the shapes, then the adapter's ``fan_in_fan_out``, do.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .checkpoint import Checkpoint
from .errors import FormatError, ParamtoolError
from .ops import note_ties
from .plan import Action, Plan, Report
from .records import dataclass, field

if TYPE_CHECKING:
    from .sources import Source

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
_PAIR = re.compile(r"^(?P<module>.+)\.(?:lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight|lora_embedding_(?P<emb>[AB])(?:\.[^.]+)?)$")

# config keys that make the merge something other than W += scale · B·A (refused, by name, when set)
VARIANTS = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "a bias on lora_B (lora_bias)",
    "use_qalora": "QALoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "layer_replication": "layer replication (layer_replication)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
}
# initializations after which the adapter belongs to a changed base (unless PEFT converted it when saving)
CHANGED_BASE = ("pissa", "olora", "corda", "loftq", "lora_ga")


def is_adapter(directory: str | None) -> bool:
    return bool(directory) and os.path.isfile(os.path.join(directory, CONFIG))


@dataclass(frozen=True)
class Pair:
    """One low-rank update: module ``module`` gets scale · B·A (its transpose for an embedding)."""

    module: str  # as the adapter names it, without ``base_model.model.``
    a: str  # adapter tensor names
    b: str
    embedding: bool
    rank: int
    alpha: float
    scale: float
    a_shape: tuple[int, ...] = ()
    b_shape: tuple[int, ...] = ()

    @property
    def target(self) -> str:
        """The base tensor it modifies, by the adapter's naming."""
        return f"{self.module}.weight"


@dataclass
class Adapter:
    directory: str
    config: dict
    weights: str  # the weights file
    pairs: list[Pair] = field(default_factory=list)
    replaces: dict[str, str] = field(default_factory=dict)  # adapter tensor -> base tensor it replaces (adapter naming)

    @property
    def variant(self) -> str | None:
        """What makes this adapter something ``lora merge`` does not do, or None."""
        if str(self.config.get("peft_type", "LORA")).upper() != "LORA":
            return f"a {self.config.get('peft_type')} adapter (only LoRA is merged)"
        for key, label in VARIANTS.items():
            if self.config.get(key):
                return label
        init = self.config.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(CHANGED_BASE):
            return f"init_lora_weights={init} (the adapter belongs to a base changed at initialization)"
        return None

    def describe(self) -> dict:
        """What ``inspect`` shows: rank, alpha, targets, and what each pair does to which base tensor."""
        c = self.config
        return {
            "peft_type": c.get("peft_type", "LORA"),
            "r": c.get("r"),
            "lora_alpha": c.get("lora_alpha"),
            "use_rslora": bool(c.get("use_rslora")),
            "fan_in_fan_out": bool(c.get("fan_in_fan_out")),
            "target_modules": c.get("target_modules"),
            "base_model": c.get("base_model_name_or_path"),
            "variant": self.variant,
            "pairs": [{"module": p.module, "modifies": p.target, "a": p.a, "b": p.b, "rank": p.rank, "alpha": p.alpha,
                       "scale": p.scale, "embedding": p.embedding,
                       "a_shape": list(p.a_shape), "b_shape": list(p.b_shape)} for p in self.pairs],
            "replaces": [{"tensor": n, "replaces": t} for n, t in self.replaces.items()],
        }


def _pattern(patterns: dict, module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key matching the end of the module path."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def weights_file(directory: str) -> str:
    """The adapter's weights file (``adapter_model.safetensors``, else ``.bin``)."""
    found = next((os.path.join(directory, w) for w in WEIGHTS if os.path.isfile(os.path.join(directory, w))), None)
    if found is None:
        raise FormatError(f"{directory}: an adapter_config.json without {' or '.join(WEIGHTS)}")
    return found


def read_config(directory: str) -> dict:
    """An adapter directory's ``adapter_config.json``."""
    try:
        with open(os.path.join(directory, CONFIG), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise FormatError(f"{directory}/{CONFIG}: cannot read it ({e})") from None
    if not isinstance(config, dict):
        raise FormatError(f"{directory}/{CONFIG}: not a JSON object")
    return config


def read_adapter(directory: str, names: list[str], shapes: dict[str, tuple[int, ...]]) -> Adapter:
    """The adapter in ``directory`` whose weights file holds ``names`` (with ``shapes``)."""
    config = read_config(directory)
    adapter = Adapter(directory, config, weights_file(directory))
    halves: dict[str, dict[str, str]] = {}
    for name in names:
        m = _PAIR.match(name)
        if m is None:
            adapter.replaces[name] = name.removeprefix(PREFIX).replace(".base_layer.", ".")  # a wrapped layer's bias
            continue
        module = m["module"].removeprefix(PREFIX)
        halves.setdefault(module, {})[(m["ab"] or m["emb"]) + ("e" if m["emb"] else "")] = name
    for module, got in halves.items():
        embedding = "Ae" in got or "Be" in got
        a, b = got.get("Ae" if embedding else "A"), got.get("Be" if embedding else "B")
        if a is None or b is None:
            raise FormatError(f"{adapter.weights}: '{module}' has lora_{'B' if a else 'A'} without its other half")
        rank = shapes[a][0]
        alpha = float(_pattern(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        adapter.pairs.append(Pair(module, a, b, embedding, rank, alpha, scale, shapes[a], shapes[b]))
    return adapter


def update_norms(src: Source, values: Checkpoint) -> list[dict] | None:
    """For ``stats`` on an adapter directory: each pair's update, scale · B·A, by the base tensor it modifies: its
    rank, scale and Frobenius norm (from the r×r Gram matrices: ‖BA‖² = Σ (BᵀB) ∘ (AAᵀ), no product formed).
    None for any other source."""
    if not is_adapter(getattr(src, "directory", None)):
        return None
    adapter = read_adapter(src.directory, list(values.names), {i.name: tuple(i.shape) for i in values.infos()})
    out = []
    for p in adapter.pairs:
        a, b = values.tensor(p.a).double(), values.tensor(p.b).double()
        squared = float(((b.T @ b) * (a @ a.T)).sum()) if a.dim() == 2 and b.dim() == 2 else float("nan")
        out.append({"modifies": p.target, "rank": p.rank, "scale": p.scale,
                    "norm": abs(p.scale) * math.sqrt(max(squared, 0.0))})
    return out


# settings of adapter_config.json that change what an adapter does
BEHAVIOUR = ("peft_type", "r", "lora_alpha", "use_rslora", "fan_in_fan_out", "target_modules", "rank_pattern",
             "alpha_pattern", "modules_to_save", "bias", "use_dora", "init_lora_weights")


def diff_adapters(a: Checkpoint, b: Checkpoint, changed: list[str]) -> dict | None:
    """For ``diff`` of two adapter directories (their weights files ``a`` and ``b``): the settings that differ
    (``{key: [a's, b's]}``), and the base tensors whose update changed (by A's pairs, of the ``changed`` names);
    None unless both are adapters."""
    dirs = [os.path.dirname(c.path) if c.path else None for c in (a, b)]
    if not all(is_adapter(d) for d in dirs):
        return None
    ca, cb = read_config(dirs[0]), read_config(dirs[1])
    found = read_adapter(dirs[0], list(a.names), {i.name: tuple(i.shape) for i in a.infos()})
    owner = {n: p.target for p in found.pairs for n in (p.a, p.b)} | found.replaces
    return {"config": {k: [ca.get(k), cb.get(k)] for k in BEHAVIOUR if ca.get(k) != cb.get(k)},
            "updates_changed": sorted({owner[n] for n in changed if n in owner})}


# ---------------------------------------------------------------- the base's modules


def module_classes(directory: str | None) -> dict[str, str]:
    """Module path -> class name of the transformers model a model directory's config.json names, built on the
    meta device; empty where there is none (or transformers cannot build it)."""
    if not directory or not os.path.isfile(os.path.join(directory, "config.json")):
        return {}
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            arch = (json.load(f).get("architectures") or [None])[0]
        import torch
        import transformers

        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        if cls is None or not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
            return {}
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # its notes on the config are not this command's output
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                model = cls(transformers.AutoConfig.from_pretrained(directory, trust_remote_code=False))
        finally:
            transformers.logging.set_verbosity(verbosity)
        return {path: type(m).__name__ for path, m in model.named_modules()}
    except Exception:  # no transformers, an unknown architecture: shapes decide
        return {}


def locate(name: str, names: set[str]) -> str | None:
    """The base tensor an adapter's tensor name means: itself, else with leading module parts left off (an adapter
    made on ``LlamaForCausalLM`` applied to a bare ``LlamaModel``'s weights)."""
    parts = name.split(".")
    return next((".".join(parts[i:]) for i in range(len(parts) - 1) if ".".join(parts[i:]) in names), None)


def _transposed(pair: Pair, kind: str | None, base_shape: tuple[int, ...], ab_shape: tuple[int, int],
                fan_in_fan_out: bool) -> bool:
    """Is the update (B·A) transposed onto the base weight? For embeddings always; for a module whose class is
    known, when it is a Conv1D; else as the shapes say, and the adapter's ``fan_in_fan_out`` for a square one."""
    if pair.embedding:
        return True
    if kind is not None:
        return kind == "Conv1D"
    if ab_shape[0] == ab_shape[1]:
        return fan_in_fan_out
    return tuple(base_shape) == (ab_shape[1], ab_shape[0])


# ---------------------------------------------------------------- merge


def plan_merge(base: Checkpoint, base_values: Checkpoint, adapter: Adapter, adapter_values: Checkpoint,
               classes: dict[str, str]) -> Plan:
    """``lora merge`` as a plan on the base's listing: each pair's target gets W + scale · B·A, each replaced
    tensor the adapter's; values are read from ``base_values`` and ``adapter_values`` as each storage is written.

    A target the adapter also holds a copy of (PEFT saves an embedding's ``base_layer.weight`` beside its pair,
    and sets it when loading) gets that copy + scale · B·A, as ``merge_and_unload()`` computes it."""
    if adapter.variant:
        raise ParamtoolError(f"refused: {adapter.variant}; lora merge does W += scale · B·A only")
    infos = {i.name: i for i in base.infos()}
    shapes = {i.name: tuple(i.shape) for i in adapter_values.infos()}
    names = set(infos)
    report = Report("lora merge")
    plan = Plan(report)
    missing: list[str] = []
    copies: dict[str, str] = {}  # base tensor -> the adapter's tensor that replaces it
    for name, replaced in adapter.replaces.items():
        target = locate(replaced, names)
        if target is None:
            missing.append(replaced)
        elif shapes[name] != tuple(infos[target].shape):
            raise ParamtoolError(f"the adapter's '{name}' is {list(shapes[name])} but the base's '{target}' is "
                                 f"{list(infos[target].shape)}: not this adapter's base")
        else:
            copies[target] = name
    updated: dict[str, Callable[[Any], None]] = {}
    for pair in adapter.pairs:
        target = locate(pair.target, names)
        if target is None:
            missing.append(pair.target)
            continue
        a, b = shapes[pair.a], shapes[pair.b]
        if len(a) != 2 or len(b) != 2:
            raise ParamtoolError(f"refused: '{pair.module}' is a LoRA on a convolution (lora_A {list(a)}); "
                                 "lora merge takes Linear, Conv1D and Embedding layers")
        flip = _transposed(pair, classes.get(target.removesuffix(".weight")) if classes else None, infos[target].shape,
                           (b[0], a[1]), bool(adapter.config.get("fan_in_fan_out")))
        update = (a[1], b[0]) if flip else (b[0], a[1])
        if update != tuple(infos[target].shape):
            raise ParamtoolError(f"'{pair.module}': B·A is {list(update)} but the base's '{target}' is "
                                 f"{list(infos[target].shape)}: not this adapter's base")
        weight = (adapter_values, copies.pop(target)) if target in copies else (base_values, target)
        updated[target] = _add_update(weight, pair, flip, adapter_values)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ParamtoolError(f"the base has no tensor for {len(missing)} of the adapter's targets ({shown}): "
                             "not this adapter's base")
    updated.update({target: _replace_with(name, adapter_values) for target, name in copies.items()})
    for target, run in updated.items():
        report.changed.append(target)
        plan.actions.append(Action(target, run, True))
    note_ties(report, list(infos.values()))
    return plan


def update_of(pair: Pair, flip: bool, a: Any, b: Any, dtype: Any) -> Any:
    """scale · B·A in ``dtype``, transposed when ``flip``."""
    delta = b.to(dtype) @ a.to(dtype)
    return (delta.T if flip else delta) * pair.scale


def _add_update(weight: tuple[Checkpoint, str], pair: Pair, flip: bool, adapter: Checkpoint) -> Callable[[Any], None]:
    """W + scale · B·A, W being ``weight`` (a checkpoint and a name: the base's tensor, or the adapter's copy)."""
    def run(out: Any) -> None:
        from .merge import accumulator

        w = weight[0].tensor(weight[1])
        acc = accumulator(w.dtype)
        out.copy_(w.to(acc) + update_of(pair, flip, adapter.tensor(pair.a), adapter.tensor(pair.b), acc))

    return run


def _replace_with(name: str, adapter: Checkpoint) -> Callable[[Any], None]:
    def run(out: Any) -> None:
        out.copy_(adapter.tensor(name))

    return run


# ---------------------------------------------------------------- extract


@dataclass
class Extracted:
    """One extracted pair, for the report."""

    name: str  # the base tensor
    module: str
    rank: int
    energy: float  # the fraction of the delta's squared Frobenius norm the rank keeps


def extract(base: Checkpoint, tuned: Checkpoint, names: list[str], rank: int, classes: dict[str, str],
            done: Callable[[], None] = lambda: None) -> tuple[dict[str, Any], dict, list[Extracted]]:
    """The truncated SVD of each 2-D weight's delta (TUNED - BASE), one tensor at a time: the adapter's tensors
    (PEFT's names), its config, and the energy each kept. Weights that did not change are left out."""
    import torch

    from .merge import accumulator

    tensors: dict[str, Any] = {}
    report: list[Extracted] = []
    ranks: dict[str, int] = {}
    conv1d = False
    with torch.no_grad():
        for name in names:
            module = name.removesuffix(".weight")
            kind = classes.get(module)
            w0, w1 = base.tensor(name), tuned.tensor(name)
            acc = accumulator(w0.dtype)
            delta = w1.to(acc) - w0.to(acc)
            done()
            if not delta.any():
                continue
            embedding = kind is not None and "Embedding" in kind
            flip = embedding or kind == "Conv1D"
            conv1d = conv1d or kind == "Conv1D"
            m = delta.T if flip else delta  # the update is B·A (its transpose for Conv1D and embeddings)
            u, s, vh = torch.linalg.svd(m, full_matrices=False)
            r = min(rank, s.numel())
            root = s[:r].sqrt()
            b, a = (u[:, :r] * root).contiguous(), (root[:, None] * vh[:r]).contiguous()
            energy = float((s[:r].double() ** 2).sum() / (s.double() ** 2).sum())
            key = PREFIX + module
            if embedding:
                tensors[f"{key}.lora_embedding_A"], tensors[f"{key}.lora_embedding_B"] = a.to(w0.dtype), b.to(w0.dtype)
            else:
                tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a.to(w0.dtype), b.to(w0.dtype)
            ranks[module] = r
            report.append(Extracted(name, module, r, energy))
    if not report:
        raise ParamtoolError("no selected 2-D weight differs between BASE and TUNED: nothing to extract")
    pattern = {m: r for m, r in ranks.items() if r != rank}
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "r": rank, "lora_alpha": rank, "use_rslora": False, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": conv1d, "target_modules": list(ranks), "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),  # alpha = r everywhere: scale 1, so B·A is the delta
        "modules_to_save": None, "init_lora_weights": True, "use_dora": False,
    }
    return tensors, config, report


def extract_candidates(base: Checkpoint, tuned: Checkpoint, chosen: list[str], classes: dict[str, str]) -> list[str]:
    """The selected names an adapter can take: 2-D floating-point ``*.weight`` tensors of both, of the same shape,
    of a Linear, Conv1D or Embedding where the modules' classes are known; a shape or dtype mismatch is an error."""
    from .formats.dtypes import kind

    mine = {i.name: i for i in base.infos()}
    theirs = {i.name: i for i in tuned.infos()}
    out, bad = [], []
    for name in chosen:
        info = mine[name]
        if not name.endswith(".weight") or len(info.shape) != 2 or kind(info.dtype) != "float":
            continue
        if classes and not re.search(r"Linear|Conv1D|Embedding", classes.get(name.removesuffix(".weight"), "")):
            continue
        other = theirs.get(name)
        if other is None or (other.shape, other.dtype) != (info.shape, info.dtype):
            bad.append(name)
            continue
        out.append(name)
    if bad:
        raise ParamtoolError(f"TUNED does not have these weights as BASE has them: {', '.join(bad[:5])}"
                             + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    return out


def write_adapter(directory: str, tensors: dict[str, Any], config: dict) -> None:
    """A PEFT adapter directory, written as one atomic step (``commit.commit_directory``)."""
    from . import formats
    from .commit import commit_directory

    def build(work: str) -> None:
        formats.SAFETENSORS.save(tensors, {"format": "pt"}, os.path.join(work, WEIGHTS[0]))
        with open(os.path.join(work, CONFIG), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.write("\n")

    commit_directory(directory, build)


def open_adapter(path: str) -> tuple[Adapter, Checkpoint]:
    """The adapter in directory ``path`` (or the directory of its ``adapter_config.json`` / weights file), and its
    tensors opened for values."""
    from . import sources

    directory = path if os.path.isdir(path) else os.path.dirname(path) or "."
    if not is_adapter(directory):
        raise ParamtoolError(f"{path}: not a PEFT adapter (no {CONFIG})")
    values = sources.load_lazy(sources.resolve(weights_file(directory)))
    shapes = {i.name: tuple(i.shape) for i in values.infos()}
    return read_adapter(directory, list(values.names), shapes), values

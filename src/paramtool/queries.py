"""The read commands, one implementation each: what ``inspect``, ``ties``, ``stats``, ``diff``, ``show``,
``schemes`` and ``check`` find in a source, as data with its JSON document (``as_json``).

The full command line (``cli``) and the fast path for scripts (``launch``) both call these; they differ only in
how they parse the command line and whether people or programs read the result (``output.Sink``). Nothing here
prints: warnings and notes (a config-tied name used for the tensor it is stored as) go to the ``say`` the caller
passes, which has ``warn(text)`` and ``note(text)``. Imports are made where they are needed: listing a file must
not import numpy or torch, and nothing here imports typer or rich.
"""
from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any, Callable

    from .checkpoint import Checkpoint
    from .sources import Source
    from .toc import TensorInfo, Toc

from .records import dataclass


class Silent:
    """A ``say`` that drops warnings and notes (a caller that has nowhere to put them)."""

    def warn(self, text: str) -> None:
        pass

    def note(self, text: str) -> None:
        pass


# --- names as typed: positions and the names config.json ties (the write commands use these too) -------------


def config_aliases(src: Source, ckpt: Checkpoint) -> dict[str, str]:
    """In a model directory: the names config.json ties to a stored tensor (``lm_head.weight`` -> the embedding)."""
    if not getattr(src, "directory", None):
        return {}
    from .sources import describe

    return dict(describe(src, ckpt).config_ties)


def note_aliases(used: list[str], aliases: dict[str, str], say: Any) -> None:
    """Say once for each config-tied name in ``used`` which stored tensor it stands for (the names as they are:
    ``say`` escapes what it prints)."""
    for name in dict.fromkeys(used):
        if name in aliases:
            say.note(f"note: {name} is stored as {aliases[name]} (config.json ties them)")


def positions(src: Source, ckpt: Checkpoint, typed: list[str]) -> list[str] | None:
    """Where a selector or NAME in ``typed`` starts with a position (``[0]``, ``[0][1].bias``): the module paths
    the inspect tree shows, to count children in (the names config.json ties and a model's parameterless
    modules included); else None (nothing to count)."""
    if not any(t.lstrip().startswith("[") for t in typed):
        return None
    from .sources import tree_paths_of

    return tree_paths_of(src, ckpt)


def config_layers(src: Source, ckpt: Checkpoint, layers: list[str] | None, say: Any,
                  flag: str = "--layer") -> list[str]:
    """--layer selectors as plans take them: positions made the module paths they reach, counted in the tree
    inspect shows (``positions``), and those that name only config-tied names resolved to the stored tensors
    (said once)."""
    from .select import config_selectors

    aliases = config_aliases(src, ckpt) if layers else {}
    shown = positions(src, ckpt, layers or [])
    if not aliases and shown is None:
        return list(layers or [])
    out, used = config_selectors(list(ckpt.names), list(layers or []), aliases, flag, shown)
    note_aliases(used, aliases, say)
    return out


def resolved_name(src: Source, ckpt: Checkpoint, name: str, say: Any) -> str:
    """A NAME argument: positions ([0][1][0].bias) and config-tied names resolved to the stored name."""
    from .select import resolve_name

    aliases = config_aliases(src, ckpt)
    typed = resolve_name(name, list(ckpt.names), shown=positions(src, ckpt, [name]))
    note_aliases([typed], aliases, say)
    return aliases.get(typed, typed)


# --- inspect -----------------------------------------------------------------------------------------------


@dataclass
class Inspection:
    """``inspect``: the table of contents, the tensors ``--layer`` chose, and a PEFT adapter's description."""

    toc: Toc
    tensors: list
    adapter: dict | None = None

    def as_json(self) -> dict:
        return {**inspect_json(self.toc, self.tensors), **({"adapter": self.adapter} if self.adapter else {})}


def inspect(src: Source, key: str | None, layers: list[str] | None, say: Any) -> Inspection:
    """The table of contents (no tensor data read), its warnings said, narrowed to ``layers``."""
    from .select import select, tree_paths
    from .sources import read_toc

    toc = read_toc(src, key)
    for w in toc.warnings:
        say.warn(w)
    names = [t.name for t in toc.tensors]  # the tree's: config-tied names and a model's modules count as positions
    chosen = set(select(names, list(layers or []), "all", shown=tree_paths(names, toc.modules) if layers else None))
    return Inspection(toc, [t for t in toc.tensors if t.name in chosen], adapter_of(src, toc.tensors))


def adapter_of(src: Source, tensors: list) -> dict | None:
    """A PEFT adapter directory's description (rank, alpha, targets, what each pair modifies), else None."""
    if not getattr(src, "directory", None):
        return None
    from . import lora

    if not lora.is_adapter(src.directory):
        return None
    return lora.read_adapter(src.directory, [t.name for t in tensors],
                             {t.name: tuple(t.shape) for t in tensors}).describe()


def inspect_json(toc: Toc, tensors: list[TensorInfo]) -> dict:
    """``inspect --json``'s document for ``tensors`` of ``toc``."""
    from .ties import tied_to, unique_counts

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
                **({"stored": False} if t.name in toc.config_ties else {}),
                **({"kind": t.kind} if t.kind else {}),
                **({"quantization": toc.quantization[t.name]} if t.name in toc.quantization else {}),
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
    if toc.key is not None:
        out["key"] = toc.key
    if toc.values is not None:
        out["values"] = toc.values
    from .formats.weights_only import beyond

    # what torch.load(weights_only=True) would need allowlisted; a format without a pickle needs nothing
    out["globals"] = beyond(toc.globals) if toc.globals is not None else []
    out["weights_only_loadable"] = not out["globals"]
    return out


# --- ties --------------------------------------------------------------------------------------------------


@dataclass
class Ties:
    """``ties``: the groups of names that share storage (and, with ``--values``, bytes)."""

    source: str
    toc: Toc
    groups: list

    def as_json(self) -> dict:
        return {"source": self.source, "groups": [g.as_json() for g in self.groups]}


def ties(src: Source, key: str | None, values: bool, say: Any) -> Ties:
    """Tie groups from the listing (``values``: also distinct tensors with identical bytes, which reads data); in a
    model directory, marked with what config.json ties, and stored pairs of those that differ said."""
    from . import sources
    from .ties import find_ties, group_order, value_ties

    if values:
        ckpt = sources.load_lazy(src, key)
        toc = sources.describe(src, ckpt)
        groups = find_ties(toc.tensors, toc.meta_ties) + value_ties(ckpt.tensor, toc.tensors, ckpt.raw_bytes,
                                                                    ckpt.raw_samples)
        groups.sort(key=group_order)
    else:
        toc = sources.read_toc(src, key)
        groups = find_ties(toc.tensors, toc.meta_ties)
    if src.directory:  # a model directory: the ties its config.json declares, and stored pairs that differ
        from .formats.modeldir import differing_pairs, mark_config

        groups = mark_config(groups, toc.config_ties)
        pairs = toc.config_pairs
        for w in toc.warnings + (differing_pairs(sources.load_lazy(src, key).tensor, pairs) if pairs else []):
            say.warn(w)
    return Ties(src.label, toc, groups)


# --- stats -------------------------------------------------------------------------------------------------


@dataclass
class Stats:
    """``stats``: per-tensor numbers, histograms when asked, and a LoRA adapter's update norms."""

    source: str
    names: list
    results: list
    hists: dict
    png: dict
    updates: list | None = None
    histograms: bool = False  # --hist: the histograms go in the JSON document

    def as_json(self) -> dict:
        doc: dict = {"source": self.source, "tensors": [r.as_json() for r in self.results]}
        if self.histograms:
            doc["histograms"] = {n: {"edges": h.edges, "counts": h.counts, "zeros": h.zeros}
                                 for n, h in self.hists.items()}
        if self.updates is not None:
            doc["adapter_updates"] = self.updates
        return doc


class _NoProgress:
    """``stats``' progress when nobody watches: ``advance`` does nothing."""

    def __init__(self, total: int) -> None:
        pass

    def __enter__(self) -> Callable[[], None]:
        return lambda: None

    def __exit__(self, *exc: Any) -> None:
        pass


def stats(src: Source, key: str | None, layers: list[str] | None, say: Any, bins: int | None = None,
          png: bool = False, progress: Any = _NoProgress) -> Stats:
    """The numbers of the tensors ``layers`` selects, each tensor read once (for numbers and histograms), of the
    files as they were (``verify``). ``progress(total)`` is a context that gives the ``advance()`` called once
    per tensor."""
    from . import sources
    from . import stats as st
    from .formats.pins import verify
    from .select import select

    ckpt = sources.load_lazy(src, key)
    names = select(list(ckpt.names), config_layers(src, ckpt, layers, say), "all")
    with progress(len(names)) as advance:
        done = st.stats_many(ckpt.tensor, names, bins, png, advance, raw_of=st.raw_reader(ckpt))
    verify()  # numbers of the files as they were, or none
    updates = None
    if src.directory:  # a LoRA adapter directory: what each pair adds to its base tensor
        from .lora import update_norms

        updates = update_norms(src, ckpt)
    return Stats(src.label, names, done.results, done.hists, done.png, updates, bins is not None)


# --- diff, show, schemes, check ----------------------------------------------------------------------------


def diff(a: str, b: str, key: str | None, rtol: float = 0.0, atol: float = 0.0) -> Any:
    """``compare.diff`` of two sources (values only, directories too), of the files as they were. diff follows
    cmp: any error is exit status 2, an unforeseen one too."""
    from . import compare, fsops, sources
    from .errors import ParamtoolError
    from .formats.pins import verify

    fsops.FAILURE[0] = 2  # (a bus error too)
    try:
        ca = sources.load_lazy(sources.resolve(a), key)
        cb = sources.load_lazy(sources.resolve(b), key)
        result = compare.diff(ca, cb, rtol, atol)
        verify()  # the difference of the files as they were, or none
    except ParamtoolError as e:
        e.exit_code = 2
        raise
    return result


def show(src: Source, key: str | None, name: str, json_out: bool, say: Any) -> Any:
    """A tensor's values as ``print(t)`` prints them (text), or ``show --json``'s document. Where its bytes are at
    hand in a dtype ``printing`` prints exactly as torch does, without torch; else through torch."""
    from . import printing, sources
    from .errors import ParamtoolError
    from .formats.pins import verify

    ckpt = sources.load_lazy(src, key)
    stored = resolved_name(src, ckpt, name, say)  # a position ([0][1][0].bias), a config tie
    if stored not in ckpt.names:
        from .select import unknown_name

        raise ParamtoolError(unknown_name(name, list(ckpt.names)))
    info = next((i for i in ckpt.infos() if i.name == stored), None)
    raw = ckpt.raw_bytes(stored) if info is not None and printing.supports(info.dtype) else None
    if raw is not None:
        doc = (printing.values_json(name, raw, info.dtype, info.shape) if json_out
               else printing.tensor_text(raw, info.dtype, info.shape))
    else:
        from .values import tensor_json, tensor_text

        t = ckpt.tensor(stored)
        doc = tensor_json(name, t) if json_out else tensor_text(t)
    verify()  # the values of the file as it was, or none
    return doc


def schemes() -> dict:
    """``schemes --json``'s document: the initializers, their options and defaults."""
    from .schemes import schemes_table

    return {"schemes": schemes_table()}


def check(source: str | None, key: str | None, thresholds: Any, ignore: set[str]) -> tuple[Source, Any]:
    """The source and its health report, without the rules in ``ignore``. As diff: any error is exit status 2."""
    from . import check as health
    from . import sources
    from .errors import ParamtoolError

    try:
        src = sources.resolve(source)
        ckpt = sources.load_lazy(src, key)
        report = health.check(ckpt, sources.describe(src, ckpt), thresholds)
    except ParamtoolError as e:
        e.exit_code = 2
        raise
    report.findings = [f for f in report.findings if f.rule not in ignore]
    return src, report

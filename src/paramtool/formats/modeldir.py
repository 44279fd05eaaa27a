"""Model directories, as ``save_pretrained`` writes them: the weights (one file, or shards and an index) beside
sidecar files (``config.json``, tokenizer files, ``generation_config.json``, a README).

Read: the weights are read as the file (or sharded checkpoint) they are; ``config.json`` adds the ties the
library restores at load time but leaves out of the file (``lm_head.weight`` is the input embedding).
Write: a new directory in the library's layout and naming, every sidecar copied byte for byte.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Any

from .. import blob
from ..errors import FormatError, UsageError
from ..fsops import is_temp
from ..records import dataclass, field, replace
from ..toc import TensorInfo
from . import WEIGHT_EXTENSIONS

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from ..checkpoint import Checkpoint

SAFETENSORS_NAME, PT_NAME = "model.safetensors", "pytorch_model.bin"
MAX_CONFIG = 64 << 20


def find_weights(directory: str) -> str:
    """The one weights file of a directory without an index; several unrelated ones are an error naming them."""
    found = sorted(f for f in blob.listdir(directory)
                   if f.lower().endswith(WEIGHT_EXTENSIONS) and blob.isfile(os.path.join(directory, f)))
    if not found:
        raise FormatError(f"{directory}: a directory without weights (model.safetensors, pytorch_model.bin, *.pt, "
                          "*.pth, *.ckpt), an *.index.json or a torch.distributed .metadata")
    library = [f for f in found if f in (SAFETENSORS_NAME, PT_NAME)]
    if len(found) > 1 and len(library) == 1:  # a trainer's directory: optimizer.pt, training_args.bin are sidecars
        return os.path.join(directory, library[0])
    if len(found) > 1:
        raise FormatError(f"{directory}: several weight files and no index ({', '.join(found)}); "
                          "name the file to use")
    return os.path.join(directory, found[0])


def weight_files(directory: str, weights: list[str]) -> set[str]:
    """Names (relative to ``directory``) that belong to the weights: the files, and any index beside them."""
    if blob.is_remote(directory):
        own = {w[len(directory.rstrip("/")) + 1:] for w in weights if w.startswith(directory.rstrip("/") + "/")}
        return own | {f for f in blob.listdir(directory) if f.endswith(".index.json")}
    own = {os.path.relpath(os.path.abspath(w), os.path.abspath(directory)) for w in weights}
    return own | {os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(directory), "*.index.json"))}


def copy_sidecars(directory: str, weights: set[str], work: str, replaced: dict[str, bytes] | None = None) -> None:
    """Copy every entry of ``directory`` that is not a weights file into ``work``, byte for byte (not the
    directory being built, when the output is inside the source); ``replaced`` (name -> contents) are written
    anew instead (config.json with a new vocab_size). A symlink that leads outside the directory is written as
    a link to the same target, not followed: paramtool reads nothing outside the checkpoint."""
    if blob.is_remote(directory):  # a bucket prefix or a Hub repository: its top-level files, fetched
        for entry in sorted(blob.listdir(directory)):
            path = os.path.join(directory, entry)
            if entry not in weights and blob.isfile(path):
                blob.copy_to(path, os.path.join(work, entry))
    inside = os.path.abspath(work) + os.sep
    for entry in ([] if blob.is_remote(directory) else sorted(os.listdir(directory))):
        path = os.path.join(directory, entry)
        if entry in weights or entry.endswith(".paramtool-tmp") or is_temp(entry) or inside.startswith(os.path.abspath(path) + os.sep):
            continue
        real, root = os.path.realpath(path), os.path.realpath(directory)
        if os.path.islink(path) and os.path.commonpath([root, real]) != root:
            os.symlink(real, os.path.join(work, entry))  # (a Hugging Face cache blob): linked, never read
        elif os.path.isdir(path):
            if not any(w.startswith(entry + os.sep) for w in weights):
                shutil.copytree(path, os.path.join(work, entry), symlinks=True)
        else:
            shutil.copy2(path, os.path.join(work, entry))
    for name, data in (replaced or {}).items():
        with open(os.path.join(work, name), "wb") as f:
            f.write(data)


# --- sizes and shards --------------------------------------------------------------------------------

_UNITS = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3}


def parse_size(text: str) -> int:
    """A shard size as transformers reads it: ``5GB`` (decimal), ``500MiB`` (binary), ``200KB``, or bytes."""
    s = text.strip().upper()
    if s.isdigit():
        return int(s)
    for unit, factor in _UNITS.items():
        if s.endswith(unit) and s[: -len(unit)].strip().isdigit():
            size = int(s[: -len(unit)]) * factor
            if text.strip().endswith("b") and unit in ("GB", "MB", "KB"):
                size //= 8  # transformers: a lower-case b means bits
            if size > 0:
                return size
    raise UsageError(f"--max-shard-size '{text}' is not a size: use an integer followed by a unit, e.g. 500MB, 5GB, 2GiB")


def shard_names(fmt: str, count: int) -> list[str]:
    """The library's file names: ``model-00001-of-00003.safetensors``, ``pytorch_model-00001-of-00003.bin``."""
    base, ext = os.path.splitext(library_name(fmt))
    if count == 1:
        return [base + ext]
    return [f"{base}-{i:05d}-of-{count:05d}{ext}" for i in range(1, count + 1)]


def index_name(fmt: str) -> str:
    return library_name(fmt) + ".index.json"


def library_name(fmt: str) -> str:
    """The weights file ``save_pretrained`` writes in ``fmt``: ``model.safetensors``, ``pytorch_model.bin``."""
    return SAFETENSORS_NAME if fmt == "safetensors" else PT_NAME


def group_by_size(infos: list[TensorInfo], max_size: int) -> list[list[str]]:
    """Shards in checkpoint order, as transformers fills them: a new shard when the next tensor would pass
    ``max_size``; a tensor larger than that gets a shard of its own. Tied names stay in one shard."""
    from ..ties import storage_groups, unique_counts

    with_tie: dict[str, list[TensorInfo]] = {}
    for g in storage_groups(infos):
        for t in g:
            with_tie[t.name] = g
    shards: list[list[str]] = []
    size, placed = 0, set()
    for info in infos:
        if info.name in placed:
            continue
        members = with_tie.get(info.name, [info])
        nbytes = unique_counts(members)[1]
        if not shards or (size + nbytes > max_size and size > 0):
            shards.append([])
            size = 0
        shards[-1].extend(t.name for t in members)
        placed.update(t.name for t in members)
        size += nbytes
    return shards


# --- config ties -------------------------------------------------------------------------------------

# (output name, input name): the pairs transformers ties when the config says tie_word_embeddings
# (its ``_tied_weights_keys``), the first match per output name. docs/reference.md lists the architectures covered.
TIED_PAIRS = [
    ("lm_head.weight", "transformer.wte.weight"),  # GPT-2, GPT-J, GPT-Neo, CodeGen
    ("lm_head.weight", "model.embed_tokens.weight"),  # Llama, Mistral, Qwen2, Gemma, Phi, Phi-3, ...
    ("lm_head.weight", "model.shared.weight"),  # BART, mBART, Pegasus
    ("lm_head.weight", "model.decoder.embed_tokens.weight"),  # OPT, BART/mBART/Pegasus for causal LM
    ("lm_head.weight", "shared.weight"),  # T5, mT5, UMT5
    ("lm_head.weight", "transformer.word_embeddings.weight"),  # BLOOM, Falcon
    ("lm_head.weight", "gpt_neox.embed_in.weight"),  # GPT-NeoX, Pythia (transformers 5 naming)
    ("embed_out.weight", "gpt_neox.embed_in.weight"),  # GPT-NeoX, Pythia (transformers 4 naming)
    ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),  # BERT
    ("cls.predictions.decoder.bias", "cls.predictions.bias"),
    ("lm_head.decoder.weight", "roberta.embeddings.word_embeddings.weight"),  # RoBERTa, XLM-RoBERTa
    ("lm_head.decoder.bias", "lm_head.bias"),
    ("predictions.decoder.weight", "albert.embeddings.word_embeddings.weight"),  # ALBERT
    ("predictions.decoder.bias", "predictions.bias"),
    ("vocab_projector.weight", "distilbert.embeddings.word_embeddings.weight"),  # DistilBERT
    ("generator_lm_head.weight", "electra.embeddings.word_embeddings.weight"),  # ELECTRA
    # encoder-decoder models whose two stacks share the one embedding
    ("encoder.embed_tokens.weight", "shared.weight"),  # T5, mT5, UMT5
    ("decoder.embed_tokens.weight", "shared.weight"),
    ("model.encoder.embed_tokens.weight", "model.shared.weight"),  # BART, mBART, Pegasus
    ("model.decoder.embed_tokens.weight", "model.shared.weight"),
]
FORCED_TIE = {"t5", "mt5", "umt5"}  # transformers 5 ties these whatever tie_word_embeddings says


@dataclass
class ConfigTies:
    """What ``config.json`` says is tied: names it restores (absent from the weights), and stored pairs that
    must be equal."""

    absent: dict[str, str] = field(default_factory=dict)  # output name -> stored input name
    stored: list[tuple[str, str]] = field(default_factory=list)  # (output, input), both stored separately
    warnings: list[str] = field(default_factory=list)


def read_config(directory: str) -> tuple[dict | None, str | None]:
    """config.json beside the weights, or None; and a warning when it is there but unreadable."""
    path = os.path.join(directory, "config.json")
    if not blob.isfile(path):
        return None, None
    from .dcp import resolve_inside

    resolve_inside(directory, "config.json", "config.json", file_link_ok=True)  # a link out is not read
    try:
        config = json.loads(blob.read_bytes(path, MAX_CONFIG))
    except (OSError, ValueError, RecursionError) as e:  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
        return None, f"{path}: not readable as JSON ({e}): the ties it may declare are not known"
    if not isinstance(config, dict):
        return None, f"{path}: not a JSON object: the ties it may declare are not known"
    return config, None


def _declares_tie(config: dict) -> bool:
    """transformers' rule: ``tie_word_embeddings`` (its default is True unless the config class says
    otherwise, and config.json written by save_pretrained states it)."""
    if str(config.get("model_type", "")) in FORCED_TIE:
        return True
    return bool(config.get("tie_word_embeddings", True))


EMBEDDING_WIDTH_KEYS = ("hidden_size", "n_embd", "n_embed", "d_model", "dim", "embedding_size", "word_embed_proj_dim")


def _fits_embedding(config: dict, shape: tuple[int, ...]) -> bool:
    """Whether ``shape`` is ``[vocab_size, width]`` for a width the config names (the hidden size, or an
    embedding size of its own: ALBERT's ``embedding_size``, OPT's ``word_embed_proj_dim``)."""
    vocab = config.get("vocab_size")
    widths = {config[k] for k in EMBEDDING_WIDTH_KEYS if isinstance(config.get(k), int)}
    if not isinstance(vocab, int) or not widths:
        return True  # nothing to check against
    return len(shape) == 2 and shape[0] == vocab and shape[1] in widths


def config_ties(config: dict | None, infos: list[TensorInfo]) -> ConfigTies:
    """Match the config's tie declaration against the stored names and shapes; never guess."""
    out = ConfigTies()
    if not config or not _declares_tie(config):
        return out
    by_name = {t.name: t for t in infos}
    done: set[str] = set()
    for output, source in TIED_PAIRS:
        src = by_name.get(source)
        if src is None or output in done:
            continue
        if source.endswith(".weight") and not _fits_embedding(config, src.shape):
            out.warnings.append(f"config.json ties '{output}' to '{source}', but '{source}' is {list(src.shape)}, "
                                f"not [vocab_size ({config.get('vocab_size')}), hidden size]: no tie assumed")
            continue
        done.add(output)
        if output not in by_name:
            out.absent[output] = source
        elif by_name[output].storage != src.storage:
            if by_name[output].shape == src.shape and by_name[output].dtype == src.dtype:
                out.stored.append((output, source))
            else:
                out.warnings.append(f"config.json ties '{output}' to '{source}', but they are stored with different "
                                    "shapes or dtypes")
    if not done and config.get("tie_word_embeddings"):
        kind = config.get("model_type", "unknown")
        out.warnings.append(f"config.json declares tie_word_embeddings for model_type '{kind}', but no input/output "
                            "embedding pair paramtool knows is in the weights: no tie assumed")
    return out


def _vocab_size(config: dict) -> int | None:
    """``vocab_size`` at the top level, or (a multimodal model) in ``text_config``."""
    for holder in (config, config.get("text_config")):
        if isinstance(holder, dict) and isinstance(holder.get("vocab_size"), int):
            return holder["vocab_size"]
    return None


def _is_vocab_tensor(config: dict, info: TensorInfo) -> bool:
    """A tensor with one row per token: dim 0 is ``vocab_size`` and it is a known embedding or head, or
    ``[vocab_size, width]`` for a width the config names."""
    vocab = _vocab_size(config)
    if vocab is None or not info.shape or info.shape[0] != vocab:
        return False
    known = any(info.name in pair for pair in TIED_PAIRS)
    widths = {config[k] for k in EMBEDDING_WIDTH_KEYS if isinstance(config.get(k), int)}
    return known or (len(info.shape) == 2 and info.shape[1] in widths)


def vocab_partners(config: dict | None, infos: list[TensorInfo], name: str) -> list[str]:
    """The stored names that change size with ``name`` when it is resized: the other side of each known
    input/output embedding pair (``TIED_PAIRS``) with the same number of rows, tied or not. As transformers'
    ``resize_token_embeddings`` resizes the input and the output embeddings together, so does ``resize``:
    an untied ``lm_head.weight`` (``tie_word_embeddings: false``) is resized with ``model.embed_tokens.weight``."""
    by_name = {t.name: t for t in infos}
    info = by_name.get(name)
    if not config or info is None or not _is_vocab_tensor(config, info):
        return []
    out: list[str] = []
    for output, source in TIED_PAIRS:
        other = source if output == name else output if source == name else None
        if other in by_name and other not in out and by_name[other].shape[:1] == info.shape[:1]:
            out.append(other)
    return out


def config_with_vocab(config: dict | None, infos: list[TensorInfo], name: str, rows: int) -> bytes | None:
    """config.json with ``vocab_size`` (top level and ``text_config``) set to ``rows`` when ``name`` is a
    vocabulary tensor (see ``_is_vocab_tensor``) whose rows change; None when nothing changes. Written as
    transformers writes it (2-space indent, a final newline), keys in their order."""
    info = next((t for t in infos if t.name == name), None)
    if not config or info is None or not _is_vocab_tensor(config, info) or info.shape[0] == rows:
        return None
    import copy

    new = copy.deepcopy(config)
    for holder in (new, new.get("text_config")):
        if isinstance(holder, dict) and holder.get("vocab_size") == info.shape[0]:
            holder["vocab_size"] = rows
    return (json.dumps(new, indent=2) + "\n").encode("utf-8")


def config_with_dtype(config: dict | None, dtype: str) -> bytes | None:
    """config.json with its dtype (``torch_dtype``, transformers' ``dtype``; top level and ``text_config``) set
    to ``dtype`` after a cast, so ``from_pretrained`` loads the model as cast; ``torch_dtype`` is added when the
    config names none. None when nothing changes. Written as transformers writes it."""
    if not isinstance(config, dict):
        return None
    import copy

    new = copy.deepcopy(config)
    holders = [h for h in (new, new.get("text_config")) if isinstance(h, dict)]
    named = [(h, k) for h in holders for k in ("torch_dtype", "dtype") if k in h]
    for holder, k in named or [(new, "torch_dtype")]:
        holder[k] = dtype
    return None if new == config else (json.dumps(new, indent=2) + "\n").encode("utf-8")


def with_config_ties(infos: list[TensorInfo], ties: ConfigTies) -> list[TensorInfo]:
    """``infos`` plus a stand-in for each absent tied name, sharing its input embedding's storage (so tie
    grouping, ``tied_to`` and the counts treat it as tied and count it once)."""
    by_name = {t.name: t for t in infos}
    extra = [replace(by_name[src], name=name, path=()) for name, src in ties.absent.items()]
    return infos + extra


def annotate(toc: Any, directory: str, single_file: bool) -> Any:
    """A model directory's table of contents: format ``directory`` (one weights file), and the ties its
    config.json declares added as stand-ins marked not stored."""
    config, problem = read_config(directory)
    ties = config_ties(config, toc.tensors)
    return replace(toc, format="directory" if single_file else toc.format,
                   tensors=with_config_ties(toc.tensors, ties), config_ties=dict(ties.absent),
                   config_pairs=list(ties.stored), warnings=toc.warnings + ([problem] if problem else []) + ties.warnings)


def differing_pairs(tensor_of: Any, pairs: list[tuple[str, str]]) -> list[str]:
    """Warnings for pairs config.json ties but whose stored values differ: a head that drifted from the
    embedding, which transformers then loads untied although the config says otherwise."""
    import torch

    out = []
    for output, source in pairs:
        a, b = tensor_of(output), tensor_of(source)
        if not torch.equal(a, b):
            out.append(f"config.json ties '{output}' to '{source}', but their stored values differ "
                       f"(max |diff| {float((a.double() - b.double()).abs().max()):.4g}): transformers will not tie "
                       "them; make them equal, or set tie_word_embeddings to false")
    return out


# --- writing a directory -----------------------------------------------------------------------------


def weights_format(src: Any) -> str:
    """The format a source's weights are in: a file's own, or a sharded checkpoint's shards'."""
    if src.kind == "sharded":
        from . import sniff_file
        from .sharded import read_index

        index = read_index(src.path)
        return "safetensors" if sniff_file(os.path.join(index.directory, index.shards[0])).name == "safetensors" else "pt"
    return "safetensors" if src.format == "safetensors" else "pt"


def _shard_metadata(ckpt: Checkpoint) -> dict[str, str]:
    """The source's own metadata, without the tie entries that name its tensors (each shard records its own)."""
    from .safetensors_fmt import TIES_KEY

    return {k: v for k, v in (ckpt.metadata or {}).items()
            if k != TIES_KEY and k not in ckpt.names and v not in ckpt.names}


def write_shards(ckpt: Checkpoint, groups: list[list[str]], fmt: str, work: str, index_metadata: dict) -> None:
    """One file per group in the library's naming, and (for more than one) its index with ``total_size``."""
    from ..ties import unique_counts
    from . import pt, safetensors_fmt

    files = shard_names(fmt, len(groups))
    infos = {i.name: i for i in ckpt.infos()}
    weight_map: dict[str, str] = {}
    total = 0
    metadata = _shard_metadata(ckpt)
    for file, group in zip(files, groups):
        tensors = {n: ckpt.tensor(n) for n in group}
        path = os.path.join(work, file)
        if fmt == "safetensors":
            safetensors_fmt.save(tensors, metadata, path)
        else:
            pt.save(tensors, path)
        weight_map.update((n, file) for n in group)
        total += unique_counts([infos[n] for n in group])[1]
    if len(groups) > 1:
        index = {"metadata": {**index_metadata, "total_size": total}, "weight_map": weight_map}
        with open(os.path.join(work, index_name(fmt)), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")


def write_shards_like(src: Any, ckpt: Checkpoint, listing: Checkpoint, max_size: int | None, fmt: str, work: str) -> None:
    """``ckpt`` (``src`` with a plan carried out) as the library's shards: filled up to ``max_size``, or grouped
    as ``listing``'s shards are; the index keeps a sharded source's metadata."""
    index_metadata = dict(listing.index.metadata) if src.kind == "sharded" else {}
    write_shards(ckpt, _groups(ckpt, listing, max_size), fmt, work, index_metadata)


def weights_name(src: Any, fmt: str) -> str:
    """The name of a model directory's one weights file written in ``fmt``: the source's own name, unless the
    format changes (then the library's)."""
    return os.path.basename(src.path) if weights_format(src) == fmt else shard_names(fmt, 1)[0]


def _groups(ckpt: Checkpoint, listing: Checkpoint, max_size: int | None) -> list[list[str]]:
    """Names by shard: filled up to ``max_size``, or as the source's shards group them (a name the source
    did not have, e.g. renamed, goes with the name before it)."""
    if max_size is not None:
        return group_by_size(ckpt.infos(), max_size)
    parts = list(getattr(listing, "parts", None) or [])
    shard_of = {name: path[0] for name, path in listing.names.items()} if parts else {}
    by_shard: dict[str, list[str]] = {}
    last = parts[0] if parts else ""
    for name in ckpt.names:
        last = shard_of.get(name, last)
        by_shard.setdefault(last, []).append(name)
    return [by_shard[s] for s in parts if s in by_shard] if parts else [list(ckpt.names)]


def plan_output(src: Any, out: str | None, in_place: bool, fmt: str | None,
                max_shard_size: str | None) -> tuple[str, str, int | None] | None:
    """When the output is a model directory: (path, weights format, max shard bytes); else None.

    A model directory's ``-o DIR`` is one, and so is any ``-o DIR`` with ``--max-shard-size``, and a sharded
    checkpoint's ``-o DIR`` that changes the format (shards of the same format are rewritten as they are)."""
    size = parse_size(max_shard_size) if max_shard_size is not None else None
    if size is not None and (src.kind == "dcp" or in_place):
        raise UsageError("--max-shard-size writes a new directory of shards: use -o DIR"
                         + (" (a torch.distributed checkpoint keeps its own layout)" if src.kind == "dcp" else ""))
    if in_place or out in (None, "-") or src.kind == "dcp":
        if size is not None:
            raise UsageError("--max-shard-size writes a directory: give -o DIR")
        return None
    # a new name without an extension is a directory; an existing file, device or FIFO (/dev/null) is written into
    dir_like = os.path.isdir(out) or (not os.path.splitext(out)[1] and not os.path.exists(out))
    if size is not None and not dir_like:
        raise UsageError(f"--max-shard-size writes a directory of shards, and '{out}' names a file: give -o DIR")
    if src.directory and os.path.isdir(out) and os.path.samefile(out, src.directory):
        raise UsageError(f"-o names the source directory {out}: use --in-place to rewrite its weights")
    if not dir_like:
        return None
    wanted = fmt or (weights_format(src) if src.kind in ("file", "sharded") else "pt")
    if src.kind == "sharded" and size is None and wanted == weights_format(src):
        return None  # shard by shard, as they are
    if src.kind == "file" and size is None and not src.directory:
        return None  # a file stays a file, whatever -o is called
    if os.path.isdir(out) and os.listdir(out):
        raise UsageError(f"{out} is a directory that is not empty: choose a new one, or use --in-place")
    return out, wanted, size


def note_config_ties(report: Any, toc: Any) -> None:
    """Add to an edit's report what config.json ties: a name that is not stored changes with its embedding;
    a head stored apart that changes alone will not survive loading, which ties it to the embedding again."""
    absent: dict[str, list[str]] = {}
    for name, stored in toc.config_ties.items():
        absent.setdefault(stored, []).append(name)
    changed = report.changed + report.zeroed
    for name in changed:
        for other in absent.get(name, []):
            report.with_ties.setdefault(name, [])
            if other not in report.with_ties[name]:
                report.with_ties[name].append(other)
    for output, source in toc.config_pairs:
        if (output in changed) != (source in changed):
            report.warnings.append(f"config.json ties '{output}' to '{source}', which are stored apart, and only "
                                   f"'{output if output in changed else source}' changes: once they differ, "
                                   "transformers no longer ties them")


def mark_config(groups: list, config_ties: dict[str, str]) -> list:
    """Tie groups holding a name config.json ties (and the file does not store) say so: ``"source": "config"``."""
    return [replace(g, source="config") if any(n in config_ties for n in g.names) else g for g in groups]

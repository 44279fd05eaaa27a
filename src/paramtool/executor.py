"""Carrying out a plan (``plan.Plan``) and writing the result where the command's OUTPUT says: the one entry point
of every command that writes (``init``, ``set``, ``convert``, ``rename``, ``drop``, ``resize``, ``merge``,
``lora merge``).

``execute`` chooses the strategy from the output's format and the plan's data, never from the command:

- a model directory (``write_directory``): the weights written by the strategies below, laid out as the library
  does, its sidecars copied (config.json written anew where the plan changes it);
- a sharded checkpoint (``_write_sharded``): each shard the plan touches written by the strategies below (in its
  own format), the others kept (in place) or copied, the index following the names;
- one file or a DCP directory (``_write_one``), the first that applies of:
  a patched copy (``writer.write_patched``: same byte-range format, value edits: only the storages edited are
  rewritten), a streamed rewrite (``surgery_stream.write`` for a structural change, ``convert_stream`` for a
  conversion: one storage at a time), or an in-memory rewrite (load, ``plan.apply``, ``writer.write_checkpoint``
  / ``writer.write_dcp``).

Every strategy commits its output atomically through ``commit``.
"""
from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Callable
from typing import Any

from . import commit, convert_stream, formats, fsops, surgery_stream, writer
from .checkpoint import Checkpoint
from .errors import ParamtoolError
from .formats import modeldir
from .formats.sharded import write_index
from .plan import Plan, apply
from .records import replace
from .sources import Source, load, open_listing, sniff_file
from .commit import Output


def execute(src: Source, listing: Checkpoint, plan: Plan, output: Output, drop_extra: bool = False) -> None:
    """Carry out ``plan`` (made on ``listing``, what ``src`` lists) and write the result as ``output`` says.

    A model directory whose sidecars change (config.json's vocab_size, its dtype) is rewritten in place as a
    whole directory, in one atomic step, so that the weights and config.json never disagree."""
    if output.layout.sidecars:
        write_directory(src, listing, plan, output, drop_extra)
    elif output.in_place and plan.sidecars and src.directory:  # weights and config.json change together
        whole = Output(src.directory, formats.DIRECTORY.name, True, modeldir.weights_format(src))
        write_directory(src, listing, plan, whole, drop_extra)
    elif output.layout.split:
        _write_sharded(src, listing, plan, output, drop_extra)
    else:
        _write_one(src, listing, replace(plan, sidecars={}), output, drop_extra)  # (no config.json goes with it)


def _write_one(src: Source, listing: Checkpoint, plan: Plan, output: Output, drop_extra: bool) -> Checkpoint:
    """Write the plan's result into one file (or stdout) or a DCP directory; returns what was written (its
    names). A result without tensors (a shard a drop empties) is not written."""
    narrow = plan.narrow and listing.key is not None
    if not output.layout.placeholder_values and plan.restructure is None:  # value edits, or a conversion
        same_format = src.layout is not None and src.layout.can_patch(output.layout)
        whole = not narrow and not (drop_extra and output.layout.holds_non_tensors)  # else the container is cut down
        if src.is_file and same_format and listing.byte_ranges and not plan.untie and whole:
            _patch(listing, plan, output)
            return listing
        if not plan.changes_values() and src.layout is not None and \
                convert_stream.convert_streamed(src, listing, output, drop_extra, narrow):
            return listing
    elif not output.layout.placeholder_values and (src.is_file or getattr(listing, "parts", None)) and \
            surgery_stream.can_stream(listing, plan, output.layout):  # a file, or shards into one file
        return surgery_stream.write(listing, plan, output)
    ckpt = listing if listing.layout.in_memory else load(src, listing.key)
    apply(plan, ckpt)
    if output.layout.placeholder_values:  # DCP
        writer.write_dcp(ckpt, output, plan.narrow)
    elif ckpt.names:
        writer.write_checkpoint(ckpt, output, drop_extra, narrow)
    return ckpt


def _patch(listing: Checkpoint, plan: Plan, output: Output) -> None:
    """A same-format copy of the file with the storages the plan edits rewritten (``writer.write_patched``)."""
    from .formats.storage import open_storage_file

    storage_file = open_storage_file(listing)
    try:
        writer.write_patched(storage_file, listing, plan, output)
    finally:
        storage_file.close()


def _write_sharded(src: Source, listing: Checkpoint, plan: Plan, output: Output, drop_extra: bool) -> None:
    """Each shard the plan touches is rewritten in its own format (``_write_one``: patched, streamed or loaded);
    the others are kept (in place) or copied. The index goes along, following a structural change (names
    renamed, a shard left with no tensor gone, total size recounted). Either way the new files become the
    checkpoint in one atomic step: the index (``--in-place``: ``commit.commit_index``, after finishing a commit a killed
    write left), or the whole directory (``-o DIR``, appearing only once complete)."""
    from concurrent.futures import ThreadPoolExecutor

    if output.in_place and commit.recover(listing.index.directory):
        listing = open_listing(src, listing.key)  # the shards have their own names back: list them again
    index = listing.index
    results: dict[str, Checkpoint] = {}  # shard -> what it holds now (its names)
    started: list[str] = []  # in place: the new shards' temporary names, as each write begins
    # (value edits keep a shard's container whole; a structural change drops what a shard cannot hold)
    shard_drop_extra = drop_extra if plan.restructure is not None else False

    names_in: dict[str, set[str]] = {shard: set() for shard in listing.parts}  # as the index places them
    for name, path in listing.names.items():
        names_in[path[0]].add(name)

    def one(shard: str, work: str) -> str | None:
        """Write ``shard`` into ``work``; in place, under a temporary name, which is returned."""
        part, path = listing.parts[shard], os.path.join(index.directory, shard)
        results[shard] = part
        if plan.touches(names_in[shard]):
            def write(target: str, fmt: str) -> None:
                shard_src = Source(path, "file", path, sniff_file(path))
                sub = plan.within(names_in[shard])
                results[shard] = _write_one(shard_src, part, sub, Output(target, fmt, output.in_place,
                                                                         temporary=output.in_place), shard_drop_extra)

            target = _write_shard(index, shard, work, output.in_place, started, write)
            return target if output.in_place and results[shard].names else None
        if not output.in_place:
            os.makedirs(os.path.dirname(os.path.join(work, shard)), exist_ok=True)
            _copy_file(path, os.path.join(work, shard))
        return None

    def build(work: str) -> dict[str, str]:
        import torch  # noqa: F401 - imported once here: two threads importing it at once can see it half-made

        # shards are independent; a structural change's per-shard warnings (cast overflows) keep their order
        workers = fsops.shard_workers() if plan.restructure is None else 1
        with ThreadPoolExecutor(max_workers=workers) as pool:
            jobs = {shard: pool.submit(one, shard, work) for shard in listing.parts}
            written = {shard: job.result() for shard, job in jobs.items()}
        if work != index.directory:
            raw = new_index()
            write_index(index if raw is None else replace(index, weight_map=raw["weight_map"], raw=raw), work)
            _copy_shard_sidecars(src, listing, work, plan.sidecars)
        return {shard: tmp for shard, tmp in written.items() if tmp is not None}

    def new_index() -> dict | None:
        """The index document of what ``build`` wrote after a structural change (None: the index as it is):
        names renamed, in the index's own order; shards left empty gone; total_size recounted."""
        if plan.restructure is None:
            return None
        shard_of = {n: s for s, r in results.items() for n in r.names}
        order = [plan.rename.get(n, n) for n in index.weight_map] + list(shard_of)  # the index's own order
        raw = {**index.raw, "weight_map": {n: shard_of[n] for n in dict.fromkeys(order) if n in shard_of}}
        if isinstance(raw.get("metadata"), dict):  # what transformers records: recounted, tied storage once
            from .ties import unique_counts

            counts = [unique_counts(r.infos()) for r in results.values()]
            recount = {"total_parameters": sum(c[0] for c in counts), "total_size": sum(c[1] for c in counts)}
            raw["metadata"] = {**raw["metadata"], **{k: v for k, v in recount.items() if k in raw["metadata"]}}
        return raw

    if output.in_place:
        commit.commit_in_place(index, build, started, new_index)
    else:
        commit.commit_directory(output.path, build)


def _copy_file(path: str, target: str) -> None:
    """Copy the file ``path`` (a local file, or a remote object: ``blob.copy_to``) to the local ``target``."""
    from .blob import copy_to, is_remote

    if is_remote(path):
        from .remote import kept

        if not kept(path, target):  # (a shard an in-place rewrite of its bucket prefix keeps is not downloaded)
            copy_to(path, target)
    else:
        shutil.copyfile(path, target)


def _write_shard(index: Any, shard: str, work: str, in_place: bool, started: list[str],
                 write: Callable[[str, str], Any]) -> str:
    """Rewrite one shard of a sharded checkpoint with ``write(target, fmt)`` (in the shard's own format) and
    return the target: ``work/shard`` for a new directory, or, in place, a temporary name beside the shard
    (registered, and listed in ``started`` for cleanup) that ``commit.commit_index`` makes the shard. Errors name
    the shard, not its temporary."""
    path, target = os.path.join(index.directory, shard), os.path.join(work, shard)
    if in_place:
        target = fsops.temp_name(os.path.dirname(path), os.path.basename(shard))
        fsops.register(target)
        started.append(target)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        fmt = formats.sniff_file(path)
        write(target, (fmt if fmt.single_file else formats.PT).name)
    except ParamtoolError as e:
        raise ParamtoolError(str(e).replace(target, path)) from None
    if in_place and os.path.exists(target):
        fsops.copy_owner_and_mode(target, os.stat(path))
    return target


def _copy_shard_sidecars(src: Source, listing: Checkpoint, work: str, replaced: dict[str, bytes] | None = None) -> None:
    """A sharded model directory written to a new directory: config.json, tokenizer files, ... go along
    (``replaced``: sidecars written with new contents, e.g. a config.json whose vocab_size changed)."""
    if src.directory:
        shards = [os.path.join(listing.index.directory, s) for s in listing.parts]
        modeldir.copy_sidecars(src.directory, modeldir.weight_files(src.directory, shards), work, replaced)


def write_directory(src: Source, listing: Checkpoint, plan: Plan, output: Output, drop_extra: bool) -> None:
    """Write ``src`` with ``plan`` carried out as a model directory at ``output.path``: the weights in the
    library's layout (one file keeps its name unless the format changes; shards are named and indexed as
    transformers does), and every sidecar of the source directory copied byte for byte.

    The weights are written by ``_write_one`` (patched, streamed or loaded): the weights file, or for shards one
    whole file that is then split, so any plan works here."""
    fmt = output.weights_format

    def build(work: str) -> None:
        if src.is_file and output.max_shard_size is None:
            inner = Source(src.path, "file", src.path, src.format)
            target = os.path.join(work, modeldir.weights_name(src, fmt))
            _write_one(inner, listing, replace(plan, sidecars={}), Output(target, fmt), drop_extra)
        else:
            whole = os.path.join(work, ".whole" + os.path.splitext(modeldir.library_name(fmt))[1])
            _write_one(src, listing, replace(plan, sidecars={}), Output(whole, fmt), drop_extra)  # in one file, then split
            key = None if formats.by_name(fmt).flat else listing.key  # (a flat file has no --key)
            ckpt = load(Source(whole, "file", whole, sniff_file(whole)), key)
            extra = writer.non_tensor_entries(ckpt)
            if extra and not drop_extra:
                raise ParamtoolError(f"shards hold tensors only, not the non-tensor entries ({', '.join(extra[:6])}); "
                                     "pass --drop-extra to write the tensors only")
            modeldir.write_shards_like(src, ckpt, listing, output.max_shard_size, fmt, work)
            os.unlink(whole)
            writer.verify_written(ckpt, _written(work), None)
        if src.directory:
            parts = getattr(listing, "parts", None)
            weights = [os.path.join(listing.index.directory, s) for s in parts] if parts else [src.path]
            modeldir.copy_sidecars(src.directory, modeldir.weight_files(src.directory, weights), work,
                                   plan.sidecars)

    commit.commit_directory(output.path, build)


def _written(work: str) -> Source:
    """The model directory just written in ``work``, as a source to verify."""
    if glob.glob(os.path.join(glob.escape(work), "*.index.json")):
        return Source(work, "sharded", work)
    path = modeldir.find_weights(work)
    return Source(path, "file", path, sniff_file(path))

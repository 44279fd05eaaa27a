"""Carrying out a plan (``plan.Plan``) and writing the result where the command's OUTPUT says.

``execute`` is the one entry point of every command that writes; it chooses, from the formats' behaviour and
the plan's data, the strategy that writes it (see ``execute``), and every strategy commits its output
atomically (``commit``).
"""
from __future__ import annotations

import glob
import os
from typing import Any

from . import writer
from .errors import ParamtoolError
from .formats import modeldir
from .sources import Source, load, sniff_file


def write_directory(src: Any, listing: Any, plan: Any, output: Any, drop_extra: bool, write_plan: Any) -> None:
    """Write ``src`` with ``plan`` carried out as a model directory at ``output.path``: the weights in the
    library's layout (one file keeps its name unless the format changes; shards are named and indexed as
    transformers does), and every sidecar of the source directory copied byte for byte.

    ``write_plan(src, listing, plan, output, drop_extra)`` is the command's own writer (edits, renames, casts):
    it writes the weights file, or for shards one whole file that is then split, so any plan works here."""
    fmt = output.weights_format

    def build(work: str) -> None:
        if src.kind == "file" and output.max_shard_size is None:
            inner = Source(src.path, "file", src.path, src.format)
            target = os.path.join(work, modeldir.weights_name(src, fmt))
            write_plan(inner, listing, plan, writer.Output(target, fmt), drop_extra)
        else:
            whole = os.path.join(work, ".whole" + os.path.splitext(modeldir.library_name(fmt))[1])
            write_plan(src, listing, plan, writer.Output(whole, fmt), drop_extra)  # carried out in one file, then split
            ckpt = load(Source(whole, "file", whole, sniff_file(whole)), listing.key if fmt == "pt" else None)
            extra = writer.non_tensor_entries(ckpt)
            if extra and not drop_extra:
                raise ParamtoolError(f"shards hold tensors only, not the non-tensor entries ({', '.join(extra[:6])}); "
                                     "pass --drop-extra to write the tensors only")
            index_metadata = dict(listing.index.metadata) if src.kind == "sharded" else {}
            modeldir.write_shards_like(ckpt, listing, output.max_shard_size, fmt, work, index_metadata)
            os.unlink(whole)
            writer.verify_written(ckpt, _written(work), None)
        if src.directory:
            parts = getattr(listing, "parts", None)
            weights = [os.path.join(listing.index.directory, s) for s in parts] if parts else [src.path]
            modeldir.copy_sidecars(src.directory, modeldir.weight_files(src.directory, weights), work,
                                   getattr(plan, "sidecars", None))

    writer.commit_directory(output.path, build)


def _written(work: str) -> Source:
    """The model directory just written in ``work``, as a source to verify."""
    if glob.glob(os.path.join(glob.escape(work), "*.index.json")):
        return Source(work, "sharded", work)
    path = modeldir.find_weights(work)
    return Source(path, "file", path, sniff_file(path))

"""Where a command's output goes when it names a bucket: the format-aware side of writing to S3.

``remote.py`` (the medium) uploads files and commits prefixes; what a format must do for it lives here: a
rewrite in place of a DCP directory names its new data files apart from the old ones (``Format.name_files_apart``), and a
sharded or DCP source (``Layout.is_container``) is committed through its index as a prefix.
"""
from __future__ import annotations

from typing import Any

from . import remote
from .errors import UsageError


def _same_object(out: str | None, source: str | None) -> bool:
    return isinstance(out, str) and isinstance(source, str) and out.rstrip("/") == source.rstrip("/")


def stage(out: str | None, in_place: bool = False, src: Any = None) -> tuple[str | None, bool, Any]:
    """Where to write ``-o out`` (or ``--in-place``), whether that is still in place, and the commit to run once
    the write is complete (it returns the name to report): a write to a bucket (``-o s3://...``, or
    ``--in-place`` / ``-o`` naming an ``s3://`` source) is written to a local temporary path and uploaded by the
    commit (``remote.stage``); anything else is written where it is."""
    source = getattr(src, "path", None)
    if isinstance(source, str) and source.startswith("s3://") and (in_place or _same_object(out, source)
                                                                   or _same_object(out, src.text)):
        if in_place and out is not None and not (_same_object(out, source) or _same_object(out, src.text)):
            raise UsageError("give either -o PATH or --in-place, not both")
        layout = src.layout
        prefix = layout is not None and layout.is_container  # a sharded or DCP prefix (a model directory: its file)
        target = source if not source.endswith(".index.json") else source.rsplit("/", 1)[0] + "/"
        _name_data_files(layout)
        local, commit = remote.stage(target, replace=True, prefix=prefix)
        return local, False, commit
    if isinstance(out, str) and out.startswith("s3://"):
        local, commit = remote.stage(out)
        return local, in_place, commit
    return out, in_place, lambda label: label


def _name_data_files(layout: Any) -> None:
    """A prefix rewritten in place: its new part files under names the old ones have not, where its format says
    so (a DCP directory's data files, apart from those the old ``.metadata`` names); the usual names again once
    the rewrite is committed or the run's remote state forgotten (``remote.forget``)."""
    usual = layout.name_files_apart() if layout is not None else None
    if usual is not None and usual not in remote.FORGET_HOOKS:
        remote.FORGET_HOOKS.append(usual)

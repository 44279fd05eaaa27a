"""Where a command's output goes when it names a bucket: the format-aware side of writing to S3.

``remote.py`` (the medium) uploads files and commits prefixes; what a format must do for it lives here: a
rewrite in place of a DCP directory names its new data files apart from the old ones (``Format.name_files_apart``), and a
sharded or DCP source (``Layout.is_container``) is committed through its index as a prefix.
"""
from __future__ import annotations

from typing import Any, Callable

from .errors import UsageError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from .sources import Source


def _same_object(out: str | None, source: str | None) -> bool:
    return isinstance(out, str) and isinstance(source, str) and out.rstrip("/") == source.rstrip("/")


def stage(out: str | None, in_place: bool = False, src: Source | None = None) -> tuple[str | None, bool, Any]:
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
        from . import remote  # (here, not at the top: every local write passes through stage, and remote imports
        # http.client, ssl and email, about 35 ms)

        local, commit = remote.stage(target, replace=True, prefix=prefix)
        return local, False, commit
    if isinstance(out, str) and out.startswith("s3://"):
        from . import remote

        single = src is None or not (src.directory or (src.layout is not None and src.layout.is_container))
        local, commit = remote.stage(out, name=_file_name(src) if single else None)
        return local, in_place, commit
    return out, in_place, lambda label: label


def _file_name(src: Source) -> Callable[[str], str]:
    """The name a single file written to ``-o s3://bucket/prefix/`` takes under the prefix, given the file
    written: the source's file name (``aws s3 cp FILE s3://bucket/prefix/`` keeps it), with the extension of
    the format written when the source's names another (``model.pt`` converted to safetensors:
    ``model.safetensors``); ``model`` for a source that is no named file (stdin, ``nn:``, a factory)."""
    import os
    from urllib.parse import urlsplit

    is_file = src is not None and src.is_file and src.text != "-"
    base = os.path.basename(urlsplit(src.text).path if "://" in src.text else src.text) if is_file else ""
    base = base or "model"

    def name(written: str) -> str:
        from .formats import sniff_file

        fmt = sniff_file(written)
        if fmt.names_path(base) or not fmt.extensions:
            return base
        return os.path.splitext(base)[0] + fmt.extensions[0]

    return name


def _name_data_files(layout: Any) -> None:
    """A prefix rewritten in place: its new part files under names the old ones have not, where its format says
    so (a DCP directory's data files, apart from those the old ``.metadata`` names); the usual names again once
    the rewrite is committed or the run's remote state forgotten (``remote.forget``)."""
    from . import remote

    usual = layout.name_files_apart() if layout is not None else None
    if usual is not None and usual not in remote.FORGET_HOOKS:
        remote.FORGET_HOOKS.append(usual)

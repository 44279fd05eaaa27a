"""Sharded checkpoints: an index (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``) naming
which shard file holds each tensor. Read as one checkpoint; written back shard by shard, keeping the layout.
"""
from __future__ import annotations

import json
import os

from .. import blob
from ..errors import FormatError, ParamtoolError
from ..records import dataclass
from .base import Format


MAX_INDEX = 256 << 20


@dataclass(frozen=True)
class Index:
    path: str  # the index file
    directory: str
    metadata: dict
    weight_map: dict[str, str]  # tensor name -> shard file name (relative to directory)
    raw: dict  # the whole JSON document, kept for writing back

    @property
    def shards(self) -> list[str]:
        return list(dict.fromkeys(self.weight_map.values()))


def _indexes(directory: str) -> list[str]:
    """The ``*.index.json`` files in ``directory`` (not hidden ones, as a glob: a write's temporary files)."""
    return sorted(os.path.join(directory, f) for f in blob.listdir(directory)
                  if f.endswith(".index.json") and not f.startswith(".") and blob.isfile(os.path.join(directory, f)))


def has_index(directory: str) -> bool:
    return bool(_indexes(directory))


def find_index(path: str) -> str:
    """The index file of a sharded checkpoint given as a directory or as the index itself."""
    if not blob.isdir(path):
        if not blob.isfile(path):
            raise ParamtoolError(f"{path}: no such file")
        return path
    found = _indexes(path)
    if not found:
        raise FormatError(f"{path}: a directory without a *.index.json (nor a torch.distributed .metadata): "
                          "not a sharded checkpoint")
    if len(found) > 1:
        names = ", ".join(os.path.basename(f) for f in found)
        raise FormatError(f"{path}: several indexes ({names}); name the one to use")
    from .dcp import resolve_inside

    return resolve_inside(path, os.path.basename(found[0]), "index", file_link_ok=True)


def read_index(path: str) -> Index:
    index_path = find_index(path)
    try:
        raw = json.loads(blob.read_bytes(index_path, MAX_INDEX))
    except (OSError, ValueError, RecursionError) as e:  # (a JSONDecodeError, or a 5,000-digit number, is a ValueError)
        raise FormatError(f"{index_path}: not a valid index ({str(e)[:120]})") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FormatError(f"{index_path}: no weight_map of tensor names to shard files")
    directory = os.path.dirname(index_path if blob.is_remote(index_path) else os.path.abspath(index_path))
    from .dcp import resolve_inside

    if not isinstance(raw.get("metadata") or {}, dict):
        raise FormatError(f"{index_path}: its metadata is not a JSON object")
    for shard in dict.fromkeys(weight_map.values()):
        resolve_inside(directory, shard, "shard", file_link_ok=True)  # refuses a symlinked directory that leads out
        if not blob.is_remote(directory) and not os.path.isfile(os.path.join(directory, shard)):  # (remote: on open)
            raise FormatError(f"{index_path}: shard '{shard}' is missing")
    return Index(index_path, directory, raw.get("metadata") or {}, weight_map, raw)


def write_index(index: Index, directory: str) -> None:
    with open(os.path.join(directory, os.path.basename(index.path)), "w", encoding="utf-8") as f:
        json.dump(index.raw, f, indent=2, sort_keys=False)
        f.write("\n")


class ShardedFormat(Format):
    """A container over part files: an index and its shards, each read as the file it is."""

    def files_of(self, path: str) -> tuple[list[str], str]:
        """The shards, then the index, which it is read from."""
        index = read_index(path)
        return [os.path.join(index.directory, shard) for shard in index.shards] + [index.path], index.path

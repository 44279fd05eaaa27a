"""Tie detection: which names share memory.

Works on ``TensorInfo`` records, so the same code answers for a table of contents read from a header
(no tensor data) and for loaded tensors (storage data pointers).
"""
from __future__ import annotations

from collections.abc import Callable

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any, Hashable

from .names import people_key
from .records import dataclass
from .toc import TensorInfo, itemsize


@dataclass(frozen=True)
class TieGroup:
    names: tuple[str, ...]  # sorted by names.people_key: numbers as numbers
    kind: str  # "alias" | "overlap" | "slices"
    source: str  # "storage" | "metadata" | "values"

    def as_json(self) -> dict:
        return {"names": list(self.names), "kind": self.kind, "source": self.source}


def names_key(names: tuple[str, ...] | list[str]) -> tuple:
    """Order of names and of groups in ``ties`` output: numbers in names compare as numbers (``h.2`` < ``h.10``)."""
    return tuple(people_key(n) for n in names)


def group_order(group: TieGroup) -> tuple:
    """Sort key of a group: by its (sorted) names, so by its first name."""
    return names_key(group.names)


def _same_view(a: TensorInfo, b: TensorInfo) -> bool:
    return (a.offset, a.shape, a.stride, a.dtype) == (b.offset, b.shape, b.stride, b.dtype)


def _overlaps(a: TensorInfo, b: TensorInfo) -> bool:
    (a0, a1), (b0, b1) = a.byte_span(), b.byte_span()
    return a0 < b1 and b0 < a1


def _by_storage(tensors: list[TensorInfo]) -> dict[Hashable, list[TensorInfo]]:
    """The non-empty tensors of each storage, in checkpoint order (an empty tensor shares no bytes)."""
    by_storage: dict[Hashable, list[TensorInfo]] = {}
    for t in tensors:
        if t.numel > 0:
            by_storage.setdefault(t.storage, []).append(t)
    return by_storage


def storage_groups(tensors: list[TensorInfo]) -> list[list[TensorInfo]]:
    """Groups (in checkpoint order) of two or more tensors whose bytes overlap in one storage.

    Empty tensors never group: they share no bytes even when they share a storage object.
    """
    by_storage = _by_storage(tensors)
    groups: list[list[TensorInfo]] = []
    for members in by_storage.values():
        if len(members) < 2:
            continue
        # union-find over pairwise overlap; storages hold few views, so the quadratic pass is fine
        parent = list(range(len(members)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for i in range(len(members)):
            for j in range(i + 1, len(members)):
                if _overlaps(members[i], members[j]):
                    parent[find(j)] = find(i)
        clusters: dict[int, list[TensorInfo]] = {}
        for i, t in enumerate(members):
            clusters.setdefault(find(i), []).append(t)
        groups.extend(c for c in clusters.values() if len(c) > 1)
    order = {t.name: i for i, t in enumerate(tensors)}
    groups.sort(key=lambda g: order[g[0].name])
    return groups


def group_kind(group: list[TensorInfo]) -> str:
    first = group[0]
    return "alias" if all(_same_view(first, t) for t in group[1:]) else "overlap"


def find_ties(tensors: list[TensorInfo], meta_ties: dict[str, str] | None = None) -> list[TieGroup]:
    """Tie groups, names sorted, groups sorted by first name (the contract's JSON order), numbers as numbers.

    ``meta_ties`` (name -> stored name) marks ties that were restored from safetensors metadata.

    One group per storage that two or more non-empty tensors use, as torch groups them
    (``untyped_storage().data_ptr()``): "alias" when all are the same view, "overlap" when their bytes overlap
    into one cluster, and "slices" when some of them share the storage without sharing bytes (cuDNN's flat
    RNN weights: each a slice of one buffer).
    """
    meta = set(meta_ties or {})
    cluster = {t.name: i for i, g in enumerate(storage_groups(tensors)) for t in g}
    by_storage = _by_storage(tensors)
    out = []
    for g in by_storage.values():
        if len(g) < 2:
            continue
        one = len({cluster.get(t.name, -1 - i) for i, t in enumerate(g)}) == 1
        source = "metadata" if any(t.name in meta for t in g) else "storage"
        out.append(TieGroup(tuple(sorted((t.name for t in g), key=people_key)), group_kind(g) if one else "slices",
                            source))
    out.sort(key=group_order)
    return out


def tied_to(tensors: list[TensorInfo]) -> dict[str, str]:
    """name -> first name (in checkpoint order) of its tie group, for every tied name but the first."""
    out: dict[str, str] = {}
    for g in storage_groups(tensors):
        for t in g[1:]:
            out[t.name] = g[0].name
    return out


def unique_counts(tensors: list[TensorInfo]) -> tuple[int, int]:
    """(parameters, bytes) with every tied storage counted once: a group counts the union of its bytes."""
    grouped: set[str] = set()
    numel = nbytes = 0
    for g in storage_groups(tensors):
        spans = sorted(t.byte_span() for t in g)
        covered, end = 0, -1
        for s, e in spans:
            if e > end:
                covered += e - max(s, end)
                end = e
        nbytes += covered
        numel += covered // itemsize(g[0].dtype)
        grouped.update(t.name for t in g)
    for t in tensors:
        if t.name not in grouped:
            numel += t.numel
            nbytes += t.nbytes
    return numel, nbytes


def _raw(t: Any) -> Any:
    """A tensor's bytes as a flat uint8 tensor (a view where it is contiguous)."""
    import torch

    from .values import readable

    return readable(t, bits=True).detach().contiguous().reshape(-1).view(torch.uint8)


SAMPLE = 4096  # bytes per sample in value_ties' first filter
SAMPLING = 8  # tensors sampled at once (remote: a few small ranged reads each, their round trips overlapped)


def value_ties(tensor_of: Callable[[str], Any], infos: list[TensorInfo],
               raw_of: Callable[[str], Any] = lambda name: None,
               samples_of: Callable[[str, list[tuple[int, int]]], list[bytes] | None] = lambda name, spans: None,
               ) -> list[TieGroup]:
    """Distinct storages holding identical bytes (ties lost by an earlier conversion).

    Only tensors that share their shape and dtype with another are looked at, and in three steps, each
    on fewer tensors: a checksum of three 4 KiB samples (start, middle, end: a few pages, not the tensor),
    then for those whose samples match another's, a CRC-32 of all their bytes, two at a time with one read
    ahead (through ``tensor_of``), and only for those whose checksums match, a byte-for-byte comparison, so
    a collision can never make a false tie. Trained weights almost never share even a sample, so the
    command costs a few pages per tensor. One name per storage group is considered.

    The samples come from ``samples_of`` (``Checkpoint.raw_samples``: a remote reader fetches those bytes
    only), and the checksums from the bytes as they arrive (``numeric.streamed``: a large remote storage is
    checksummed part by part while the next parts are received).
    """
    from . import numeric
    from .numeric import bytes_equal
    from .pipeline import ordered_map

    tied = {t.name for g in storage_groups(infos) for t in g[1:]}
    by_kind: dict[tuple, list[TensorInfo]] = {}
    for info in infos:
        if info.name not in tied and info.numel > 0:
            by_kind.setdefault((info.shape, info.dtype), []).append(info)
    candidates = [info.name for members in by_kind.values() if len(members) > 1 for info in members]
    kind_of = {info.name: k for k, members in by_kind.items() for info in members}

    def data(name: str) -> Any:
        raw = raw_of(name)  # mapped bytes where the reader has them: no torch needed
        return raw if raw is not None else _raw(tensor_of(name)).numpy()

    nbytes = {info.name: info.nbytes for info in infos}

    def spans(n: int) -> list[tuple[int, int]]:
        return [(0, n)] if n <= 3 * SAMPLE else [(0, SAMPLE), (n // 2, SAMPLE), (n - SAMPLE, SAMPLE)]

    def crc_of(pieces: Any) -> int:
        crc = 0
        for piece in pieces:
            crc = numeric.crc32(piece, crc)
        return crc

    def sampled(name: str) -> int:
        got = samples_of(name, spans(nbytes[name]))
        if got is None:
            d = _raw(tensor_of(name)).numpy()
            got = [d[o:o + n] for o, n in spans(len(d))]
        return crc_of(got)

    def checksum(name: str) -> int:
        with numeric.streamed():
            raw = data(name)
        return crc_of(numeric.pieces(raw))

    by_sample: dict[tuple, list[str]] = {}
    for name, crc in zip(candidates, ordered_map(sampled, candidates, SAMPLING)):
        by_sample.setdefault((kind_of[name], crc), []).append(name)
    candidates = [n for names in by_sample.values() if len(names) > 1 for n in names]

    def same_bytes(x: str, y: str) -> bool:
        rx, ry = raw_of(x), raw_of(y)
        if rx is not None and ry is not None:
            return bytes_equal(rx, ry)
        import torch

        return torch.equal(_raw(tensor_of(x)), _raw(tensor_of(y)))

    by_hash: dict[tuple, list[str]] = {}
    for name, crc in zip(candidates, ordered_map(checksum, candidates)):
        by_hash.setdefault((kind_of[name], crc), []).append(name)
    out: list[TieGroup] = []
    for names in by_hash.values():
        while len(names) > 1:  # split by actual bytes: the first name and those equal to it, then the rest
            same = [names[0]] + [n for n in names[1:] if same_bytes(names[0], n)]
            if len(same) > 1:
                out.append(TieGroup(tuple(sorted(same, key=people_key)), "alias", "values"))
            names = [n for n in names if n not in same]
    out.sort(key=group_order)
    return out

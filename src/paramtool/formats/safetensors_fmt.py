"""safetensors: a JSON header, then raw bytes. The header alone is the table of contents.

Ties: safetensors cannot alias, so a writer keeps one copy and records each dropped name in the header
metadata (``"<dropped>": "<kept>"``, the convention of ``safetensors.torch.save_model``); a view that is
not a whole alias is recorded under ``paramtool.ties``. Reading restores both.

Order: the header is a JSON object, and its key order is the file's tensor order. paramtool writes the header
and the data in the source's order (``safetensors.torch.save_file`` would sort them) and lists a file in its
header's order (``safe_open().keys()`` sorts). Where a dropped tied name went in that order is recorded under
``paramtool.order`` (``{"<dropped>": position}``), so a pt -> safetensors -> pt round trip keeps every name in
place.
"""
from __future__ import annotations

import json

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any

    from ..checkpoint import Checkpoint
    from .storage import StorageFile

from ..errors import FormatError
from ..toc import FakeTensor, StorageRef, TensorInfo, contiguous_stride, itemsize, numel_of, numel_within
from .base import Format, flat_only
from .dtypes import SAFETENSORS

MAX_HEADER = 100 * 1024 * 1024
MAX_EXPANDED = 1 << 24  # elements a recorded view may have beyond its stored tensor's (an expanded tensor)
TIES_KEY = "paramtool.ties"
ORDER_KEY = "paramtool.order"

DTYPES = SAFETENSORS  # safetensors dtype codes -> torch dtype names
CODES = {name: code for code, name in DTYPES.items()}


class _Object(dict):
    """A JSON object that remembers a name it was given twice (``duplicate``)."""

    duplicate: str | None = None


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = _Object(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        out.duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
    return out


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 20:  # beyond 2^64: safetensors refuses it ("number out of range")
        raise FormatError(f"a {len(text)}-digit number")
    return int(text)


def parse_json(text: str | bytes, what: str) -> Any:
    """JSON as safetensors' reader (serde) takes it: an integer beyond 20 digits, too deep a nesting or a name
    given twice in one object (two tensors of one name: serde keeps one, Python's json the other) is refused;
    a name given twice inside ``__metadata__`` is the last one, as in both."""
    try:
        doc = json.loads(text, object_pairs_hook=_object, parse_int=_bounded_int)
    except FormatError as e:
        raise FormatError(f"{what} holds {e}: not a valid header") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # (JSONDecodeError is a ValueError)
        raise FormatError(f"{what} is not valid JSON ({type(e).__name__}: {str(e)[:120]})") from None
    duplicate = _duplicate(doc, top=True)
    if duplicate is not None:
        raise FormatError(f"{what} names '{duplicate}' twice: readers disagree on which one is meant")
    return doc


def _duplicate(doc: Any, top: bool) -> str | None:
    """A name given twice in ``doc``'s objects (iterative: the depth is bounded by the parser already)."""
    stack = [(doc, top)]
    while stack:
        node, is_top = stack.pop()
        if isinstance(node, dict):
            if getattr(node, "duplicate", None) is not None:
                return node.duplicate
            stack.extend((v, False) for k, v in node.items() if not (is_top and k == "__metadata__"))
        elif isinstance(node, list):
            stack.extend((v, False) for v in node)
    return None


def _count(value: Any) -> bool:
    """An integer safetensors reads as a ``usize``."""
    return type(value) is int and 0 <= value < 1 << 64


def sniff(head: bytes, file_size: int) -> bool:
    """A safetensors file starts with a little-endian u64 header length, then ``{``."""
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= file_size - 8 and head[8:9] == b"{"


def read_header(path: str) -> tuple[dict[str, Any], int]:
    """The parsed header and the offset where tensor data starts. Validates sizes and offsets."""
    from ..blob import open_blob

    with open_blob(path) as f:  # (a local file is pinned as it is opened: formats.pins)
        size = f.size
        raw = f.pread(0, 8)
        if len(raw) < 8:
            raise FormatError(f"{path}: not a safetensors file (only {len(raw)} bytes)")
        n = int.from_bytes(raw, "little")
        if n > MAX_HEADER:
            raise FormatError(f"{path}: safetensors header claims {n} bytes, above the {MAX_HEADER} byte limit")
        if n > size - 8:
            raise FormatError(f"{path}: safetensors header claims {n} bytes but the file has {size - 8} after the length")
        text = f.pread(8, n)
    header = parse_json(text, f"{path}: safetensors header")
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object")
    data_size = size - 8 - n

    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise FormatError(f"{path}: __metadata__ must map strings to strings")
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape, offsets = entry["shape"], entry["data_offsets"]
            start, end = offsets
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if not isinstance(shape, list) or not all(_count(v) for v in shape + [start, end]):
            raise FormatError(f"{path}: tensor {name!r} has a shape or offsets that are not counts (safetensors "
                              "takes only integers from 0 to 2^64-1)")
        if start <= end and end > data_size:
            need = max(_end(e) for k, e in header.items() if k != "__metadata__")
            raise FormatError(f"{path}: truncated: the header's tensors need {need} data bytes, the file holds "
                              f"{data_size} ({size} bytes in all: an interrupted download or copy?)")
        if not start <= end <= data_size:
            raise FormatError(f"{path}: tensor {name!r} has offsets [{start}, {end}) outside the {data_size} data bytes")
        numel = numel_within(shape, data_size)
        if numel is None or numel * itemsize(dtype) != end - start:
            shown = "more than the file holds" if numel is None else f"{numel * itemsize(dtype)} bytes"
            raise FormatError(f"{path}: tensor {name!r} is {dtype} {shape[:8]}{'…' * (len(shape) > 8)} ({shown}) "
                              f"but its offsets hold {end - start}")
        spans.append((start, end, name))
    spans.sort()
    for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise FormatError(f"{path}: tensors {n0!r} and {n1!r} overlap in the data section")
    # as safetensors reads a file: the tensors' bytes follow one another from the start of the data to its end
    ends = [0] + [e for _, e, _ in spans]
    gap = next(((s, n) for (s, _, n), prev in zip(spans, ends) if s != prev), None)
    if gap is not None:
        raise FormatError(f"{path}: bytes before tensor {gap[1]!r} belong to no tensor (safetensors refuses such a file)")
    if ends[-1] != data_size:
        raise FormatError(f"{path}: the last {data_size - ends[-1]} data bytes belong to no tensor "
                          "(safetensors refuses such a file)")
    return header, 8 + n


def _end(entry: Any) -> int:
    """A header entry's end offset (0 when malformed: the entry is reported on its own)."""
    try:
        return int(entry["data_offsets"][1])
    except (KeyError, TypeError, ValueError, IndexError, OverflowError):
        return 0


def split_metadata(metadata: dict[str, str], stored: set[str]) -> tuple[dict[str, str], dict[str, dict], dict[str, str]]:
    """Split header metadata into (aliases dropped->kept, views name->spec, everything else)."""
    aliases: dict[str, str] = {}
    views: dict[str, dict] = {}
    rest: dict[str, str] = {}
    for k, v in metadata.items():
        if k == ORDER_KEY:  # positions of dropped names: read by ``ordered_names``, rewritten by every save
            continue
        if k == TIES_KEY:
            try:
                parsed = parse_json(v, TIES_KEY)
            except FormatError:
                parsed = None
            if isinstance(parsed, dict):  # a name stored in the file is that tensor, as safetensors reads it
                views = {n: s for n, s in parsed.items()
                         if n not in stored and isinstance(s, dict) and s.get("of") in stored}
                continue
        if k not in stored and v in stored:
            aliases[k] = v
        else:
            rest[k] = v
    return aliases, views, rest


def ordered_names(stored: list[str], dropped: list[str], metadata: dict[str, str]) -> list[str]:
    """The file's tensor order: stored names in header order, each dropped (tied) name put back at the position
    ``paramtool.order`` records for it; dropped names without one (files from other writers, whose metadata
    order is random) go last, numbers as numbers."""
    from ..names import people_key

    try:
        positions = parse_json(metadata.get(ORDER_KEY, "{}"), ORDER_KEY)
    except FormatError:
        positions = {}
    if not isinstance(positions, dict):
        positions = {}
    wanted = set(dropped)
    placed = sorted((p, n) for n, p in positions.items() if n in wanted and type(p) is int and p >= 0)
    names = list(stored)
    for position, name in placed:  # ascending: every name before ``position`` is already in place
        names.insert(min(position, len(names)), name)
    done = {n for _, n in placed}
    names.extend(sorted((n for n in dropped if n not in done), key=people_key))
    return names


def read_tree(path: str) -> tuple[dict[str, FakeTensor], dict[str, str] | None, dict[str, str]]:
    """Tensors as ``FakeTensor`` (in the header's order), the metadata, and the ties it records.

    Each stored tensor is its own storage; names recorded as ties point into the storage they share.
    """
    header, _ = read_header(path)
    metadata = header.get("__metadata__") or {}
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    aliases, views, _ = split_metadata(metadata, set(entries))
    tensors: dict[str, FakeTensor] = {}
    for name, e in entries.items():
        shape = tuple(int(d) for d in e["shape"])
        numel = numel_of(shape)
        dtype = DTYPES[e["dtype"]]
        tensors[name] = FakeTensor(StorageRef(("st", name), dtype, numel), 0, shape, contiguous_stride(shape), dtype)
    meta_ties: dict[str, str] = {}
    for name, kept in aliases.items():
        tensors[name] = tensors[kept]
        meta_ties[name] = kept
    for name, spec in views.items():
        base = tensors[spec["of"]]
        offset, shape, stride = view_spec(path, name, spec, base.storage)
        tensors[name] = FakeTensor(base.storage, offset, shape, stride, base.dtype)
        meta_ties[name] = spec["of"]
    order = ordered_names(list(entries), [n for n in tensors if n not in entries], metadata)
    return {n: tensors[n] for n in order}, metadata or None, meta_ties


def view_spec(path: str, name: str, spec: dict, storage: StorageRef) -> tuple[int, tuple, tuple]:
    """A ``paramtool.ties`` entry's (offset, shape, stride), checked against the stored tensor it views as a
    pickled view is checked against its storage: integers, none negative, every element inside."""
    from .torchfile import check_view

    shape, stride, offset = spec.get("shape"), spec.get("stride"), spec.get("offset")
    if not (isinstance(shape, list) and isinstance(stride, list) and type(offset) is int
            and all(type(d) is int for d in shape + stride)):
        raise FormatError(f"{path}: {TIES_KEY} entry for {name!r} is malformed")
    try:
        check_view(storage, storage.dtype, offset, tuple(shape), tuple(stride))
    except FormatError as e:
        raise FormatError(f"{path}: {TIES_KEY} entry for {name!r} reaches outside '{spec['of']}': "
                          f"{str(e)[:200]}") from None
    if numel_within(shape, max(storage.numel, MAX_EXPANDED)) is None:  # a stride-0 view of a few bytes
        raise FormatError(f"{path}: {TIES_KEY} entry for {name!r} repeats '{spec['of']}' into more than "
                          f"{max(storage.numel, MAX_EXPANDED)} elements: not a tie paramtool wrote")
    return offset, tuple(shape), tuple(stride)


def load(path: str) -> tuple[dict[str, Any], dict[str, str] | None, dict[str, str]]:
    """Load tensors (memory-mapped by safetensors) and restore ties recorded in metadata."""
    from safetensors import safe_open

    header, _ = read_header(path)  # validate before handing the file to the Rust reader
    stored = [n for n in header if n != "__metadata__"]  # the header's order (safe_open's keys() sorts)
    tensors: dict[str, Any] = {}
    from ..fsops import guard_mappings

    guard_mappings()  # safe_open maps the file
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata()
            for name in stored:
                tensors[name] = f.get_tensor(name)
    except Exception as e:  # the Rust reader's errors are plain exceptions
        raise FormatError(f"{path}: cannot read safetensors data: {e}") from None
    aliases, views, _ = split_metadata(metadata or {}, set(tensors))
    for name, kept in aliases.items():
        tensors[name] = tensors[kept]
    for name, spec in views.items():
        base = tensors[spec["of"]]
        ref = StorageRef(("st", spec["of"]), str(base.dtype).removeprefix("torch."), base.numel())
        offset, shape, stride = view_spec(path, name, spec, ref)
        tensors[name] = base.as_strided(shape, stride, offset)
    ties = {**aliases, **{n: s["of"] for n, s in views.items()}}
    order = ordered_names(stored, [n for n in tensors if n not in stored], metadata or {})
    return {n: tensors[n] for n in order}, metadata, ties


def header_with_format(path: str) -> bytes | None:
    """The file's length-prefixed header with ``"format": "pt"`` added to its metadata, or None when the
    metadata already names a format. Tensor offsets are relative to the data, so the data bytes follow as they are."""
    header, _ = read_header(path)
    metadata = header.get("__metadata__") or {}
    if "format" in metadata:
        return None
    rest = {k: v for k, v in header.items() if k != "__metadata__"}
    text = json.dumps({"__metadata__": {**metadata, "format": "pt"}, **rest}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def layout(infos: list[TensorInfo], metadata: dict[str, str] | None) -> tuple[list[TensorInfo], dict[str, str]]:
    """What a safetensors file of ``infos`` (in their order) holds: (the tensors stored, in order; the header
    metadata). Each tie group stores its largest, earliest view once; the others are recorded as aliases or
    views, with their positions under ``paramtool.order``; ``"format": "pt"`` unless the source names one.
    Used by ``save`` (tensors in memory) and by the streamed writers (storages read one at a time)."""
    from ..ties import group_kind, storage_groups

    order = {t.name: i for i, t in enumerate(infos)}
    dropped: set[str] = set()
    aliases: dict[str, str] = {}
    views: dict[str, dict] = {}
    for group in storage_groups(infos):
        keep = max(group, key=lambda t: (t.numel, -order[t.name]))
        for t in group:
            if t.name == keep.name:
                continue
            dropped.add(t.name)
            if (t.offset, t.shape, t.stride) == (keep.offset, keep.shape, keep.stride) and group_kind([keep, t]) == "alias":
                aliases[t.name] = keep.name
            else:
                views[t.name] = {"of": keep.name, "offset": t.offset - keep.offset, "shape": list(t.shape),
                                 "stride": list(t.stride)}
    _, _, rest = split_metadata(dict(metadata or {}), set(order))
    meta = {**rest, **aliases}
    meta.setdefault("format", "pt")  # transformers refuses a file without it; a source's own value is kept
    if views:
        meta[TIES_KEY] = json.dumps(views, sort_keys=True)
    positions = {t.name: i for i, t in enumerate(infos) if t.name in dropped}
    if positions:
        meta[ORDER_KEY] = json.dumps(positions)
    return [t for t in infos if t.name not in dropped], meta


def header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None) -> bytes:
    """The length-prefixed header for ``(name, dtype, shape)`` stored in that order, data back to back."""
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise FormatError("safetensors metadata must map strings to strings")
    out: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    start = 0
    for name, dtype, shape in entries:
        if dtype not in CODES:
            raise FormatError(f"safetensors cannot hold '{name}': dtype {dtype} has no safetensors code")
        end = start + numel_of(shape) * itemsize(dtype)
        out[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [start, end]}
        start = end
    try:
        raw = json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:  # a name with a lone surrogate: escaped JSON is still valid
        raw = json.dumps(out, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # as safetensors pads: data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def save(tensors: dict[str, Any], metadata: dict[str, str] | None, path: str) -> None:
    """Write ``tensors`` to ``path`` in their order; tied names are stored once and recorded in the metadata."""
    from ..tree import tensor_info
    from ..values import storable

    tensors = {n: storable(t, n, "safetensors") for n, t in tensors.items()}
    stored, meta = layout([tensor_info(n, (n,), t) for n, t in tensors.items()], metadata)
    write_file({t.name: tensors[t.name] for t in stored}, meta or None, path)


def write_file(tensors: dict[str, Any], metadata: dict[str, str] | None, path: str) -> None:
    """A safetensors file with the header and the data in ``tensors``' order, one tensor in memory at a time.

    ``safetensors.torch.save_file`` sorts both (by dtype, then name) and builds the file in memory. The format
    asks only that the data be one run without holes, in any order; safetensors reads unaligned tensors.
    ``tensors`` are dense already (``save`` refuses, by name, any it cannot hold: ``values.storable``).
    """
    raw = header([(n, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in tensors.items()], metadata)
    with open(path, "wb") as f:
        f.write(raw)
        for t in tensors.values():
            f.write(_raw_bytes(t))


def _raw_bytes(t: Any) -> Any:
    """A tensor's bytes in memory order (little-endian, as safetensors stores them), zero-copy when contiguous."""
    import torch

    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else b""


class SafetensorsFormat(Format):
    """safetensors: the header is the table of contents; every stored tensor is its own storage."""

    def open_storages(self, listing: Checkpoint) -> StorageFile:
        from .remote_storage import storage_class
        from .storage import SafetensorsStorageFile

        header, data_start = read_header(listing.path)
        spans = {("st", name): (data_start + entry["data_offsets"][0],
                                entry["data_offsets"][1] - entry["data_offsets"][0], DTYPES[entry["dtype"]])
                 for name, entry in header.items() if name != "__metadata__"}
        return storage_class(SafetensorsStorageFile, listing.path).open(listing.path, listing.toc(), spans, data_start,
                                                                      header_with_format)

    def names_path(self, path: str) -> bool:
        return path.endswith(self.extensions)  # as written, ".safetensors"

    def sniff(self, head: bytes, size: int) -> bool:
        return sniff(head, size)

    def read_listing(self, label: str, path: str, key: str | None) -> Checkpoint:
        from ..checkpoint import Checkpoint

        flat_only(key)
        root, metadata, meta_ties = read_tree(path)
        return Checkpoint(label, self, root, {n: (n,) for n in root}, metadata, meta_ties, path)

    def load(self, label: str, path: str, key: str | None) -> Checkpoint:
        from ..checkpoint import Checkpoint

        flat_only(key)
        tensors, metadata, meta_ties = load(path)
        return Checkpoint(label, self, tensors, {n: (n,) for n in tensors}, metadata, meta_ties, path)

    def save(self, root: Any, metadata: dict[str, str] | None, path: str) -> None:
        save(root, metadata, path)

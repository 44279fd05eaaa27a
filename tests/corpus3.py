"""Crafted files of hostile-input round 3 (issue 22), built byte by byte: pickles written opcode by opcode,
zip archives record by record, safetensors headers as text. Nothing here unpickles anything.

Each builder returns the file's bytes; ``CASES`` names every file with what paramtool must do with it:
``"torch"`` (read it exactly as torch.load / safetensors.load_file does: same names, dtypes, values) or an
``error`` substring (one ``error:`` line). ``tests/test_round3.py`` runs them under a time and memory budget.
"""
from __future__ import annotations

import io
import json
import pickle
import struct
import warnings
import zipfile

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


# --- pickle opcodes ----------------------------------------------------------------------------------------


def text(s: str) -> bytes:
    """BINUNICODE."""
    b = s.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(b)) + b


def glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def num(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if -(1 << 31) <= n < 1 << 31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return (b"\x8a" + bytes([len(raw)]) if len(raw) < 256 else b"\x8b" + struct.pack("<I", len(raw))) + raw


def tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def tensor(key: bytes, numel: int, shape: tuple, stride: tuple, storage: str = "FloatStorage", offset: int = 0,
           view: bytes | None = None) -> bytes:
    """``torch._utils._rebuild_tensor_v2(storage, offset, shape, stride, False, OrderedDict())``; ``key`` is the
    pickled storage key (``text("0")`` or ``num(0)``); ``view``: a legacy storage's view metadata (pickled)."""
    pid = [text("storage"), glob("torch", storage), key, text("cpu"), num(numel)]
    if view is not None:
        pid.append(view)
    return (glob("torch._utils", "_rebuild_tensor_v2") + b"(" + tup(*pid) + b"Q" + num(offset)
            + tup(*map(num, shape)) + tup(*map(num, stride)) + b"\x89" + glob("collections", "OrderedDict")
            + b")R" + b"tR")


def state_dict(**entries: bytes) -> bytes:
    """A protocol-2 pickle of ``{name: value}`` in order."""
    return b"\x80\x02}(" + b"".join(text(k) + v for k, v in entries.items()) + b"u."


def floats(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


# --- containers ---------------------------------------------------------------------------------------------


def torch_zip(pkl: bytes, records: list[tuple[str, bytes]] | None = None, prefix: str = "archive",
              methods: dict[str, int] | None = None, first: list[tuple[str, bytes]] | None = None) -> bytes:
    """A torch zip: ``first`` records, ``data.pkl``, ``records`` (names under ``prefix``), then ``version``."""
    out = io.BytesIO()
    methods = methods or {}
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w") as z:
        warnings.simplefilter("ignore")  # zipfile warns of a duplicate name: that is the point of some files
        for name, data in (first or []) + [("data.pkl", pkl)] + (records or []) + [("version", b"3\n")]:
            info = zipfile.ZipInfo(f"{prefix}/{name}", date_time=(2026, 1, 1, 0, 0, 0))
            info.compress_type = methods.get(name, zipfile.ZIP_STORED)
            z.writestr(info, data)
    return out.getvalue()


def legacy(obj: bytes, keys: bytes, storages: list[bytes]) -> bytes:
    """The pre-zip format: magic, protocol, sys_info, the object pickle, the storage keys, then each storage as
    an 8-byte element count (of 4-byte elements here) and its bytes."""
    head = pickle.dumps(LEGACY_MAGIC, protocol=2) + pickle.dumps(1001, protocol=2)
    head += pickle.dumps({"protocol_version": 1001, "little_endian": True, "type_sizes": {}}, protocol=2)
    body = b"".join(struct.pack("<q", len(s) // 4) + s for s in storages)
    return head + obj + keys + body


def safetensors(header: str, data: bytes) -> bytes:
    raw = header.encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def st_entry(dtype: str, shape: list, start: int, end: int) -> str:
    return json.dumps({"dtype": dtype, "shape": shape, "data_offsets": [start, end]})


def st_ties(views: dict) -> str:
    return json.dumps({"__metadata__": {"format": "pt", "paramtool.ties": json.dumps(views)}})[1:-1]


# --- the corpus ----------------------------------------------------------------------------------------------


def _one(name: str = "w", key: bytes = text("0")) -> bytes:
    return state_dict(**{name: tensor(key, 2, (2,), (1,))})


def _case_records(variant: str) -> bytes:
    pkl = _one()
    good = [("byteorder", b"little"), ("data/0", floats(1, 2))]
    if variant == "data-case-dup":
        return torch_zip(pkl, good + [("DATA/0", floats(7, 7))])
    if variant == "byteorder-case-dup":
        return torch_zip(pkl, good + [("BYTEORDER", b"big")])
    if variant == "data.pkl-case-dup":  # the second names os.system: torch's reader could take either
        evil = b"\x80\x02" + glob("os", "system") + text("true") + b"\x85R."
        return torch_zip(pkl, good + [("DATA.PKL", evil)])
    if variant == "upper-record-only":
        return torch_zip(pkl, [("byteorder", b"little"), ("DATA/0", floats(1, 2))])
    if variant == "upper-data.pkl-only":
        out = torch_zip(pkl, good)
        return out.replace(b"archive/data.pkl", b"archive/DATA.PKL")
    if variant == "upper-data.pkl-evil":  # the only pickle torch would load, named in capitals
        evil = b"\x80\x02" + glob("os", "system") + text("true") + b"\x85R."
        return torch_zip(evil, good).replace(b"archive/data.pkl", b"archive/DATA.PKL")
    if variant == "byteorder-empty":
        return torch_zip(pkl, [("byteorder", b""), ("data/0", floats(1, 2))])
    if variant == "byteorder-big":
        return torch_zip(pkl, [("byteorder", b"big"), ("data/0", floats(1, 2))])
    if variant == "outside-prefix":
        return torch_zip(pkl, good, first=[]).replace(b"archive/version", b"ARCHIVE/version")
    raise KeyError(variant)


def _storage_keys() -> bytes:
    """Storages ``'0'`` (float32) and ``0`` (int32), one record: torch reads them as two storages."""
    pkl = state_dict(a=tensor(text("0"), 2, (2,), (1,)), b=tensor(num(0), 2, (2,), (1,), storage="IntStorage"))
    return torch_zip(pkl, [("byteorder", b"little"), ("data/0", floats(1, 2))])


def _compressed(method: int, values: int = 4) -> bytes:
    """A storage record compressed with ``method``; beyond four values, zeros (a bomb: 256 MiB from KBs)."""
    pkl = state_dict(w=tensor(text("0"), values, (values,), (1,)))
    data = floats(*range(values)) if values <= 4 else bytes(4 * values)
    return torch_zip(pkl, [("byteorder", b"little"), ("data/0", data)], methods={"data/0": method})


def _legacy_view() -> bytes:
    """A tensor over a view (elements 2..3) of a four-element storage: torch reads [3, 4]."""
    obj = state_dict(w=tensor(text("0"), 4, (2,), (1,), view=tup(text("1"), num(2), num(2))))
    return legacy(obj, pickle.dumps(["0"], protocol=2), [floats(1, 2, 3, 4)])


def _deep_key(depth: int) -> bytes:
    """``{((...(1,)...),): 1}``, the key ``depth`` tuples deep: hashing it recursed until the process died."""
    pkl = b"\x80\x02}" + b"K\x01" + b"\x85" * depth + b"K\x01s."
    return torch_zip(pkl, [("byteorder", b"little")])


def _st_two(extra_meta: str = "", second: str = "b") -> bytes:
    head = "{" + (extra_meta + "," if extra_meta else "") + f'"a":{st_entry("F32", [2], 0, 8)},' \
        f'"{second}":{st_entry("F32", [2], 8, 16)}' + "}"
    return safetensors(head, floats(1, 2, 7, 7))


def _st_view(shape: list, stride: list, offset: int | str = 0) -> bytes:
    """A ``paramtool.ties`` view ``v`` of the stored ``a``; ``offset`` as text is written as it is."""
    meta = st_ties({"v": {"of": "a", "offset": 123456789 if isinstance(offset, str) else offset, "shape": shape,
                          "stride": stride}}).replace("123456789", str(offset))
    return safetensors("{" + meta + f',"a":{st_entry("F32", [4], 0, 16)}' + "}", floats(1, 2, 3, 4))


def _st_raw(shape_text: str, data: bytes = floats(1, 2)) -> bytes:
    return safetensors('{"a":{"dtype":"F32","shape":[' + shape_text + '],"data_offsets":[0,8]}}', data)


CASES: dict[str, tuple] = {
    # zip records looked up as torch's reader does (ASCII case ignored); two names for one record: ambiguous
    "data-case-dup.pt": (lambda: _case_records("data-case-dup"), "ambiguous"),
    "byteorder-case-dup.pt": (lambda: _case_records("byteorder-case-dup"), "ambiguous"),
    "data.pkl-case-dup.pt": (lambda: _case_records("data.pkl-case-dup"), "ambiguous"),
    "upper-record-only.pt": (lambda: _case_records("upper-record-only"), "torch"),
    "upper-data.pkl-only.pt": (lambda: _case_records("upper-data.pkl-only"), "torch"),
    "upper-data.pkl-evil.pt": (lambda: _case_records("upper-data.pkl-evil"), "os.system"),
    "byteorder-empty.pt": (lambda: _case_records("byteorder-empty"), "byte order"),
    "byteorder-big.pt": (lambda: _case_records("byteorder-big"), "big-endian"),
    "outside-prefix.pt": (lambda: _case_records("outside-prefix"), "outside the archive"),
    "storage-keys-0-and-'0'.pt": (_storage_keys, "torch"),
    "legacy-view.pt": (_legacy_view, "torch"),
    # compressed storage records: deflate is read (as far as the storage needs), others refused as torch does
    "deflated.pt": (lambda: _compressed(zipfile.ZIP_DEFLATED), "torch"),
    "bzip2.pt": (lambda: _compressed(zipfile.ZIP_BZIP2), "compressed with method 12"),
    "lzma.pt": (lambda: _compressed(zipfile.ZIP_LZMA), "compressed with method 14"),
    "bzip2-bomb-256MiB.pt": (lambda: _compressed(zipfile.ZIP_BZIP2, 64 << 20), "compressed"),
    "deflate-bomb-256MiB.pt": (lambda: _compressed(zipfile.ZIP_DEFLATED, 64 << 20), "decompression bomb"),
    "deep-tuple-key.pt": (lambda: _deep_key(200_000), "nested deeper"),
    # safetensors headers as safetensors reads them
    "duplicate-name.safetensors": (lambda: _st_two(second="a"), "twice"),
    "duplicate-metadata.safetensors": (lambda: _st_two('"__metadata__":{},"__metadata__":{}'), "twice"),
    "ties-name-a-stored-tensor.safetensors": (lambda: _st_two(st_ties(
        {"b": {"of": "a", "offset": 0, "shape": [2], "stride": [1]}})), "torch"),
    "5000-digit-shape.safetensors": (lambda: _st_raw("9" * 5000), "5000-digit"),
    "negative-shape.safetensors": (lambda: _st_raw("-2"), "not counts"),
    "fractional-shape.safetensors": (lambda: _st_raw("2.0"), "not counts"),
    "trailing-bytes.safetensors": (lambda: _st_raw("2", floats(1, 2, 3)), "belong to no tensor"),
    "view-2^40-stride-0.safetensors": (lambda: _st_view([1 << 40], [0]), "paramtool.ties"),
    "view-2^31-stride-0.safetensors": (lambda: _st_view([1 << 31], [0]), "paramtool.ties"),
    "view-expanded-1000x4.safetensors": (lambda: _st_view([1000, 4], [0, 1]), "torch"),
    "view-negative-stride.safetensors": (lambda: _st_view([2], [-1], 3), "paramtool.ties"),
    "view-negative-shape.safetensors": (lambda: _st_view([-2], [1]), "paramtool.ties"),
    "view-5000-digit-offset.safetensors": (lambda: _st_view([1], [1], "9" * 5000), "torch"),
    "view-300-dims.safetensors": (lambda: _st_view([1 << 62] * 300, [1] * 300), "paramtool.ties"),
}

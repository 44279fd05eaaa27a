"""The objects PyTorch's own serialization tests save (test/test_serialization.py), made here with the installed
torch: every dtype, storage and view trick, quantized, sparse, nested and meta tensors, bare storages, nested
containers, both containers (zip and legacy) and the ``torch.serialization.config`` save options.

``build(directory)`` writes each case and returns ``{case name: path}``; the differential tests compare every
command's view of each file with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import pathlib
from collections import OrderedDict
from typing import Any, Callable

import torch

ALL_DTYPES = [
    "float64", "float32", "float16", "bfloat16", "complex128", "complex64", "complex32",
    "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2", "bits8", "bits16",
]


def _bytes_as(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    """``n`` elements of ``dtype`` with random bit patterns (NaN payloads included), made through uint8."""
    g = torch.Generator().manual_seed(seed)
    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=g)
    return raw.view(dtype)


def _dtype_cases() -> dict[str, Callable[[], Any]]:
    out: dict[str, Callable[[], Any]] = {}
    for i, name in enumerate(ALL_DTYPES):
        dtype = getattr(torch, name, None)
        if dtype is None:
            continue
        if name == "bool":
            out[f"dtype_{name}"] = lambda: {"w": torch.tensor([True, False, True, True])}
            continue
        out[f"dtype_{name}"] = (lambda d=dtype, s=i: {"w": _bytes_as(d, 12, s).reshape(3, 4),
                                                    "scale": torch.tensor([0.5, 2.0])})
    return out


def _view_cases() -> dict[str, Callable[[], Any]]:
    def base() -> torch.Tensor:
        return torch.arange(24, dtype=torch.float32).reshape(4, 6)

    def unallocated() -> dict:
        s = torch.UntypedStorage(0)
        return {"a": torch.tensor([], dtype=torch.int32).set_(s), "b": torch.tensor([], dtype=torch.float64).set_(s)}

    return {
        "view_slice": lambda: (lambda b: {"whole": b, "row": b[1], "col": b[:, 2], "tail": b[2:]})(base()),
        "view_transpose": lambda: (lambda b: {"b": b, "t": b.t()})(base()),
        "view_offset_only": lambda: {"x": base()[1:3, 1:4]},
        "view_expand": lambda: {"e": torch.tensor([1.0, 2.0]).expand(5, 2)},
        "view_as_strided_overlap": lambda: {"o": torch.arange(10.0).as_strided((4, 3), (2, 1))},
        "view_unfold": lambda: {"u": torch.arange(12.0).unfold(0, 4, 2)},
        "view_scalar": lambda: {"s": torch.tensor(3.5), "i": torch.tensor(7)},
        "view_empty": lambda: {"e0": torch.empty(0), "e2": torch.empty(3, 0, 2)},
        "view_big_empty": lambda: {"e": torch.empty(2 ** 40, 0)},
        "view_unallocated_two_dtypes": unallocated,
        "view_slices_no_overlap": lambda: (lambda f: {f"w{i}": f[i * 6:(i + 1) * 6].view(2, 3) for i in range(4)})(
            torch.randn(24)),
        "view_shared_dtype_u16": lambda: (lambda b: {"a": b, "b": b[1:]})(_bytes_as(torch.uint16, 8, 3)),
        "view_shared_f8": lambda: (lambda b: {"a": b, "b": b[2:5]})(_bytes_as(torch.float8_e4m3fn, 8, 4)),
        "conj": lambda: {"c": torch.randn(3, dtype=torch.complex64).conj(), "plain": torch.randn(2, dtype=torch.complex64)},
        "conj_shared": lambda: (lambda z: {"z": z, "zc": z.conj()})(torch.randn(4, dtype=torch.complex128)),
        "neg": lambda: {"n": torch.randn(3, dtype=torch.complex64).conj().imag},
        "neg_conj_view": lambda: {"n": torch.randn(2, 2, dtype=torch.complex64).conj().t()},
    }


def _param_cases() -> dict[str, Callable[[], Any]]:
    def with_attr() -> dict:
        t = torch.randn(3)
        t.note = "hi"
        return {"t": t}

    def param_attr() -> dict:
        p = torch.nn.Parameter(torch.randn(2, 2))
        p.tag = 5
        return {"p": p}

    return {
        "param": lambda: {"p": torch.nn.Parameter(torch.randn(3, 2)), "frozen": torch.nn.Parameter(torch.ones(2), requires_grad=False)},
        "requires_grad": lambda: {"t": torch.randn(3).requires_grad_()},
        "tensor_with_attr": with_attr,
        "param_with_attr": param_attr,
    }


def _quantized_cases() -> dict[str, Callable[[], Any]]:
    x = lambda: torch.randn(4, 3, generator=torch.Generator().manual_seed(1))  # noqa: E731
    return {
        "q_per_tensor_qint8": lambda: {"q": torch.quantize_per_tensor(x(), 0.1, 3, torch.qint8)},
        "q_per_tensor_quint8": lambda: {"q": torch.quantize_per_tensor(x(), 0.05, 128, torch.quint8)},
        "q_per_tensor_qint32": lambda: {"q": torch.quantize_per_tensor(x(), 0.001, 0, torch.qint32)},
        "q_per_channel": lambda: {"q": torch.quantize_per_channel(x(), torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64),
                                                                torch.tensor([0, 1, 2, 3]), 0, torch.qint8)},
    }


def _sparse_cases() -> dict[str, Callable[[], Any]]:
    dense = lambda: torch.tensor([[0.0, 1.5, 0.0, 2.0], [0.0, 0.0, 3.0, 0.0], [4.0, 0.0, 0.0, 5.0], [0.0, 6.0, 0.0, 0.0]])  # noqa: E731
    return {
        "sparse_coo": lambda: {"s": dense().to_sparse()},
        "sparse_coo_uncoalesced": lambda: {"s": torch.sparse_coo_tensor(torch.tensor([[0, 0, 1], [1, 1, 2]]), torch.tensor([1.0, 2.0, 3.0]), (2, 3))},
        "sparse_csr": lambda: {"s": dense().to_sparse_csr()},
        "sparse_csc": lambda: {"s": dense().to_sparse_csc()},
        "sparse_bsr": lambda: {"s": dense().to_sparse_bsr((2, 2))},
        "sparse_bsc": lambda: {"s": dense().to_sparse_bsc((2, 2))},
    }


def _other_cases() -> dict[str, Callable[[], Any]]:
    def storages() -> dict:
        t = torch.arange(6, dtype=torch.int16)
        return {"typed": t.storage(), "untyped": torch.arange(3.0).untyped_storage()}

    return {
        "meta": lambda: {"m": torch.empty(3, 4, device="meta"), "real": torch.ones(2)},
        "nested_strided": lambda: {"n": torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)])},
        "nested_jagged": lambda: {"n": torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)],
                                                                  layout=torch.jagged), "w": torch.ones(2)},
        "bare_untyped_storage": lambda: torch.arange(4.0).untyped_storage(),
        "bare_storages_dict": storages,
        "containers": lambda: {"list": [torch.ones(2), (torch.zeros(1), {"deep": torch.arange(3)})], 3: torch.ones(1),
                               "od": OrderedDict(a=torch.tensor([1.0]))},
        "state_dict_module": lambda: torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).state_dict(),
    }


def cases() -> dict[str, Callable[[], Any]]:
    out: dict[str, Callable[[], Any]] = {}
    for part in (_dtype_cases, _view_cases, _param_cases, _quantized_cases, _sparse_cases, _other_cases):
        out.update(part())
    return out


LEGACY = ("dtype_float32", "dtype_float16", "dtype_int64", "dtype_complex64", "dtype_uint16", "dtype_float8_e5m2",
          "view_slice", "view_expand", "conj", "neg", "q_per_tensor_qint8", "sparse_coo", "param",
          "bare_storages_dict", "containers", "view_unallocated_two_dtypes", "meta")


def build(directory: pathlib.Path) -> dict[str, pathlib.Path]:
    """Every case saved as a zip, a chosen few as legacy files too, and a few under the save config options."""
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, pathlib.Path] = {}
    for name, make in cases().items():
        obj = make()
        path = directory / f"{name}.pt"
        torch.save(obj, path)
        out[name] = path
        if name in LEGACY:
            legacy = directory / f"{name}.legacy.pt"
            try:
                torch.save(obj, legacy, _use_new_zipfile_serialization=False)
                out[f"{name}.legacy"] = legacy
            except Exception:  # (torch cannot write some kinds in the legacy format)
                legacy.unlink(missing_ok=True)
    from torch.utils.serialization import config as _config

    config = _config.save
    obj = {"w": torch.randn(5, 3), "b": torch.randn(3)}
    old = (config.compute_crc32, config.storage_alignment)
    try:
        config.compute_crc32 = False
        torch.save(obj, directory / "config_no_crc.pt")
        out["config_no_crc"] = directory / "config_no_crc.pt"
        config.compute_crc32, config.storage_alignment = old[0], 4096
        torch.save(obj, directory / "config_align4096.pt")
        out["config_align4096"] = directory / "config_align4096.pt"
    finally:
        config.compute_crc32, config.storage_alignment = old
    return out

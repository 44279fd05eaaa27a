"""The one dtype table: names as torch prints them (without "torch."), their sizes, and each format's codes.

Imports nothing: listing uses it without torch.
"""
from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any

# dtype name -> bytes per element
SIZES: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "complex128": 16, "complex64": 8, "complex32": 4,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1,
    "uint16": 2, "uint32": 4, "uint64": 8, "bool": 1,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1, "bits8": 1, "bits16": 2, "bits1x8": 1, "bits2x4": 1, "bits4x2": 1,
    "qint8": 1, "quint8": 1, "qint32": 4, "quint4x2": 1, "quint2x4": 1,
    **{f"{kind}{bits}": 1 for kind in ("uint", "int") for bits in range(1, 8)},
}

# safetensors dtype codes -> dtype names
SAFETENSORS: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu", "C64": "complex64",
}

# the plain floating-point dtypes: what ``convert --dtype`` casts and numeric's cast kernel reads (FP8 and FP4
# values mean something only with their quantizer's scales)
PLAIN_FLOATS = frozenset({"float64", "float32", "float16", "bfloat16"})

# the spellings ``convert --dtype`` takes -> dtype names
ALIASES: dict[str, str] = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
                           "half": "float16", "fp32": "float32", "float32": "float32", "float": "float32"}

# dtype names -> numpy dtypes of the same bytes (little-endian, as every format stores them); bfloat16 is read
# as its 16 bits (``numeric`` widens it exactly to float32, its upper half)
NUMPY: dict[str, str] = {"float64": "<f8", "float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "int64": "<i8",
                         "int32": "<i4", "int16": "<i2", "int8": "i1", "uint8": "u1", "bool": "?"}

# the dtypes ``show`` prints from their bytes exactly as torch's print(t) does (printing.py), and those torch
# prints without a dtype= suffix (its defaults)
PRINTED = frozenset({"float32", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"})
UNSUFFIXED = frozenset({"float32", "int64", "bool"})

# the dtypes torch's aminmax / count_nonzero take as they are (``stats`` reads the others through float64)
TORCH_MINMAX = frozenset({"float32", "float64", "float16", "bfloat16", "int8", "int16", "int32", "int64", "uint8"})

# GGUF's unquantized tensor types -> dtype names (quantized types are dequantized to float32)
GGUF: dict[str, str] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
                        "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64"}

# the dtypes of the storages a quantized tensor (``torch._utils._rebuild_qtensor``) sits on
QUANTIZED_STORAGES = frozenset({"qint8", "quint8", "qint32"})

# dtypes torch stores but computes nothing on (no copy, no comparison, no print): listed, diffed by their bits
NO_ARITHMETIC = frozenset({"float4_e2m1fn_x2", "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2"})

# torch's legacy typed storage classes (named in every torch.save pickle) -> dtype names
STORAGE_TYPES: dict[str, str] = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "QInt8Storage": "qint8", "QUInt8Storage": "quint8", "QInt32Storage": "qint32",
}


# the storage classes a TorchScript archive's pickle names: "torch." + C++ ScalarType name + "Storage", for every
# dtype (torch.jit.save's pickler), the legacy ones above included
SCRIPT_STORAGE_TYPES: dict[str, str] = {**STORAGE_TYPES, **{f"{cpp}Storage": name for cpp, name in (
    ("UInt16", "uint16"), ("UInt32", "uint32"), ("UInt64", "uint64"), ("ComplexHalf", "complex32"),
    ("Float8_e4m3fn", "float8_e4m3fn"), ("Float8_e5m2", "float8_e5m2"), ("Float8_e4m3fnuz", "float8_e4m3fnuz"),
    ("Float8_e5m2fnuz", "float8_e5m2fnuz"), ("Float8_e8m0fnu", "float8_e8m0fnu"),
    ("Float4_e2m1fn_x2", "float4_e2m1fn_x2"), ("Bits8", "bits8"), ("Bits16", "bits16"))}}


def torch_dtype(name: str) -> Any:
    """The ``torch.dtype`` of a dtype name (torch is imported here, on first use, never by listing)."""
    import torch

    return getattr(torch, name)


def kind(name: str) -> str:
    """"float", "complex", "bool" or "int" for a dtype name (``torch.float32``, ``half`` and friends too)."""
    name = str(name).removeprefix("torch.")
    if name.startswith(("float", "bfloat")) or name in ("half", "double"):
        return "float"
    if name.startswith(("complex", "cfloat", "cdouble", "chalf")):
        return "complex"
    if name == "bool":
        return "bool"
    return "int"

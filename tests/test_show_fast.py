"""``show`` without torch (issue 26, item 10): where a tensor's bytes are at hand in float32, float64, an integer
dtype or bool, ``printing`` prints it with numpy, byte for byte as torch's ``print(t)``; the rest goes through
torch. Compared with torch's own ``repr`` over many shapes and values."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from paramtool.printing import tensor_text

SHAPES = [(), (0,), (0, 3), (3, 0, 2), (1,), (5,), (7,), (64,), (1000,), (1001,), (3, 4), (10, 10), (40, 30),
          (2, 600), (7, 7, 7), (2, 3, 4, 5), (6, 6, 6, 6), (1, 1, 1), (9, 200), (1, 5000)]
FLOATS = [torch.float32, torch.float64]
INTS = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]


def printed(t: torch.Tensor) -> str:
    t = t.contiguous()
    return tensor_text(memoryview(t.numpy().tobytes()), str(t.dtype).removeprefix("torch."), tuple(t.shape))


def _specials(t: torch.Tensor) -> torch.Tensor:
    u = t.clone().reshape(-1)
    for i, v in enumerate([math.nan, -math.inf, -0.0, math.inf]):
        if i < u.numel():
            u[-1 - i if i % 2 else i] = v
    return u.reshape(t.shape)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_floats_print_as_torch_prints_them(shape, dtype):
    g = torch.Generator().manual_seed(len(shape) * 100 + sum(shape))
    for scale in (1, 0.5, 1e-5, 1e5, 1e9, 1e-9, 3e38):
        t = torch.randn(shape, generator=g, dtype=torch.float64).mul(scale).to(dtype)
        for variant in (t, t.round(), _specials(t), _specials(t.round()), -t.abs(), torch.zeros_like(t)):
            assert printed(variant) == repr(variant)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_integers_and_bools_print_as_torch_prints_them(shape):
    g = torch.Generator().manual_seed(sum(shape) + 7)
    for dtype in INTS:
        info = torch.iinfo(dtype)
        for low, high in ((max(info.min, -9), min(info.max, 9)), (info.min, info.max)):
            t = torch.randint(low, high, shape, generator=g, dtype=dtype)
            assert printed(t) == repr(t)
    for t in (torch.randint(0, 2, shape, generator=g).bool(), torch.ones(shape, dtype=torch.bool)):
        assert printed(t) == repr(t)


@pytest.mark.parametrize("values", [[math.nan], [math.inf, math.nan], [0.0, -0.0], [-0.0], [0.0, math.nan, math.inf],
                                    [1e-4, 1.0], [9.99e-5, 1.0], [1e8, 1.0], [1.5e8], [123456789.0], [0.1, 100.0],
                                    [0.1, 100.1], [1e300, 1e-300], [3.4e38, 1e-45], [-1.0, 1000.0], [-1.0, 1001.0],
                                    [2.5, -0.0, math.nan], [1e-45], [65504.0, 0.25]])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_edge_values(values, dtype):
    t = torch.tensor(values, dtype=torch.float64).to(dtype)
    assert printed(t) == repr(t)
    assert printed(t[0]) == repr(t[0])  # a 0-d tensor


_FLOAT = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-4, 1e8, 1000.0]))


@settings(max_examples=300, deadline=None)
@given(st.lists(_FLOAT, min_size=1, max_size=40), st.sampled_from(FLOATS), st.integers(1, 4))
def test_any_float_values(values, dtype, rows):
    t = torch.tensor(values, dtype=dtype)
    n = len(values) - len(values) % rows
    assert printed(t) == repr(t)
    if n:
        assert printed(t[:n].reshape(rows, -1)) == repr(t[:n].reshape(rows, -1))


# --- through the command line, in a fresh interpreter --------------------------------------------------------

NO_TORCH = (
    "import sys\n"
    "from paramtool.launch import main\n"
    "sys.argv = ['paramtool'] + sys.argv[1:]\n"
    "try:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
    "assert 'torch' not in sys.modules, 'torch was imported'\n"
    "assert 'typer' not in sys.modules, 'typer was imported'\n"
)


def show_without_torch(*args) -> str:
    p = subprocess.run([sys.executable, "-c", NO_TORCH, "show", *map(str, args)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    big = torch.randn(300, 70, generator=g)
    big[5, 5], big[-1, -1] = math.nan, -0.0
    return {"bias": torch.randn(64, generator=g), "w": torch.randn(8, 12, generator=g),
            "big": big, "long": torch.arange(-5000, 5000, 3), "i8": torch.randint(-128, 127, (4, 5), dtype=torch.int8),
            "mask": torch.rand(3, 4, generator=g) > 0.5, "d": torch.randn(20, generator=g, dtype=torch.float64) * 1e-6,
            "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "ints": torch.tensor([1.0, -0.0, math.inf, 4.0])}


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_show_without_torch_prints_what_torch_prints(tmp_path, run, fmt):
    sd = _tensors()
    path = tmp_path / f"m.{fmt}"
    if fmt == "pt":
        torch.save(sd, path)
    else:
        save_file(sd, str(path))
    for name, t in sd.items():
        assert show_without_torch(path, name) == repr(t) + "\n", name
        fast = json.loads(show_without_torch(path, name, "--json"))
        assert fast == run("show", path, name, "--json").json(), name  # the torch path's document


def test_show_falls_back_to_torch_where_it_cannot_be_sure(tmp_path):
    """bfloat16 and float16 are laid out by torch in their own precision, complex has two formatters, a view into
    a larger storage has no bytes of its own: all printed by torch."""
    base = torch.randn(10)
    sd = {"bf": torch.randn(6).bfloat16(), "half": torch.randn(5).half(), "c": torch.randn(3, dtype=torch.cfloat),
          "view": base[2:5], "base": base}
    torch.save(sd, tmp_path / "m.pt")
    for name, t in sd.items():
        p = subprocess.run([sys.executable, "-m", "paramtool", "show", str(tmp_path / "m.pt"), name],
                           capture_output=True, text=True)
        assert p.returncode == 0 and p.stdout == repr(t) + "\n", (name, p.stderr)


def test_show_fast_path_keeps_the_cli_s_errors_and_positions(samples, tmp_path):
    rgnet = samples / "rgnet.pt"
    sd = torch.load(rgnet, weights_only=True)
    assert show_without_torch(rgnet, "[0][1][0].bias") == repr(sd["0.block 1.0.bias"]) + "\n"
    p = subprocess.run([sys.executable, "-m", "paramtool", "show", str(rgnet), "0.block 1.0.bia"], capture_output=True,
                       text=True)
    assert p.returncode == 1 and "did you mean '0.block 1.0.bias'" in p.stderr and p.stdout == ""

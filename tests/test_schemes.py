"""The initializer registry: torch.nn.init semantics, dtypes and layouts kept, per-tensor seeding."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from paramtool.errors import ParamtoolError, UsageError
from paramtool.schemes import (
    REQUIRED, SCHEMES, apply, generator_for, get_scheme, resolve_options, schemes_table,
)

# options a scheme cannot run without, and a shape it takes
NEEDED = {"constant": {"value": 2.0}, "sparse": {"sparsity": 0.5}}
SHAPE = {"dirac": (4, 3, 3)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def run_scheme(name, shape=(256, 256), dtype=torch.float32, seed=0, tensor_name="w", **opts):
    s = get_scheme(name)
    o = resolve_options(s, opts)
    t = torch.full(shape, float("nan")).to(dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
    apply(s, o, t, generator_for(seed, s.name, o, tensor_name, shape, dtype_name(dtype)))
    return t


def test_registry_order_and_contract_options():
    assert list(SCHEMES) == ["normal", "uniform", "constant", "zeros", "ones", "xavier_uniform", "xavier_normal",
                             "kaiming_uniform", "kaiming_normal", "trunc_normal", "orthogonal", "eye", "dirac",
                             "sparse", "masked_uniform"]
    table = {row["name"]: row for row in schemes_table()}
    assert table["normal"]["options"] == {"mean": 0.0, "std": 1.0}
    assert table["uniform"]["options"] == {"low": 0.0, "high": 1.0}
    assert table["constant"]["options"] == {"value": None} and table["constant"]["required"] == ["value"]
    assert table["zeros"]["options"] == {} and table["ones"]["options"] == {}
    for x in ("xavier_uniform", "xavier_normal", "orthogonal"):
        assert table[x]["options"] == {"gain": 1.0}
    for k in ("kaiming_uniform", "kaiming_normal"):
        assert table[k]["options"] == {"negative_slope": 0.0, "mode": "fan_in", "nonlinearity": "leaky_relu"}
    assert table["trunc_normal"]["options"] == {"mean": 0.0, "std": 1.0, "low": -2.0, "high": 2.0}
    assert table["eye"]["options"] == {} and table["dirac"]["options"] == {"groups": 1}
    assert table["sparse"]["options"] == {"sparsity": None, "std": 0.01}
    assert table["masked_uniform"]["options"] == {"low": -10.0, "high": 10.0, "threshold": 5.0}
    assert table["xavier_uniform"]["aliases"] == ["xavier"] and table["kaiming_uniform"]["aliases"] == ["kaiming"]
    assert get_scheme("constant").options[0].default is REQUIRED
    assert all(isinstance(row["doc"], str) and row["doc"] for row in table.values())


@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_every_scheme_keeps_shape_and_dtype(name, dtype):
    shape = SHAPE.get(name, (16, 16))
    t = run_scheme(name, shape, dtype, **NEEDED.get(name, {}))
    assert t.shape == shape and t.dtype == dtype and torch.isfinite(t.float()).all()


def test_normal_uniform_constant_zeros_ones():
    n = run_scheme("normal", std=0.01)
    assert abs(n.mean()) < 1e-3 and abs(n.std() - 0.01) < 5e-4
    n = run_scheme("normal", mean=3.0, std=2.0)
    assert abs(n.mean() - 3) < 0.05 and abs(n.std() - 2) < 0.05
    u = run_scheme("uniform", low=-2, high=3)
    assert u.min() >= -2 and u.max() <= 3 and u.min() < -1.99 and u.max() > 2.99
    assert abs(u.mean() - 0.5) < 0.05
    assert torch.all(run_scheme("constant", value=42) == 42)
    assert torch.all(run_scheme("constant", value=-0.5, dtype=torch.bfloat16) == -0.5)
    assert torch.all(run_scheme("zeros") == 0) and torch.all(run_scheme("ones") == 1)


@pytest.mark.parametrize("gain", [1.0, 2.5])
def test_xavier_bound_and_spread(gain):
    shape = (128, 512)
    bound = gain * math.sqrt(6 / (512 + 128))
    x = run_scheme("xavier", shape, gain=gain)
    assert x.abs().max() <= bound and x.abs().max() > 0.99 * bound
    assert abs(x.std() - bound / math.sqrt(3)) < 0.02 * bound
    xn = run_scheme("xavier_normal", shape, gain=gain)
    assert abs(xn.std() - gain * math.sqrt(2 / (512 + 128))) < 0.02 * bound


def test_xavier_on_conv_weight_uses_receptive_field():
    shape = (32, 16, 3, 3)
    bound = math.sqrt(6 / (16 * 9 + 32 * 9))
    x = run_scheme("xavier", shape)
    assert x.abs().max() <= bound and x.abs().max() > 0.99 * bound


def test_kaiming_bounds():
    fan_in, fan_out = 256, 128
    k = run_scheme("kaiming", (fan_out, fan_in))  # leaky_relu, negative_slope 0: gain √2
    kb = math.sqrt(2) * math.sqrt(3 / fan_in)
    assert k.abs().max() <= kb and k.abs().max() > 0.99 * kb
    k = run_scheme("kaiming", (fan_out, fan_in), mode="fan_out", nonlinearity="leaky_relu", negative_slope=0.2)
    kb = math.sqrt(2 / (1 + 0.2 ** 2)) * math.sqrt(3 / fan_out)
    assert k.abs().max() <= kb and k.abs().max() > 0.99 * kb
    k = run_scheme("kaiming", (fan_out, fan_in), nonlinearity="tanh")
    kb = 5 / 3 * math.sqrt(3 / fan_in)
    assert k.abs().max() <= kb and k.abs().max() > 0.99 * kb
    kn = run_scheme("kaiming_normal", (fan_out, fan_in), nonlinearity="relu")
    assert abs(kn.std() - math.sqrt(2 / fan_in)) < 0.01 * math.sqrt(2 / fan_in) * 5


def test_trunc_normal_within_bounds():
    t = run_scheme("trunc_normal")
    assert t.min() >= -2 and t.max() <= 2 and t.min() < -1.9 and t.max() > 1.9
    t = run_scheme("trunc_normal", mean=0.0, std=0.02, low=-0.04, high=0.04)
    assert t.min() >= -0.04 and t.max() <= 0.04 and abs(t.mean()) < 1e-3
    t = run_scheme("trunc_normal", low=-0.5, high=0.5)  # the rejection-sampling branch of torch
    assert t.min() >= -0.5 and t.max() <= 0.5


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32)])
def test_orthogonal(shape):
    o = run_scheme("orthogonal", shape, dtype=torch.float64)
    rows, cols = shape
    if rows <= cols:
        assert torch.allclose(o @ o.T, torch.eye(rows, dtype=torch.float64), atol=1e-10)
    else:
        assert torch.allclose(o.T @ o, torch.eye(cols, dtype=torch.float64), atol=1e-10)
    o = run_scheme("orthogonal", (64, 64), gain=2.0)
    assert torch.allclose(o @ o.T, 4 * torch.eye(64), atol=1e-4)


def test_orthogonal_conv_weight_is_orthogonal_when_flattened():
    o = run_scheme("orthogonal", (8, 2, 3, 3)).reshape(8, -1)
    assert torch.allclose(o @ o.T, torch.eye(8), atol=1e-5)


def test_eye_and_dirac():
    assert torch.equal(run_scheme("eye", (3, 3)), torch.eye(3))
    assert torch.equal(run_scheme("eye", (2, 4)), torch.eye(2, 4))
    w = run_scheme("dirac", (4, 4, 3, 3))
    x = torch.randn(1, 4, 5, 5)
    assert torch.allclose(torch.nn.functional.conv2d(x, w, padding=1), x)
    d = run_scheme("dirac", (2, 2, 3))
    assert d[0, 0, 1] == 1 and d[1, 1, 1] == 1 and d.sum() == 2
    g = run_scheme("dirac", (4, 2, 3), groups=2)  # each group of 2 output channels passes its 2 inputs
    assert g.sum() == 4 and g[0, 0, 1] == g[1, 1, 1] == g[2, 0, 1] == g[3, 1, 1] == 1


def test_sparse_fraction_of_zeros_per_column():
    s = run_scheme("sparse", (100, 10), sparsity=0.3)
    assert all(int((s[:, j] == 0).sum()) == 30 for j in range(10))
    s = run_scheme("sparse", (256, 256), sparsity=0.1, std=0.05)
    nz = s[s != 0]
    assert all(int((s[:, j] == 0).sum()) == math.ceil(0.1 * 256) for j in range(256))
    assert abs(nz.std() - 0.05) < 0.002
    assert (run_scheme("sparse", (10, 4), sparsity=0.0) != 0).all()
    assert (run_scheme("sparse", (10, 4), sparsity=1.0) == 0).all()


def test_sparse_is_reproducible_from_the_seed():
    # torch.nn.init.sparse_ draws its row permutations from the global RNG; ours come from the generator
    torch.manual_seed(1)
    a = run_scheme("sparse", (50, 20), sparsity=0.5, seed=3)
    torch.manual_seed(2)
    b = run_scheme("sparse", (50, 20), sparsity=0.5, seed=3)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_masked_uniform(dtype):
    m = run_scheme("masked_uniform", dtype=dtype).float()
    assert 0.45 < (m == 0).float().mean() < 0.55
    nz = m[m != 0].abs()
    assert nz.min() >= 5 and nz.max() <= 10
    assert (m[m != 0] < 0).float().mean().sub(0.5).abs() < 0.05


def test_masked_uniform_options():
    m = run_scheme("masked_uniform", low=0.0, high=1.0, threshold=0.25)
    assert 0.2 < (m == 0).float().mean() < 0.3 and m[m != 0].min() >= 0.25


@pytest.mark.parametrize("name", ["orthogonal", "xavier", "normal", "trunc_normal", "kaiming_normal"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types_stay_half(name, dtype):
    t = run_scheme(name, (64, 64), dtype)
    assert t.dtype == dtype and torch.isfinite(t.float()).all() and t.float().std() > 0
    if name == "orthogonal":  # computed in float32, then rounded
        assert torch.allclose(t.float() @ t.float().T, torch.eye(64), atol=0.05)


def test_half_values_are_the_float32_values_rounded():
    a = run_scheme("xavier", (32, 32), torch.float32, seed=4)
    s = get_scheme("xavier")
    o = resolve_options(s, {})
    b = torch.empty(32, 32, dtype=torch.bfloat16)
    apply(s, o, b, generator_for(4, s.name, o, "w", (32, 32), "float32"))  # the float32 stream, stored as bf16
    assert torch.equal(b, a.to(torch.bfloat16))


@pytest.mark.parametrize("name", list(SCHEMES))
def test_a_transposed_view_is_written_through_to_its_base(name):
    shape = SHAPE.get(name, (12, 20))
    base = torch.full(shape[::-1] if len(shape) == 2 else shape, float("nan"))
    view = base.t() if len(shape) == 2 else base.transpose(0, 1).transpose(0, 1)[:, :]
    if len(shape) != 2:  # a non-contiguous view of a conv weight: every other output channel of a wider base
        base = torch.full((shape[0] * 2, *shape[1:]), float("nan"))
        view = base[::2]
    assert not view.is_contiguous()
    s = get_scheme(name)
    o = resolve_options(s, NEEDED.get(name, {}))
    apply(s, o, view, generator_for(9, s.name, o, "w", tuple(view.shape), "float32"))
    assert not torch.isnan(view).any()
    # the same values as on a fresh contiguous tensor: layout never changes what a tensor gets
    fresh = torch.empty(tuple(view.shape))
    apply(s, o, fresh, generator_for(9, s.name, o, "w", tuple(view.shape), "float32"))
    assert torch.equal(fresh, view)


def test_views_of_a_base_tensor():
    base = torch.zeros(4, 6)
    s = get_scheme("constant")
    apply(s, resolve_options(s, {"value": 3}), base.t(), None)
    assert torch.all(base == 3)
    apply(s, resolve_options(s, {"value": 1}), base[1], None)
    assert torch.all(base[1] == 1) and torch.all(base[0] == 3)
    base = torch.zeros(8, 8, dtype=torch.bfloat16)
    s = get_scheme("orthogonal")
    apply(s, resolve_options(s, {}), base[:4].t(), torch.Generator().manual_seed(0))
    assert (base[:4] != 0).all() and (base[4:] == 0).all()


def test_parameter_that_requires_grad():
    p = torch.nn.Parameter(torch.zeros(8, 8))
    s = get_scheme("xavier")
    apply(s, resolve_options(s, {}), p, None)
    assert p.requires_grad and p.grad_fn is None and (p != 0).any()


def test_integer_tensors():
    assert torch.equal(run_scheme("constant", (3,), torch.int64, value=7), torch.full((3,), 7))
    assert torch.equal(run_scheme("eye", (3, 3), torch.int32), torch.eye(3, dtype=torch.int32))
    assert get_scheme("normal").accepts((3,), "int64") == "is int64, not floating-point"
    assert get_scheme("constant").accepts((3,), "int64", {"value": 2.5})
    assert get_scheme("constant").accepts((3,), "int64", {"value": 2.0}) is None
    with pytest.raises(ParamtoolError, match="not floating-point"):
        run_scheme("normal", (3,), torch.int64)


def test_accepts():
    for name in ("xavier", "xavier_normal", "kaiming", "kaiming_normal", "orthogonal"):
        assert get_scheme(name).accepts((8,)) == "needs ≥ 2 dims"
        assert get_scheme(name).accepts(()) == "needs ≥ 2 dims"
        assert get_scheme(name).accepts((8, 4)) is None and get_scheme(name).accepts((8, 4, 3, 3)) is None
    for name in ("normal", "uniform", "constant", "zeros", "ones", "trunc_normal", "masked_uniform"):
        assert get_scheme(name).accepts((8,)) is None and get_scheme(name).accepts(()) is None
    assert get_scheme("eye").accepts((2, 2, 2)) == "needs exactly 2 dims" and get_scheme("eye").accepts((2,))
    assert get_scheme("eye").accepts((2, 3)) is None
    assert get_scheme("dirac").accepts((3, 3)) == "needs 3 to 5 dims" and get_scheme("dirac").accepts((1,) * 6)
    assert get_scheme("dirac").accepts((4, 4, 3)) is None and get_scheme("dirac").accepts((4, 4, 3, 3, 3)) is None
    assert get_scheme("dirac").accepts((4, 2, 3), "float32", {"groups": 3})
    assert get_scheme("sparse").accepts((4, 4, 4)) == "needs exactly 2 dims"
    assert get_scheme("xavier").accepts((0, 4))


def test_empty_and_meta_tensors_are_a_no_op():
    """Every scheme leaves an empty tensor and a meta tensor as they are: no error (even where the scheme could not
    fill that shape, as xavier cannot fill [0, 4]), and no number drawn from the tensor's generator or from torch's
    global one, so what is initialized after them gets the values it would get without them."""
    for name in SCHEMES:
        s = get_scheme(name)
        options = resolve_options(s, NEEDED.get(name, {}))
        for tensor in (torch.empty(0, 4), torch.empty(*SHAPE.get(name, (4, 4)), device="meta")):
            shape = tuple(tensor.shape)
            gen = torch.Generator().manual_seed(0)
            before, global_before = gen.get_state(), torch.get_rng_state()
            assert apply(s, options, tensor, gen) is None
            assert apply(s, options, tensor, None) is None
            assert torch.equal(gen.get_state(), before), f"{name} drew from the generator on {tensor.device} {shape}"
            assert torch.equal(torch.get_rng_state(), global_before), f"{name} drew from torch's global generator"
            assert tuple(tensor.shape) == shape and tensor.dtype == torch.float32


def test_generator_depends_only_on_its_inputs():
    a = run_scheme("normal", seed=5)
    assert torch.equal(a, run_scheme("normal", seed=5))
    assert not torch.equal(a, run_scheme("normal", seed=6))
    assert not torch.equal(a, run_scheme("normal", seed=5, tensor_name="v"))
    assert not torch.equal(a, run_scheme("normal", seed=5, std=1.5))
    s = get_scheme("normal")
    o = resolve_options(s, {})
    g = lambda **kw: generator_for(**{"seed": 1, "scheme": "normal", "options": o, "name": "x",
                                      "shape": (2,), "dtype": "float32", **kw})
    draw = lambda gen: torch.randn(16, generator=gen)
    assert torch.equal(draw(g()), draw(g()))
    assert torch.equal(draw(g(dtype=torch.float32)), draw(g()))  # a torch.dtype or its name
    assert torch.equal(draw(g(shape=torch.Size([2]))), draw(g()))
    assert torch.equal(draw(g(options=dict(reversed(list(o.items()))))), draw(g()))  # option order does not matter
    for change in ({"name": "y"}, {"seed": 2}, {"scheme": "uniform"}, {"shape": (1, 2)}, {"dtype": "bfloat16"},
                   {"options": {"mean": 0.0, "std": 2.0}}):
        assert not torch.equal(draw(g(**change)), draw(g())), change
    assert generator_for(None, "normal", o, "x", (2,), "float32") is None
    x = get_scheme("xavier")
    xo = resolve_options(x, {})
    assert torch.equal(draw(generator_for(1, "xavier", xo, "x", (2, 2), "float32")),
                       draw(generator_for(1, "xavier_uniform", xo, "x", (2, 2), "float32")))


def test_values_do_not_depend_on_the_global_rng_or_on_other_tensors():
    torch.manual_seed(0)
    a = run_scheme("kaiming", (32, 32), seed=11, tensor_name="0.weight")
    torch.manual_seed(123)
    run_scheme("kaiming", (32, 32), seed=11, tensor_name="2.weight")  # another tensor in between
    b = run_scheme("kaiming", (32, 32), seed=11, tensor_name="0.weight")
    assert torch.equal(a, b)


def test_no_seed_uses_the_global_rng():
    torch.manual_seed(0)
    a = run_scheme("normal", (8,), seed=None)
    torch.manual_seed(0)
    assert torch.equal(a, run_scheme("normal", (8,), seed=None))


def test_resolve_options_fills_and_types():
    assert resolve_options(get_scheme("normal"), {}) == {"mean": 0.0, "std": 1.0}
    assert resolve_options(get_scheme("normal"), {"std": 1}) == {"mean": 0.0, "std": 1.0}
    assert type(resolve_options(get_scheme("normal"), {"std": 1})["std"]) is float
    assert resolve_options(get_scheme("dirac"), {"groups": 2.0}) == {"groups": 2}
    assert resolve_options(get_scheme("constant"), {"value": "3"}) == {"value": 3.0}
    assert resolve_options(get_scheme("kaiming"), {"mode": "fan_out"})["mode"] == "fan_out"
    assert resolve_options(get_scheme("sparse"), {"sparsity": 0.2}) == {"sparsity": 0.2, "std": 0.01}


@pytest.mark.parametrize("name,opts,msg", [
    ("constant", {}, "scheme 'constant' needs --value"),
    ("sparse", {}, "needs --sparsity"),
    ("normal", {"gain": 2.0}, "--gain does not apply to scheme 'normal'"),
    ("zeros", {"value": 1.0}, "--value does not apply to scheme 'zeros'"),
    ("xavier", {"negative_slope": 0.1}, "--negative-slope does not apply to scheme 'xavier_uniform'"),
    ("kaiming", {"mode": "sideways"}, "--mode must be one of fan_in, fan_out"),
    ("kaiming", {"nonlinearity": "gelu"}, "--nonlinearity must be one of"),
    ("uniform", {"low": 2.0, "high": 1.0}, "above"),
    ("trunc_normal", {"std": 0.0}, "positive"),
    ("normal", {"std": -1.0}, "negative"),
    ("normal", {"std": float("nan")}, "finite"),
    ("normal", {"mean": "abc"}, "--mean must be a number"),
    ("normal", {"mean": True}, "--mean must be a number"),
    ("dirac", {"groups": 1.5}, "--groups must be an integer"),
    ("dirac", {"groups": 0}, "at least 1"),
    ("sparse", {"sparsity": 1.5}, "between 0 and 1"),
])
def test_option_errors(name, opts, msg):
    with pytest.raises(UsageError, match=msg):
        resolve_options(get_scheme(name), opts)


def test_unknown_scheme_lists_the_valid_names():
    with pytest.raises(UsageError, match="unknown scheme 'nope'") as e:
        get_scheme("nope")
    for name in list(SCHEMES) + ["xavier", "kaiming"]:
        assert name in str(e.value)
    assert e.value.exit_code == 2


def test_aliases():
    assert get_scheme("xavier") is get_scheme("xavier_uniform")
    assert get_scheme("kaiming") is get_scheme("kaiming_uniform")
    assert get_scheme("xavier").name == "xavier_uniform" and get_scheme("kaiming").name == "kaiming_uniform"


def test_apply_refuses_what_accepts_refuses():
    s = get_scheme("dirac")
    with pytest.raises(ParamtoolError, match="divisible"):
        apply(s, resolve_options(s, {"groups": 3}), torch.empty(4, 2, 3), None)
    s = get_scheme("xavier")
    with pytest.raises(ParamtoolError, match="needs ≥ 2 dims"):
        apply(s, resolve_options(s, {}), torch.empty(4), None)


def test_listing_needs_no_torch():
    code = ("import sys\nfrom paramtool.schemes import schemes_table, get_scheme, resolve_options, SCHEMES\n"
            "schemes_table(); s = get_scheme('xavier'); resolve_options(s, {'gain': 2})\n"
            "s.accepts((3, 4), 'float32', {}); import json; json.dumps(schemes_table())\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr

"""The initializer registry: torch.nn.init semantics, dtypes kept, per-tensor seeding."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from paramtool.errors import UsageError
from paramtool.schemes import SCHEMES, apply, generator_for, get_scheme, resolve_options


def run_scheme(name, shape=(256, 256), dtype=torch.float32, seed=0, **opts):
    s = get_scheme(name)
    o = resolve_options(s, opts)
    t = torch.empty(shape, dtype=dtype)
    apply(s, o, t, generator_for(seed, s.name, o, "w", shape, str(dtype)[6:]))
    return t


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_every_scheme_keeps_shape_and_dtype(name):
    opts = {"constant": {"value": 2.0}, "sparse": {"sparsity": 0.5}}.get(name, {})
    shape = (4, 3, 3) if name == "dirac" else (16, 16)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = run_scheme(name, shape, dtype, **opts)
        assert t.shape == shape and t.dtype == dtype and torch.isfinite(t.float()).all()


def test_distributions():
    n = run_scheme("normal", std=0.01)
    assert abs(n.mean()) < 1e-3 and abs(n.std() - 0.01) < 5e-4
    u = run_scheme("uniform", low=-2, high=3)
    assert u.min() >= -2 and u.max() <= 3 and u.min() < -1.9 and u.max() > 2.9
    assert torch.all(run_scheme("constant", value=42) == 42)
    assert torch.all(run_scheme("zeros") == 0) and torch.all(run_scheme("ones") == 1)
    bound = math.sqrt(6 / (256 + 256))
    x = run_scheme("xavier")
    assert x.abs().max() <= bound and x.abs().max() > 0.95 * bound
    k = run_scheme("kaiming", nonlinearity="relu")
    kb = math.sqrt(2) * math.sqrt(3 / 256)
    assert k.abs().max() <= kb and k.abs().max() > 0.95 * kb
    tn = run_scheme("trunc_normal", low=-0.5, high=0.5)
    assert tn.min() >= -0.5 and tn.max() <= 0.5
    o = run_scheme("orthogonal", (64, 64))
    assert torch.allclose(o @ o.T, torch.eye(64), atol=1e-4)
    assert torch.equal(run_scheme("eye", (3, 3)), torch.eye(3))
    d = run_scheme("dirac", (2, 2, 3))
    assert d[0, 0, 1] == 1 and d.sum() == 2
    s = run_scheme("sparse", (100, 10), sparsity=0.3)
    assert all((s[:, j] == 0).sum() == 30 for j in range(10))


def test_masked_uniform():
    m = run_scheme("masked_uniform")
    assert 0.45 < (m == 0).float().mean() < 0.55
    nz = m[m != 0].abs()
    assert nz.min() >= 5 and nz.max() <= 10


def test_writes_through_views():
    base = torch.zeros(4, 6)
    s = get_scheme("constant")
    apply(s, resolve_options(s, {"value": 3}), base.t(), None)
    assert torch.all(base == 3)
    apply(s, resolve_options(s, {"value": 1}), base[1], None)
    assert torch.all(base[1] == 1) and torch.all(base[0] == 3)


def test_accepts():
    assert get_scheme("xavier").accepts((8,)) == "needs ≥ 2 dims"
    assert get_scheme("orthogonal").accepts((8,)) and get_scheme("kaiming_normal").accepts((3,))
    assert get_scheme("normal").accepts((8,)) is None
    assert get_scheme("eye").accepts((2, 2, 2)) and get_scheme("dirac").accepts((3, 3))


def test_generator_depends_only_on_its_inputs():
    a = run_scheme("normal", seed=5)
    assert torch.equal(a, run_scheme("normal", seed=5))
    assert not torch.equal(a, run_scheme("normal", seed=6))
    s = get_scheme("normal")
    o = resolve_options(s, {})
    g1, g2 = generator_for(1, "normal", o, "x", (2,), "float32"), generator_for(1, "normal", o, "y", (2,), "float32")
    assert not torch.equal(torch.randn(4, generator=g1), torch.randn(4, generator=g2))
    assert generator_for(None, "normal", o, "x", (2,), "float32") is None


@pytest.mark.parametrize("name,opts,msg", [
    ("constant", {}, "needs --value"), ("normal", {"gain": 2.0}, "--gain does not apply"),
    ("kaiming", {"mode": "sideways"}, "must be one of"), ("uniform", {"low": 2.0, "high": 1.0}, "above"),
    ("nope", {}, "unknown scheme"),
])
def test_option_errors(name, opts, msg):
    with pytest.raises(UsageError, match=msg):
        resolve_options(get_scheme(name), opts)


def test_aliases():
    assert get_scheme("xavier").name == "xavier_uniform" and get_scheme("kaiming").name == "kaiming_uniform"


def test_listing_needs_no_torch():
    code = ("import sys\nfrom paramtool.schemes import schemes_table, get_scheme\n"
            "schemes_table(); get_scheme('xavier')\nassert 'torch' not in sys.modules\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr

"""Differential tests: every command's view of the objects PyTorch's own serialization tests save (made by
``torch_corpus``) and of safetensors files in every dtype, against ``torch.load(weights_only=True)`` and
``safe_open``: names, shapes, dtypes, exact values (bitwise, NaN payloads included), storage sharing, and the
round trip through ``convert`` in both formats."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import torch_corpus
from paramtool import tree
from paramtool.sources import load_lazy, resolve
from paramtool.values import NO_ARITHMETIC, readable

warnings.filterwarnings("ignore", category=UserWarning)

CASES = list(torch_corpus.cases()) + [f"{n}.legacy" for n in torch_corpus.LEGACY] + ["config_no_crc", "config_align4096"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch_corpus.build(tmp_path_factory.mktemp("corpus"))


def _torch_view(path):
    """name -> tensor (or storage) as torch.load(weights_only=True) gives them, named as paramtool names."""
    obj = torch.load(path, weights_only=True)
    names = tree.assign_names(obj)
    return {n: tree.get_path(obj, p) for n, p in names.items()}


def _dtype(t) -> str:
    return str(t.dtype).removeprefix("torch.")


def _bits(t, name=""):
    """The values torch gives, as bytes (conj/neg resolved, quantized as int_repr + params, sparse dense)."""
    from paramtool.values import as_tensor

    t = as_tensor(t)
    if t.is_meta:
        return ("meta", tuple(t.shape), _dtype(t))
    if t.is_quantized:
        params = (t.q_scale(), t.q_zero_point()) if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric) \
            else (t.q_per_channel_scales().tolist(), t.q_per_channel_zero_points().tolist(), t.q_per_channel_axis())
        return ("q", bytes(t.int_repr().contiguous().view(torch.uint8).numpy()), str(t.qscheme()), params)
    flat = readable(t, name, bits=True).detach().contiguous().reshape(-1)
    return (str(t.layout), tuple(flat.shape), bytes(flat.view(torch.uint8).numpy()) if flat.numel() else b"")


def _shape(t):
    from paramtool.values import as_tensor

    t = as_tensor(t)
    return [t.size(0)] if t.is_nested else list(t.shape)


def _storage_groups(view: dict) -> set:
    """Names sharing one storage, as torch says it: ``untyped_storage().data_ptr()`` of non-empty tensors."""
    by_ptr: dict = {}
    for name, t in view.items():
        if not isinstance(t, torch.Tensor) or t.is_meta or t.is_nested or t.layout != torch.strided or t.numel() == 0:
            continue
        by_ptr.setdefault(t.untyped_storage().data_ptr(), []).append(name)
    return {frozenset(names) for names in by_ptr.values() if len(names) > 1}


@pytest.mark.parametrize("case", CASES)
def test_every_command_sees_what_torch_sees(case, corpus, run, tmp_path):
    if case not in corpus:
        pytest.skip("torch cannot write this case in this container")
    path = corpus[case]
    try:
        expected = _torch_view(path)
    except Exception as e:  # torch itself refuses: paramtool must not claim more (one error line or a listing)
        r = run("inspect", path, "--json")
        assert r.exit_code in (0, 1) and "Traceback" not in r.stderr, (case, e)
        return
    r = run("inspect", path, "--json")
    assert r.exit_code == 0, r.stderr
    listed = r.json()["tensors"]
    assert [t["name"] for t in listed] == list(expected), case
    assert [t["shape"] for t in listed] == [_shape(t) for t in expected.values()], case
    assert [t["dtype"] for t in listed] == [_dtype(t) for t in expected.values()], case

    # values, bit for bit, through the reading path every value command takes
    ckpt = load_lazy(resolve(str(path)))
    for name, t in expected.items():
        mine = ckpt.tensor(name)
        if getattr(t, "is_meta", False):
            assert mine.is_meta
            continue
        assert _bits(mine, name) == _bits(t, name), (case, name)

    # storage sharing: exactly torch's groups
    r = run("ties", path, "--json")
    assert r.exit_code == 0, r.stderr
    assert {frozenset(g["names"]) for g in r.json()["groups"]} == _storage_groups(expected), case

    # stats: every tensor with values, or one error line naming the one without
    r = run("stats", path, "--json")
    no_values = [n for n, t in expected.items() if getattr(t, "is_meta", False) or _dtype(t) in NO_ARITHMETIC]
    if no_values:
        assert r.exit_code == 1 and r.stderr.startswith("error:") and no_values[0] in r.stderr, r.stderr
    else:
        assert r.exit_code == 0, r.stderr
        assert [s["name"] for s in r.json()["tensors"]] == list(expected)

    # diff against itself: equal, and never equal to a file missing a tensor
    r = run("diff", path, path, "--json")
    assert r.exit_code == (2 if any(getattr(t, "is_meta", False) for t in expected.values()) else 0), r.stderr

    # convert round trips: pt keeps everything torch sees; safetensors holds it or refuses by name
    out = tmp_path / "out.pt"
    r = run("convert", path, "-o", out)
    assert r.exit_code == 0, r.stderr
    back = _torch_view(out)
    assert list(back) == list(expected)
    for name, t in expected.items():
        assert _dtype(back[name]) == _dtype(t) and _bits(back[name], name) == _bits(t, name), (case, name)
    assert _storage_groups(back) == _storage_groups(expected), case

    st = tmp_path / "out.safetensors"
    r = run("convert", path, "-o", st, "--drop-extra")
    if r.exit_code != 0:
        assert r.exit_code == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error:"), r.stderr
        return
    from safetensors import safe_open

    with safe_open(str(st), "pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata() or {}
    for name, t in expected.items():
        if name in got:
            stored = got[name]
        else:  # a tie the safetensors writer stored once (named in the metadata)
            ties = json.loads(meta.get("paramtool.ties", "{}"))
            assert name in meta or name in ties, (case, name)
            continue
        assert _dtype(stored) == _dtype(readable(t, bits=True)) or _dtype(stored) == _dtype(t)
        assert _bits(stored, name)[1:] == _bits(t, name)[1:], (case, name)


SAFETENSORS_DTYPES = ["float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
                      "uint16", "uint32", "uint64", "bool", "float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu",
                      "float8_e4m3fnuz", "float8_e5m2fnuz",
                      "complex64"]


@pytest.mark.parametrize("dtype", SAFETENSORS_DTYPES)
def test_safetensors_every_dtype(dtype, run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    d = getattr(torch, dtype)
    t = torch.randint(0, 2, (3, 5), dtype=torch.uint8).bool() if dtype == "bool" else \
        torch.randint(0, 256, (3, 5 * torch.empty(0, dtype=d).element_size()), dtype=torch.uint8).view(d)
    path = tmp_path / "x.safetensors"
    try:
        save_file({"w": t, "b": torch.ones(2)}, str(path))
    except Exception as e:
        pytest.skip(f"this safetensors cannot write {dtype}: {e}")
    with safe_open(str(path), "pt") as f:
        expected = {k: f.get_tensor(k) for k in f.keys()}
    r = run("inspect", path, "--json")
    assert r.exit_code == 0, r.stderr
    assert {t["name"]: (t["dtype"], t["shape"]) for t in r.json()["tensors"]} == \
        {k: (_dtype(v), list(v.shape)) for k, v in expected.items()}
    ckpt = load_lazy(resolve(str(path)))
    for k, v in expected.items():
        assert _bits(ckpt.tensor(k)) == _bits(v)
    out = tmp_path / "x.pt"
    r = run("convert", path, "-o", out)
    assert r.exit_code == 0, r.stderr
    back = torch.load(out, weights_only=True)
    for k, v in expected.items():
        assert _dtype(back[k]) == _dtype(v) and _bits(back[k]) == _bits(v)


def test_sparse_claiming_a_huge_dense_shape_is_refused_for_values(run, tmp_path):
    """A sparse tensor of three values and a dense shape of 2^50 elements: listed as torch lists it, but its
    values (to_dense) are refused with one line instead of an allocation that cannot succeed."""
    s = torch.sparse_coo_tensor(torch.tensor([[0, 1, 2], [0, 1, 2]]), torch.tensor([1.0, 2.0, 3.0]), (2 ** 25, 2 ** 25))
    torch.save({"s": s, "w": torch.ones(2)}, tmp_path / "big.pt")
    r = run("inspect", tmp_path / "big.pt", "--json")
    assert r.exit_code == 0 and r.json()["tensors"][0]["shape"] == [2 ** 25, 2 ** 25]
    assert r.json()["tensors"][0]["kind"] == "sparse_coo nnz=3"
    r = run("stats", tmp_path / "big.pt", "--json")
    assert r.exit_code == 1 and r.stderr.startswith("error:") and "'s' is sparse" in r.stderr


def test_expanded_views_are_bounded(run, tmp_path):
    """A stride-0 view claims elements its storage does not hold: up to 2^26 of them are read as torch reads
    them; beyond that a few bytes would cost minutes of work, and the file is refused with one line."""
    torch.save({"e": torch.tensor([2.5]).expand(2 ** 20)}, tmp_path / "ok.pt")
    r = run("stats", tmp_path / "ok.pt", "--json")
    assert r.exit_code == 0 and r.json()["tensors"][0]["mean"] == 2.5
    torch.save({"e": torch.tensor([2.5]).expand(2 ** 27)}, tmp_path / "bomb.pt")
    r = run("inspect", tmp_path / "bomb.pt", "--json")
    assert r.exit_code == 1 and r.stderr.startswith("error:") and "needs more than the 1" in r.stderr


@pytest.mark.parametrize("case,name,edit_ok", [("meta", "m", False), ("dtype_bits8", "w", False),
                                               ("q_per_tensor_qint8", "q", True), ("conj", "c", True),
                                               ("sparse_csr", "s", True)])
def test_set_on_special_tensors(case, name, edit_ok, corpus, run, tmp_path):
    """An edit of a tensor torch can write values into is written as torch writes it (a quantized tensor
    requantized, a sparse tensor's values, a conj view's values); one without values is one error line."""
    out = tmp_path / "e.pt"
    r = run("set", corpus[case], f"{name} = 1", "-o", out)
    if not edit_ok:
        assert r.exit_code == 1 and r.stderr.startswith("error:") and not out.exists(), r.stderr
        return
    assert r.exit_code == 0, r.stderr
    got = readable(torch.load(out, weights_only=True)[name])
    assert torch.equal(got.real if got.is_complex() else got, torch.ones(got.shape)) or case == "sparse_csr"
    if case == "sparse_csr":
        assert torch.equal(torch.load(out, weights_only=True)[name].values(), torch.ones(6))


class _Call:
    """Pickled as ``func(*args)``: a rebuild function with arguments torch.save would never write."""

    def __init__(self, func, args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _crafted():
    u = torch._utils
    return {
        "sparse index beyond its shape": _Call(u._rebuild_sparse_tensor, (
            torch.sparse_coo, (torch.tensor([[0, 5]]), torch.tensor([1.0, 2.0]), (3,)))),
        "sparse csr rows out of order": _Call(u._rebuild_sparse_tensor, (
            torch.sparse_csr, (torch.tensor([0, 2, 1]), torch.tensor([0, 1]), torch.tensor([1.0, 2.0]), (2, 2)))),
        "nested component beyond its buffer": _Call(u._rebuild_nested_tensor, (
            torch.arange(4.0), torch.tensor([[3]]), torch.tensor([[1]]), torch.tensor([3]))),
        "meta tensor of negative size": _Call(u._rebuild_meta_tensor_no_storage, (torch.float32, (-1,), (1,), False)),
        "tensor metadata of unknown kind": _Call(u._rebuild_tensor_v2, (
            torch.ones(2).untyped_storage(), 0, (2,), (1,), False, {}, {"zap": True})),
    }


@pytest.mark.parametrize("what", list(_crafted()))
def test_crafted_rebuild_arguments_are_one_error_line(what, run, tmp_path):
    """What torch.load would refuse, or what would read outside a buffer, is one `error:` line in every command:
    never a traceback, never a crash, never a partial output."""
    path = tmp_path / "crafted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save({"x": _crafted()[what], "w": torch.ones(2)}, path)
    for argv in (["inspect", path, "--json"], ["stats", path, "--json"], ["convert", path, tmp_path / "o.pt"]):
        r = run(*argv)
        if r.exit_code == 0:  # listed (the check that refuses it needs its values): the value commands refuse it
            assert argv[0] == "inspect", (what, argv[0])
            continue
        assert r.exit_code == 1 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1, (what, r.stderr)
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "o.pt").exists()

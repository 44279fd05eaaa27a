"""`paramtool grad`: the chapter's forward pass and gradients, checked against torch's own backward pass.

Every expected number here is computed independently in the test: the same model built under the same seed,
`torch.manual_seed(seed); X = torch.rand(*shape)`, `net(X).sum().backward()`, then `.grad`.
"""
from __future__ import annotations

import copy
import importlib.util
import re

import pytest
import torch
from torch import nn

from paramtool import grad as grads
from paramtool.errors import UsageError

NET = "nn:Sequential(Linear(20, 256), ReLU(), Linear(256, 10))"
SHARED = "nn:let s = Linear(8, 8) in Sequential(Linear(4, 8), ReLU(), s, ReLU(), s, ReLU(), Linear(8, 1))"
NEEDS_MODEL = "error: grad needs a model: give nn:EXPR, FILE.py:FUNC or a pickled module"

FACTORY = '''
import torch
from torch import nn


def block1():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU())


def block2():
    net = nn.Sequential()
    for i in range(4):
        net.add_module(f"block {i}", block1())
    return net


def rgnet():
    return nn.Sequential(block2(), nn.Linear(4, 1))


class WithUnused(nn.Module):
    """A layer that forward never calls: DistributedDataParallel's 'unused parameters'."""

    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 3)
        self.frozen = nn.Linear(3, 2)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.frozen(self.used(x))


def with_unused():
    return WithUnused()


def param_tied():
    """One Parameter registered under two names (0.weight and 2.weight), in two modules."""
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    return nn.Sequential(a, nn.Tanh(), b)


def nan_weights():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    with torch.no_grad():
        net[0].weight.fill_(float("nan"))
    return net


def state_dict():
    return nn.Linear(2, 2).state_dict()
'''


@pytest.fixture
def models(tmp_path):
    """The factory file, and the same file imported here so the test can build the models itself."""
    path = tmp_path / "models.py"
    path.write_text(FACTORY)
    spec = importlib.util.spec_from_file_location(f"grad_models_{id(path)}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module


def torch_backward(net: nn.Module, seed: int, *shapes: tuple[int, ...]) -> torch.Tensor:
    """What the chapter does: a seeded torch.rand input, net(X), output.sum().backward()."""
    torch.manual_seed(seed)
    xs = [torch.rand(*s) for s in shapes]
    out = net(*xs)
    out.sum().backward()
    return out


def seeded(seed: int, build):
    torch.manual_seed(seed)
    return build()


def by_name(doc: dict) -> dict:
    return {p["name"]: p for p in doc["params"]}


def assert_matches_torch(param: dict, g: torch.Tensor) -> None:
    g = g.double()
    assert param["has_grad"] is True
    assert param["shape"] == list(g.shape)
    assert param["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-6, abs=1e-9)
    assert param["grad_mean"] == pytest.approx(float(g.mean()), rel=1e-6, abs=1e-9)
    assert param["grad_max_abs"] == pytest.approx(float(g.abs().max()), rel=1e-6, abs=1e-9)


# --- the chapter's net --------------------------------------------------------------------------------------


def test_net_gradients_equal_torchs_own(run):
    r = run("grad", NET, "--input", "2,20", "--seed", "3", "--json")
    assert r.exit_code == 0, r.stderr
    doc = r.json()
    net = seeded(3, lambda: nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 10)))
    out = torch_backward(net, 3, (2, 20))
    assert doc["inputs"] == [[2, 20]] and doc["loss"] == "output.sum()" and doc["seed"] == 3
    assert doc["output"]["shape"] == [2, 10]
    assert doc["output"]["values"] == pytest.approx(out.detach().reshape(-1)[:16].tolist(), rel=1e-6)
    params = by_name(doc)
    assert list(params) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    for name, p in net.named_parameters():
        assert_matches_torch(params[name], p.grad)
        assert params[name]["names"] == [name]
        assert params[name]["uses"][0]["at"] == name.split(".")[0] and len(params[name]["uses"]) == 1
        assert params[name]["sum_error"] == 0.0


def test_net_text_shows_forward_backward_and_table(run):
    r = run("grad", NET, "--input", "2x20")
    assert r.exit_code == 0, r.stderr
    net = seeded(0, lambda: nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 10)))
    out = torch_backward(net, 0, (2, 20))
    lines = r.stdout.splitlines()
    assert "output: [2, 10]" in lines
    assert repr(out.detach()) in r.stdout  # as print(net(X)) shows the values
    assert "backward: output.sum()" in lines
    row = next(line for line in lines if line.startswith("2.weight "))
    assert "[10, 256]" in row and f"{float(net[2].weight.grad.double().norm()):.4g}" in row
    assert "no gradient" not in r.stdout and r.stderr == ""


def test_core_gradient_is_torchs_grad_exactly():
    """The reported gradient is the very .grad torch computes: bit-equal to a copy's own backward pass."""
    net = seeded(0, lambda: nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 10)))
    twin = copy.deepcopy(net)
    state = torch.random.get_rng_state()
    report = grads.compute(net, [(2, 20)], seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    torch_backward(twin, 5, (2, 20))
    for p, (name, q) in zip(report.params, twin.named_parameters()):
        assert p.names == [name] and torch.equal(p.grad, q.grad)


# --- rgnet: nested blocks from a factory --------------------------------------------------------------------


def test_rgnet_from_factory_equals_torch(run, models):
    path, module = models
    r = run("grad", f"{path}:rgnet", "--input", "2,4", "--json")
    assert r.exit_code == 0, r.stderr
    net = seeded(0, module.rgnet)
    torch_backward(net, 0, (2, 4))
    params = by_name(r.json())
    assert list(params) == [n for n, _ in net.named_parameters()]
    assert "0.block 1.0.weight" in params
    for name, p in net.named_parameters():
        assert_matches_torch(params[name], p.grad)


def test_rgnet_layer_selects_as_indexing_does(run, models):
    path, module = models
    r = run("grad", f"{path}:rgnet", "--input", "2,4", "--layer", "[0][1][0]", "--json")
    assert r.exit_code == 0, r.stderr
    assert [p["name"] for p in r.json()["params"]] == ["0.block 1.0.weight", "0.block 1.0.bias"]
    net = seeded(0, module.rgnet)
    torch_backward(net, 0, (2, 4))
    assert_matches_torch(r.json()["params"][0], net[0][1][0].weight.grad)


# --- the tied `shared` network ------------------------------------------------------------------------------


def _shared_parts(seed: int):
    """The shared network as nnspec builds it (the let binding first), and an untied twin of it."""
    torch.manual_seed(seed)
    s, first, last = nn.Linear(8, 8), nn.Linear(4, 8), nn.Linear(8, 1)
    tied = nn.Sequential(first, nn.ReLU(), s, nn.ReLU(), s, nn.ReLU(), last)
    untied = nn.Sequential(copy.deepcopy(first), nn.ReLU(), copy.deepcopy(s), nn.ReLU(), copy.deepcopy(s), nn.ReLU(),
                           copy.deepcopy(last))
    return tied, untied


def test_shared_reported_once_with_uses_that_add_up(run):
    r = run("grad", SHARED, "--input", "2,4", "--seed", "1", "--json")
    assert r.exit_code == 0, r.stderr
    tied, untied = _shared_parts(1)
    torch_backward(tied, 1, (2, 4))
    torch_backward(untied, 1, (2, 4))  # the two copies' gradients are what each use contributes
    params = by_name(r.json())
    assert list(params) == ["0.weight", "0.bias", "2.weight", "2.bias", "6.weight", "6.bias"]
    for attr in ("weight", "bias"):
        p = params[f"2.{attr}"]
        assert p["names"] == [f"2.{attr}", f"4.{attr}"]
        assert_matches_torch(p, getattr(tied[2], attr).grad)
        at2, at4 = getattr(untied[2], attr).grad, getattr(untied[4], attr).grad
        assert torch.allclose(at2 + at4, getattr(tied[2], attr).grad, atol=1e-6)
        assert [u["at"] for u in p["uses"]] == ["2", "4"]
        assert p["uses"][0]["norm"] == pytest.approx(float(at2.double().norm()), rel=1e-5)
        assert p["uses"][1]["norm"] == pytest.approx(float(at4.double().norm()), rel=1e-5)
        assert 0 <= p["sum_error"] < 1e-6


def test_shared_core_uses_sum_to_grad():
    tied, _ = _shared_parts(0)
    report = grads.compute(tied, [(3, 4)], seed=0)
    p = next(p for p in report.params if p.name == "2.weight")
    assert p.grad is tied[2].weight.grad
    assert [u.at for u in p.uses] == ["2", "4"]
    assert torch.allclose(p.uses[0].grad + p.uses[1].grad, p.grad, atol=1e-6)
    assert not torch.allclose(p.uses[0].grad, p.uses[1].grad)  # two different contributions
    assert isinstance(tied[2].weight, nn.Parameter)  # the module is given its parameter back


def test_shared_text_line(run):
    r = run("grad", SHARED, "--input", "2,4")
    assert r.exit_code == 0, r.stderr
    line = next(line for line in r.stdout.splitlines() if line.startswith("2.weight = 4.weight: "))
    tied, _ = _shared_parts(0)
    torch_backward(tied, 0, (2, 4))
    assert f"‖g‖ {float(tied[2].weight.grad.double().norm()):.4g}, the norm of the vector sum of 2 uses: use at 2 ‖g‖ " in line
    assert ", use at 4 ‖g‖ " in line and "sum error" in line


def test_one_parameter_under_two_names(run, models):
    path, module = models
    r = run("grad", f"{path}:param_tied", "--input", "2,4", "--json")
    assert r.exit_code == 0, r.stderr
    net = seeded(0, module.param_tied)
    torch_backward(net, 0, (2, 4))
    params = by_name(r.json())
    p = params["0.weight"]
    assert p["names"] == ["0.weight", "2.weight"] and "2.weight" not in params
    assert_matches_torch(p, net[0].weight.grad)
    assert [u["at"] for u in p["uses"]] == ["0", "2"] and p["sum_error"] < 1e-6
    assert_matches_torch(params["2.bias"], net[2].bias.grad)


# --- parameters without a gradient --------------------------------------------------------------------------


def test_unused_parameter_has_no_gradient(run, models):
    path, module = models
    r = run("grad", f"{path}:with_unused", "--input", "5,4", "--json")
    assert r.exit_code == 0, r.stderr
    net = seeded(0, module.with_unused)
    torch_backward(net, 0, (5, 4))
    params = by_name(r.json())
    for name in ("unused.weight", "unused.bias"):
        assert params[name]["has_grad"] is False and params[name]["grad_norm"] is None
        assert params[name]["uses"] == [] and params[name]["sum_error"] is None
    assert params["frozen.weight"]["has_grad"] is False and params["frozen.weight"]["requires_grad"] is False
    assert_matches_torch(params["used.weight"], net.used.weight.grad)
    text = run("grad", f"{path}:with_unused", "--input", "5,4").stdout
    assert next(line for line in text.splitlines() if line.startswith("unused.weight ")).rstrip().endswith("no gradient")
    assert "no gradient (requires_grad=False)" in text


def test_no_gradient_is_highlighted(models):
    from rich.console import Console

    from paramtool import render

    _, module = models
    report = grads.compute(module.with_unused(), [(2, 4)], seed=0)
    console = Console(record=True, force_terminal=True, color_system="standard", width=120)
    console.print(render.grad_table(report.params))
    ansi = console.export_text(styles=True)
    assert re.search(r"unused\.weight .*\x1b\[1;31m *no gradient\x1b\[0m", ansi)  # bold red


def test_non_finite_numbers_are_strings(run, models):
    path, _ = models
    r = run("grad", f"{path}:nan_weights", "--input", "2,4", "--json")
    assert r.exit_code == 0, r.stderr
    assert "NaN" not in r.stdout
    doc = r.json()
    assert doc["output"]["values"] == ["nan", "nan"]
    assert by_name(doc)["1.weight"]["grad_norm"] == "nan"


# --- inputs and seeds -----------------------------------------------------------------------------------------


def test_several_inputs_are_several_arguments(run):
    r = run("grad", "nn:Bilinear(3, 4, 2)", "--input", "5,3", "--input", "5,4", "--seed", "7", "--json")
    assert r.exit_code == 0, r.stderr
    net = seeded(7, lambda: nn.Bilinear(3, 4, 2))
    torch_backward(net, 7, (5, 3), (5, 4))
    assert r.json()["inputs"] == [[5, 3], [5, 4]]
    assert_matches_torch(by_name(r.json())["weight"], net.weight.grad)


def test_module_called_in_a_loop_has_one_use_per_call(tmp_path):
    path = tmp_path / "loop.py"
    path.write_text("from torch import nn\n\n"
                    "class Loop(nn.Module):\n"
                    "    def __init__(self):\n"
                    "        super().__init__()\n"
                    "        self.lin = nn.Linear(3, 3)\n\n"
                    "    def forward(self, x):\n"
                    "        for _ in range(3):\n"
                    "            x = self.lin(x).tanh()\n"
                    "        return x\n\n"
                    "def build():\n    return Loop()\n")
    from paramtool import sources

    net = grads.build_model(sources.resolve(f"{path}:build"), seed=0)
    twin = copy.deepcopy(net)
    report = grads.compute(net, [(2, 3)], seed=0)
    torch_backward(twin, 0, (2, 3))
    p = report.params[0]
    assert p.name == "lin.weight" and torch.equal(p.grad, twin.lin.weight.grad)
    assert [u.at for u in p.uses] == ["lin call 1", "lin call 2", "lin call 3"]
    assert torch.allclose(sum(u.grad for u in p.uses), p.grad, atol=1e-6) and p.sum_error < 1e-6


def test_model_in_another_dtype_gets_inputs_of_its_dtype(run):
    r = run("grad", "nn:Linear(4, 2, dtype='float64')", "--input", "3,4", "--json")
    assert r.exit_code == 0, r.stderr
    net = seeded(0, lambda: nn.Linear(4, 2, dtype=torch.float64))
    torch.manual_seed(0)
    net(torch.rand(3, 4).to(torch.float64)).sum().backward()
    assert r.json()["input_dtype"] == "float64" and r.json()["output"]["dtype"] == "float64"
    assert_matches_torch(by_name(r.json())["weight"], net.weight.grad)


def test_seed_makes_runs_reproducible(run):
    a = run("grad", NET, "--input", "2,20", "--seed", "4", "--json").json()
    b = run("grad", NET, "--input", "2,20", "--seed", "4", "--json").json()
    c = run("grad", NET, "--input", "2,20", "--seed", "5", "--json").json()
    assert a == b and a["output"] != c["output"]


@pytest.mark.parametrize("text, shape", [("2,20", (2, 20)), ("2x20", (2, 20)), ("(2, 20)", (2, 20)),
                                         ("[2,3,4]", (2, 3, 4)), ("7", (7,)), (" 2 x 3 ", (2, 3))])
def test_parse_shape(text, shape):
    assert grads.parse_shape(text) == shape


@pytest.mark.parametrize("text", ["", "2,,3", "a", "2x3,4", "-1,2", "2.5", "2,x"])
def test_bad_shape_is_a_usage_error(run, text):
    with pytest.raises(UsageError):
        grads.parse_shape(text)
    r = run("grad", NET, "--input", text)
    assert r.exit_code == 2 and r.stderr.startswith("error: --input") and len(r.stderr.splitlines()) == 1


# --- pickled models -------------------------------------------------------------------------------------------


def test_pickled_model_rebuilt_without_torch_load(run, tmp_path, monkeypatch):
    tied, _ = _shared_parts(2)
    net = nn.Sequential(*tied, nn.Unflatten(1, (1, 1)), nn.Conv1d(1, 2, 3, padding=1), nn.BatchNorm1d(2),
                        nn.Flatten())
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    expected = copy.deepcopy(net)
    torch_backward(expected, 0, (3, 4))

    def refuse(*args, **kwargs):
        raise AssertionError("grad must not unpickle the model with torch.load")

    monkeypatch.setattr(torch, "load", refuse)
    r = run("grad", path, "--input", "3,4", "--json")
    assert r.exit_code == 0, r.stderr
    params = by_name(r.json())
    assert params["2.weight"]["names"] == ["2.weight", "4.weight"]
    assert [u["at"] for u in params["2.weight"]["uses"]] == ["2", "4"]
    for name, p in expected.named_parameters():
        assert_matches_torch(params[name], p.grad)


def test_pickled_lstm_tuple_output(run, tmp_path):
    """A forward returning (output, (h, c)): every tensor printed, the loss is the sum of their sums."""
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 3, batch_first=True)
    path = tmp_path / "lstm.pt"
    torch.save(lstm, path)
    torch.manual_seed(0)
    out, (h, c) = lstm(torch.rand(2, 5, 4))
    (out.sum() + h.sum() + c.sum()).backward()
    r = run("grad", path, "--input", "2,5,4", "--json")
    assert r.exit_code == 0, r.stderr
    doc = r.json()
    assert doc["loss"] == "output[0].sum() + output[1][0].sum() + output[1][1].sum()"
    assert [o["at"] for o in doc["outputs"]] == ["output[0]", "output[1][0]", "output[1][1]"]
    assert doc["output"]["shape"] == [2, 5, 3] and doc["outputs"][1]["shape"] == [1, 2, 3]
    for name, p in lstm.named_parameters():
        assert_matches_torch(by_name(doc)[name], p.grad)
    text = run("grad", path, "--input", "2,5,4").stdout
    assert "output[1][1]: [1, 2, 3]" in text and repr(c.detach()) in text


def test_rebuilt_module_is_the_saved_one(tmp_path):
    from paramtool import sources

    net = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8, 3))
    net.eval()
    path = tmp_path / "m.pt"
    torch.save(net, path)
    rebuilt = grads.build_model(sources.resolve(str(path)), seed=0)
    assert [type(m) for m in rebuilt.modules()] == [type(m) for m in net.modules()]
    assert not rebuilt.training and rebuilt[0].stride == (2, 2)
    x = torch.rand(2, 1, 4, 4)
    assert torch.equal(rebuilt(x), net(x))


# --- errors ---------------------------------------------------------------------------------------------------


def test_state_dict_file_is_an_error(run, tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    r = run("grad", path, "--input", "2,2")
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [f"error: {path}: a state dict, not a whole model; {NEEDS_MODEL[7:]}"]


def test_safetensors_and_factory_state_dict_are_errors(run, tmp_path, models):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file(nn.Linear(2, 2).state_dict(), str(path))
    for source in (path, f"{models[0]}:state_dict"):
        r = run("grad", source, "--input", "2,2")
        assert r.exit_code == 1 and len(r.stderr.splitlines()) == 1
        assert r.stderr.rstrip().endswith(NEEDS_MODEL[7:])


def test_wrong_input_shape_quotes_torch(run):
    r = run("grad", NET, "--input", "2,3")
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [
        "error: forward pass failed on input [2, 3]: mat1 and mat2 shapes cannot be multiplied (2x3 and 20x256)"]


def test_missing_input_is_a_usage_error(run):
    r = run("grad", NET)
    assert r.exit_code == 2 and "--input" in r.stderr


def test_legacy_pickled_model_runs_too(run, tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    path = tmp_path / "legacy.pt"
    torch.save(net, path, _use_new_zipfile_serialization=False)
    doc = run("grad", path, "--input", "2,2", "--json").json()
    torch.manual_seed(0)
    net(torch.rand(2, 2)).sum().backward()
    got = {p["name"]: p["grad_norm"] for p in doc["params"]}
    assert got == pytest.approx({n: p.grad.norm().item() for n, p in net.named_parameters()}, rel=1e-5)


def test_grad_is_documented():
    """The README's command table lists `grad`; the reference documents its JSON."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    assert "| `paramtool grad SOURCE --input SHAPE" in (root / "README.md").read_text()
    assert '"sum_error"' in (root / "docs" / "reference.md").read_text()

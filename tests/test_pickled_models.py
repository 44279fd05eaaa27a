"""Tensors wherever torch.save put them: a whole pickled model of a class paramtool does not know (as a
torchvision or timm model is) is listed by the names ``model.state_dict()`` gives, read inertly, and every
command works on it; a tensor inside any other object is named by its attribute path."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

MODELS = textwrap.dedent('''
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(c)
            self.register_buffer("scratch", torch.zeros(2), persistent=False)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x))) + x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3)
            self.layer1 = nn.Sequential(Block(4), Block(4))
            shared = nn.Linear(4, 4)
            self.head = nn.ModuleDict({"a": shared, "b": shared})
            self.fc = nn.Linear(4, 2)
            self.register_buffer("mean", torch.tensor([0.5, 0.4, 0.3]))
            self.temperature = nn.Parameter(torch.ones(1))

        def forward(self, x):
            x = self.layer1(self.stem(x)).mean((2, 3))
            return self.fc(self.head["b"](self.head["a"](x))) * self.temperature
''')


@pytest.fixture
def pickled_model(tmp_path):
    (tmp_path / "mymodels.py").write_text(MODELS)
    code = textwrap.dedent('''
        import sys, torch, types
        sys.path.insert(0, sys.argv[1])
        import mymodels
        torch.manual_seed(0)
        m = mymodels.Net()
        m.layer1[0].bn.running_mean.uniform_()
        torch.save(m, sys.argv[1] + "/model.pt")
        torch.save(m.state_dict(), sys.argv[1] + "/state.pt")
        torch.save({"args": types.SimpleNamespace(lr=0.1, w=torch.arange(3.0)), "model": m}, sys.argv[1] + "/ckpt.pt")
    ''')
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    return tmp_path


def test_whole_pickled_model_lists_its_state_dict(pickled_model, run):
    expected = torch.load(pickled_model / "state.pt", weights_only=True)
    r = run("inspect", pickled_model / "model.pt", "--json")
    assert r.exit_code == 0, r.stderr
    listed = r.json()["tensors"]
    assert [t["name"] for t in listed] == list(expected)
    assert [t["shape"] for t in listed] == [list(t.shape) for t in expected.values()]
    assert "layer1.0.scratch" not in [t["name"] for t in listed]  # a non-persistent buffer is not state
    r = run("ties", pickled_model / "model.pt", "--json")
    assert {tuple(g["names"]) for g in r.json()["groups"]} == {("head.a.bias", "head.b.bias"),
                                                                ("head.a.weight", "head.b.weight")}
    r = run("diff", pickled_model / "model.pt", pickled_model / "state.pt", "--json")
    assert r.exit_code == 0 and r.json()["same"] == len(expected), r.stdout
    r = run("stats", pickled_model / "model.pt", "--json")
    assert r.exit_code == 0 and len(r.json()["tensors"]) == len(expected)


def test_edits_of_a_pickled_model_keep_its_pickle(pickled_model, run, tmp_path):
    out = tmp_path / "edited.pt"
    r = run("set", pickled_model / "model.pt", "fc.bias = 7", "layer1.1.bn.running_var[0] = 3", "-o", out)
    assert r.exit_code == 0, r.stderr
    code = (f"import sys, torch; sys.path.insert(0, {str(pickled_model)!r}); "
            f"m = torch.load({str(out)!r}, weights_only=False); "
            "assert type(m).__name__ == 'Net' and torch.equal(m.fc.bias, torch.full((2,), 7.0)); "
            "assert m.layer1[1].bn.running_var[0] == 3; assert m.head.a is m.head.b; "
            "print(m(torch.randn(1, 3, 6, 6)).shape)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    st = tmp_path / "m.safetensors"
    r = run("convert", pickled_model / "model.pt", "-o", st, "--drop-extra")
    assert r.exit_code == 0, r.stderr
    from safetensors.torch import load_file

    expected = torch.load(pickled_model / "state.pt", weights_only=True)
    got = load_file(str(st))
    assert set(got) | {"head.b.weight", "head.b.bias"} == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_tensor_inside_an_object_is_named_by_its_attribute_path(pickled_model, run):
    r = run("inspect", pickled_model / "ckpt.pt", "--json")
    assert r.exit_code == 0, r.stderr
    names = [t["name"] for t in r.json()["tensors"]]
    assert names[0] == "args.w" and "model.fc.weight" in names
    r = run("show", pickled_model / "ckpt.pt", "args.w", "--json")
    assert r.exit_code == 0 and r.json()["values"] == [0.0, 1.0, 2.0]

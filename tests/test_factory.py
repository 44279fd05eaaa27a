"""FILE.py:FUNC and package.module:FUNC sources: the user's own code, run on purpose."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from paramtool.errors import ParamtoolError
from paramtool.factory import call_factory, is_factory_spec

MODELS = textwrap.dedent("""
    import dataclasses
    import torch
    from ptfactory_neighbour import WIDTH  # a neighbour of this file


    @dataclasses.dataclass
    class Config:  # needs the module in sys.modules
        width: int = WIDTH


    def build():
        return torch.nn.Sequential(torch.nn.Linear(4, Config().width), torch.nn.ReLU())

    def state():
        return {"w": torch.ones(2, 3), "b": torch.zeros(3)}

    def checkpoint():
        return {"epoch": 3, "model": {"w": torch.ones(2)}}

    def lazy_import():
        from ptfactory_late import WIDTH as W  # imported when called, not when the file is loaded
        return torch.nn.Linear(W, 1)

    def bad():
        raise ValueError("nope")

    def exits():
        raise SystemExit(3)

    def number():
        return 3

    def empty():
        return {}

    def int_keys():
        return {0: torch.ones(1)}

    NOT_A_FUNCTION = 5
""")


@pytest.fixture
def models(tmp_path):
    (tmp_path / "ptfactory_neighbour.py").write_text("WIDTH = 8\n")
    (tmp_path / "ptfactory_late.py").write_text("WIDTH = 8\n")
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    before = list(sys.path)
    yield path
    assert sys.path == before  # the file's directory was on sys.path only while it ran


def test_is_factory_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_factory_spec("models.py:build")
    assert is_factory_spec("dir/models.py:build")
    assert is_factory_spec("pkg.mod:make") and is_factory_spec("mod:make")
    (tmp_path / "weird:name").write_text("")
    (tmp_path / "model.py:build").write_text("")  # an existing file, colon and all
    (tmp_path / "plain.pt").write_text("")
    for not_spec in ["-", "", "nn:Linear(1, 1)", "nn:Sequential()", "weird:name", "model.py:build",
                     str(tmp_path / "weird:name"), "plain.pt", "C:\\x", "C:x", "C:/models.py",
                     "model.pt:x", "ckpt.safetensors:w", "a.py:1x", "a.py:", "pkg.mod:make.more",
                     "pkg mod:make", str(tmp_path)]:
        assert not is_factory_spec(not_spec), not_spec


def test_file_factory_returning_a_module(models):
    net = call_factory(f"{models}:build")
    assert isinstance(net, torch.nn.Sequential)
    assert net[0].weight.shape == (8, 4)
    assert isinstance(call_factory(f"{models}:lazy_import"), torch.nn.Linear)


def test_file_factory_relative_path(models, monkeypatch):
    monkeypatch.chdir(models.parent)
    assert isinstance(call_factory("models.py:build"), torch.nn.Sequential)


def test_file_factory_returning_a_state_dict(models):
    sd = call_factory(f"{models}:state")
    assert set(sd) == {"w", "b"} and torch.equal(sd["w"], torch.ones(2, 3))
    nested = call_factory(f"{models}:checkpoint")  # a training checkpoint is a state dict too
    assert nested["epoch"] == 3


def test_module_factory(tmp_path, monkeypatch):
    pkg = tmp_path / "ptfactorypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(
        "import torch\n"
        "def tiny():\n    return torch.nn.Sequential(torch.nn.Linear(2, 3))\n"
        "def sd():\n    return {'x.weight': torch.ones(2, 2)}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    net = call_factory("ptfactorypkg.models:tiny")
    assert isinstance(net, torch.nn.Sequential) and net[0].weight.shape == (3, 2)
    assert set(call_factory("ptfactorypkg.models:sd")) == {"x.weight"}


def test_module_factory_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "ptfactory_cwd_mod.py").write_text("import torch\ndef make():\n    return torch.nn.Linear(1, 1)\n")
    monkeypatch.chdir(tmp_path)
    assert isinstance(call_factory("ptfactory_cwd_mod:make"), torch.nn.Linear)


def test_missing_function(models):
    with pytest.raises(ParamtoolError, match=r"has no function 'missing'"):
        call_factory(f"{models}:missing")
    with pytest.raises(ParamtoolError, match=r"'NOT_A_FUNCTION' is a int, not a function"):
        call_factory(f"{models}:NOT_A_FUNCTION")


def test_missing_file_and_module(tmp_path):
    with pytest.raises(ParamtoolError, match=r"no such file"):
        call_factory(f"{tmp_path}/absent.py:build")
    with pytest.raises(ParamtoolError, match=r"cannot import 'no_such_pkg_xyz.models'"):
        call_factory("no_such_pkg_xyz.models:tiny")


def test_factory_that_raises(models):
    with pytest.raises(ParamtoolError, match=r"^factory .*models\.py:bad raised ValueError: nope$"):
        call_factory(f"{models}:bad")
    with pytest.raises(ParamtoolError, match=r"sys\.exit\(3\)"):
        call_factory(f"{models}:exits")


def test_import_that_raises(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('at import\\nsecond line')\n")
    with pytest.raises(ParamtoolError) as e:
        call_factory(f"{broken}:build")
    assert "raised RuntimeError: at import second line" in str(e.value) and "\n" not in str(e.value)
    missing_dep = tmp_path / "needs.py"
    missing_dep.write_text("import no_such_dependency_xyz\n")
    with pytest.raises(ParamtoolError, match=r"ModuleNotFoundError.*no_such_dependency_xyz"):
        call_factory(f"{missing_dep}:build")


def test_factory_returning_something_else(models):
    with pytest.raises(ParamtoolError, match=r"returned int, not an nn.Module or a state dict"):
        call_factory(f"{models}:number")
    with pytest.raises(ParamtoolError, match=r"without any tensor"):
        call_factory(f"{models}:empty")
    with pytest.raises(ParamtoolError, match=r"non-string key"):
        call_factory(f"{models}:int_keys")


def test_not_a_spec():
    with pytest.raises(ParamtoolError, match=r"not FILE.py:FUNC"):
        call_factory("no colon here")

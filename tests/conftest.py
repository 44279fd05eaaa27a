"""Shared fixtures: sample checkpoints generated fresh into each test's tmp_path, and a CLI runner."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import sys
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load_generator():
    spec = importlib.util.spec_from_file_location("paramtool_samples", ROOT / "sample_models" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("paramtool_samples", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def samples(tmp_path: pathlib.Path) -> pathlib.Path:
    """A directory holding every sample model, made by the committed generator."""
    out = tmp_path / "samples"
    out.mkdir()
    _load_generator().generate(out)
    return out


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str
    stdout_bytes: bytes

    def json(self):
        return json.loads(self.stdout)


@pytest.fixture
def run():
    """Run the CLI in-process: run("inspect", path, "--json", input=b"...")."""
    from paramtool.cli import app

    runner = CliRunner()

    def _run(*args: str, input: bytes | None = None, env: dict | None = None) -> Result:
        r = runner.invoke(app, [str(a) for a in args], input=input, env=env, catch_exceptions=False)
        return Result(r.exit_code, r.stdout, r.stderr, r.stdout_bytes)

    return _run

"""Shared fixtures: sample checkpoints generated fresh into each test's tmp_path, and a CLI runner."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
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


def listing_without_torch(path, command: str = "inspect") -> subprocess.CompletedProcess:
    """Run `paramtool COMMAND PATH --json` in a fresh interpreter that must end without torch or numpy loaded."""
    code = (
        "import sys\n"
        "from paramtool.cli import main\n"
        f"sys.argv = ['paramtool', {command!r}, {str(path)!r}, '--json']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'numpy' not in sys.modules, 'numpy was imported'\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def rewrite_zip(src, dst, edit) -> None:
    """Copy a torch zip record by record; ``edit(name, data)`` returns new bytes, or None to drop the record."""
    import zipfile

    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w") as out:
        for info in z.infolist():
            data = edit(info.filename, z.read(info))
            if data is not None:
                out.writestr(info, data)


def vm_peak_kib(code: str) -> int:
    """The address space (VmPeak, KiB) a fresh interpreter reaches after running ``code``: the base a memory
    limit test adds its margin to."""
    out = subprocess.run([sys.executable, "-c", code + "\nprint(open('/proc/self/status').read()"
                          ".split('VmPeak:')[1].split()[0])"], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def address_space_limit(limit_bytes: int):
    """A ``preexec_fn`` that caps the child's address space (RLIMIT_AS) at ``limit_bytes``."""
    import resource

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return apply


def launch_without(args: list[str], forbidden: tuple[str, ...], entry: str = "paramtool.launch") -> subprocess.CompletedProcess:
    """``paramtool ARGS`` through ``entry``'s ``main`` (the installed entry point, or ``paramtool.cli`` for the
    full CLI) in a fresh interpreter, which exits with paramtool's status, or with 99 if any ``forbidden``
    module was imported on the way."""
    code = (
        "import sys\n"
        f"from {entry} import main\n"
        f"sys.argv = ['paramtool', *{args!r}]\n"
        "code = 0\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        f"loaded = [m for m in {forbidden!r} if m in sys.modules]\n"
        "if loaded:\n    sys.stderr.write(f'imported: {loaded}')\n    sys.exit(99)\n"
        "sys.exit(code)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)

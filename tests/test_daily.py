"""Daily habits (issue 26): positional paths where a name is taken, quoted suggestions, -o extensions,
device targets for every source, config-tied names in every command."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file


def test_positional_paths_in_show_set_resize(samples, tmp_path, run):
    rgnet = samples / "rgnet.pt"
    sd = torch.load(rgnet, weights_only=True)
    r = run("show", rgnet, "[0][1][0].bias", "--json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["values"] == sd["0.block 1.0.bias"].tolist()
    out = tmp_path / "o.pt"
    r = run("set", rgnet, "[0][1][0].bias[0] = 5", "-o", out)
    assert r.exit_code == 0, r.stderr
    assert torch.load(out, weights_only=True)["0.block 1.0.bias"][0] == 5
    r = run("resize", rgnet, "[0][1][0].weight", "--rows", "3", "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["changed"] == ["0.block 1.0.weight"]
    r = run("show", rgnet, "[0][9].bias")
    assert r.exit_code == 1 and "no index 9" in r.stderr


def test_suggestions_are_quoted(samples, run):
    r = run("show", samples / "rgnet.pt", "0.block 1.0.bia")
    assert r.exit_code == 1
    assert "did you mean '0.block 1.0.bias'" in r.stderr


@pytest.mark.parametrize("ext", [".gguf", ".onnx", ".npz"])
def test_output_extension_not_honoured_is_refused(samples, tmp_path, run, ext):
    target = tmp_path / f"x{ext}"
    r = run("convert", samples / "mlp.pt", target)
    assert r.exit_code == 2 and "paramtool does not write" in r.stderr and not target.exists()
    r = run("convert", samples / "mlp.pt", target, "--format", "safetensors")  # said explicitly: written
    assert r.exit_code == 0 and load_file(target).keys() == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_device_target_for_nn_source(run):
    r = run("init", "nn:Sequential(Linear(2, 2))", "--scheme", "zeros", "-o", "/dev/null")
    assert r.exit_code == 0, r.stderr
    assert "wrote /dev/null (pt)" in r.stderr


@pytest.fixture
def gpt2_dir(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)).save_pretrained(tmp_path / "g")
    return tmp_path / "g"


def test_config_tied_names_in_every_command(gpt2_dir, tmp_path, run):
    r = run("stats", gpt2_dir, "--layer", "lm_head", "--json")
    assert r.exit_code == 0, r.stderr
    assert [t["name"] for t in r.json()["tensors"]] == ["transformer.wte.weight"]
    assert r.stderr.count("lm_head.weight is stored as transformer.wte.weight") == 1
    r = run("init", gpt2_dir, "--layer", "lm_head", "--scheme", "zeros", "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["changed"] == ["transformer.wte.weight"]
    out = tmp_path / "out"
    r = run("set", gpt2_dir, "lm_head.weight[0, 0] = 7", "-o", out)
    assert r.exit_code == 0, r.stderr
    assert load_file(out / "model.safetensors")["transformer.wte.weight"][0, 0] == 7
    assert json.loads((out / "config.json").read_text()) == json.loads((gpt2_dir / "config.json").read_text())


def test_directory_cast_updates_config_dtype(gpt2_dir, tmp_path, run):
    import transformers

    out = tmp_path / "bf16"
    r = run("convert", gpt2_dir, "-o", out, "--dtype", "bf16")
    assert r.exit_code == 0, r.stderr
    old, new = (json.loads((d / "config.json").read_text()) for d in (gpt2_dir, out))
    keys = [k for k in ("torch_dtype", "dtype") if k in old] or ["torch_dtype"]
    assert {k: new[k] for k in keys} == {k: "bfloat16" for k in keys}
    assert {k: v for k, v in new.items() if k not in keys} == {k: v for k, v in old.items() if k not in keys}
    model = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype="auto")
    assert model.dtype == torch.bfloat16
    # in place: weights and config.json change together
    r = run("convert", gpt2_dir, "--in-place", "--dtype", "fp16")
    assert r.exit_code == 0, r.stderr
    assert "float16" in {json.loads((gpt2_dir / "config.json").read_text()).get(k) for k in keys}


def test_fp8_under_dtype_is_refused_by_name(tmp_path, run):
    from safetensors.torch import save_file

    save_file({"l.weight": torch.randn(4, 4).to(torch.float8_e4m3fn), "l.weight_scale_inv": torch.ones(1),
               "l.bias": torch.zeros(4)}, tmp_path / "q.safetensors")
    r = run("convert", tmp_path / "q.safetensors", tmp_path / "o.safetensors", "--dtype", "bf16")
    assert r.exit_code == 1 and "are FP8 (l.weight)" in r.stderr and not (tmp_path / "o.safetensors").exists()
    r = run("convert", tmp_path / "q.safetensors", tmp_path / "o.safetensors", "--dtype", "bf16",
            "--keep-dtype", "l.weight", "--keep-dtype", "l.weight_scale_inv")
    assert r.exit_code == 0, r.stderr
    got = load_file(tmp_path / "o.safetensors")
    assert got["l.weight"].dtype == torch.float8_e4m3fn and got["l.bias"].dtype == torch.bfloat16


def test_make_demo_installs_runtime_only_and_test_the_extras():
    import pathlib
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = pathlib.Path(__file__).resolve().parent.parent
    demo = subprocess.run(["make", "-n", "-B", "demo"], cwd=root, capture_output=True, text=True, check=True).stdout
    test = subprocess.run(["make", "-n", "-B", "test"], cwd=root, capture_output=True, text=True, check=True).stdout
    installs = [line for line in demo.splitlines() if "pip install" in line]
    assert installs and all(line.rstrip().endswith("-e .") for line in installs), installs
    assert any('-e ".[dev,test]"' in line for line in test.splitlines() if "pip install" in line)


def test_keep_dtype_takes_config_tied_names(gpt2_dir, run):
    r = run("convert", gpt2_dir, "-o", gpt2_dir.parent / "o", "--dtype", "bf16", "--keep-dtype", "lm_head",
            "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    assert "transformer.wte.weight" not in r.json()["changed"] and "transformer.wpe.weight" in r.json()["changed"]


def test_pip_install_gives_a_working_paramtool(tmp_path, samples):
    """`pip install .` from a checkout: the wheel built from pyproject.toml installs a `paramtool` command into a
    clean environment (its dependencies reached through a .pth file: no network) that runs."""
    import pathlib
    import shutil
    import subprocess
    import sys
    import sysconfig

    root = pathlib.Path(__file__).resolve().parent.parent
    tree = tmp_path / "checkout"
    shutil.copytree(root / "src" / "paramtool", tree / "src" / "paramtool",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, tree / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(tree)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("paramtool-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, safetensors, typer, rich
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps", "-q",
                    str(wheel)], check=True, capture_output=True)
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    version = subprocess.run([str(venv / "bin" / "paramtool"), "--version"], capture_output=True, text=True, env=env)
    assert version.returncode == 0 and version.stdout.startswith("paramtool "), version.stderr
    r = subprocess.run([str(venv / "bin" / "paramtool"), "inspect", str(samples / "mlp.pt"), "--json"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["num_tensors"] == 4, r.stderr

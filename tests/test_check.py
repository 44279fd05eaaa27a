"""paramtool check: the health rules, exit codes, --json and several sources (issue 26)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file


def _blocks(n: int = 4, scale_block: int | None = None) -> dict:
    torch.manual_seed(0)
    sd = {}
    for i in range(n):
        sd[f"h.{i}.fc.weight"] = torch.randn(8, 8) * 0.02 * (100 if i == scale_block else 1)
        sd[f"h.{i}.fc.bias"] = torch.zeros(8)  # 1-D zeros: a fresh bias, not a finding
        sd[f"h.{i}.ln.weight"] = torch.ones(8)
    return sd


def _findings(run, *args):
    r = run("check", *args, "--json")
    return r, [json.loads(line) for line in r.stdout.splitlines()]


def test_clean_exits_0(tmp_path, run):
    save_file(_blocks(), tmp_path / "m.safetensors")
    r, docs = _findings(run, tmp_path / "m.safetensors")
    assert r.exit_code == 0, r.stderr
    assert docs == [{"source": str(tmp_path / "m.safetensors"), "clean": True, "findings": []}]
    r = run("check", tmp_path / "m.safetensors")
    assert r.exit_code == 0 and r.stdout == "" and "no findings" in r.stderr


def test_nan_inf_zero_constant(tmp_path, run):
    sd = _blocks()
    sd["h.0.fc.weight"][1, 2] = float("nan")
    sd["h.1.fc.bias"][3] = float("inf")
    sd["h.2.fc.weight"] = torch.zeros(8, 8)
    sd["h.3.fc.weight"] = torch.full((8, 8), 0.5)
    torch.save(sd, tmp_path / "m.pt")
    r, docs = _findings(run, tmp_path / "m.pt")
    assert r.exit_code == 1
    got = {(f["rule"], f["name"]) for f in docs[0]["findings"]}
    assert {("nan", "h.0.fc.weight"), ("inf", "h.1.fc.bias"), ("zero", "h.2.fc.weight"),
            ("constant", "h.3.fc.weight")} <= got
    r = run("check", tmp_path / "m.pt")
    lines = r.stdout.splitlines()
    assert f"{tmp_path / 'm.pt'}: nan: h.0.fc.weight: 1 NaN of 64 values" in lines
    assert r.exit_code == 1


def test_outlier_among_repeated_blocks(tmp_path, run):
    save_file(_blocks(6, scale_block=4), tmp_path / "m.safetensors")
    r, docs = _findings(run, tmp_path / "m.safetensors")
    assert r.exit_code == 1
    (f,) = docs[0]["findings"]
    assert f["rule"] == "outlier" and f["name"] == "h.4.fc.weight" and "h.#.fc.weight" in f["message"]
    # the threshold is an option: 200× is not far enough for a 100× block
    r, docs = _findings(run, tmp_path / "m.safetensors", "--outlier-factor", "200")
    assert r.exit_code == 0, docs


def test_optimizer_state_shape(tmp_path, run):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    good = {"epoch": 1, "model": model.state_dict(), "optimizer": opt.state_dict()}
    torch.save(good, tmp_path / "good.ckpt")
    bad = {"epoch": 1, "model": model.state_dict(), "optimizer": opt.state_dict()}
    bad["optimizer"]["state"][2]["exp_avg"] = torch.zeros(3, 3)
    bad["optimizer"]["state"][2]["exp_avg_sq"] = torch.zeros(3, 3)
    torch.save(bad, tmp_path / "bad.ckpt")
    r, docs = _findings(run, tmp_path / "good.ckpt")
    assert r.exit_code == 0, docs
    r, docs = _findings(run, tmp_path / "bad.ckpt")
    assert r.exit_code == 1
    (f,) = docs[0]["findings"]
    assert f["rule"] == "optimizer-shape" and f["name"] == "2.weight" and "[3, 3]" in f["message"]


def test_mixed_dtypes(tmp_path, run):
    sd = _blocks()
    sd["h.1.fc.weight"] = sd["h.1.fc.weight"].to(torch.bfloat16)
    save_file(sd, tmp_path / "m.safetensors")
    r, docs = _findings(run, tmp_path / "m.safetensors")
    assert r.exit_code == 1
    (f,) = docs[0]["findings"]
    assert f["rule"] == "mixed-dtype" and "h.1.fc.weight" in f["message"] and "3 float32, 1 bfloat16" in f["message"]
    assert run("check", tmp_path / "m.safetensors", "--ignore", "mixed-dtype").exit_code == 0
    assert run("check", tmp_path / "m.safetensors", "--ignore", "nope").exit_code == 2


def test_diverged_config_tie(tmp_path, run):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "tie_word_embeddings": True}))
    save_file({"transformer.wte.weight": torch.randn(10, 4), "lm_head.weight": torch.randn(10, 4)}, d / "model.safetensors")
    r, docs = _findings(run, d)
    assert r.exit_code == 1
    assert [(f["rule"], f["name"]) for f in docs[0]["findings"]] == [("tie-diverged", "lm_head.weight")]


def test_several_sources_worst_exit(tmp_path, run):
    save_file(_blocks(), tmp_path / "ok.safetensors")
    sd = _blocks()
    sd["h.0.fc.weight"][0, 0] = float("nan")
    save_file(sd, tmp_path / "nan.safetensors")
    (tmp_path / "text.pt").write_text("hello\n")
    r, docs = _findings(run, tmp_path / "ok.safetensors", tmp_path / "nan.safetensors")
    assert r.exit_code == 1 and [d["clean"] for d in docs] == [True, False]
    r = run("check", tmp_path / "ok.safetensors", tmp_path / "text.pt", tmp_path / "nan.safetensors", "--json")
    assert r.exit_code == 2  # an unreadable source is an error: 2, the worst
    assert len(r.stdout.splitlines()) == 2 and "text.pt" in r.stderr and r.stderr.startswith("error:")


@pytest.mark.parametrize("command", ["inspect", "stats", "ties"])
def test_read_commands_take_several_sources(samples, run, command):
    a, b = samples / "mlp.pt", samples / "tied.safetensors"
    r = run(command, a, b, "--json")
    assert r.exit_code == 0, r.stderr
    docs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [d["source"] for d in docs] == [str(a), str(b)]
    assert docs[0] == run(command, a, "--json").json()
    r = run(command, a, b)
    assert r.stdout.startswith(f"==> {a} <==\n") and f"\n==> {b} <==\n" in r.stdout
    r = run(command, a, samples / "missing.pt", "--json")
    assert r.exit_code == 1 and len(r.stdout.splitlines()) == 1 and "missing.pt: no such file" in r.stderr


def test_version(run):
    from paramtool import __version__

    r = run("--version")
    assert r.exit_code == 0 and r.stdout == f"paramtool {__version__}\n"


@pytest.mark.parametrize("command", ["inspect", "stats", "ties"])
def test_several_sources_fast_path_matches_full_cli(samples, run, command):
    """`paramtool inspect a b --json` (files) is answered before typer is imported, with the full CLI's output."""
    import subprocess
    import sys

    a, b = str(samples / "mlp.pt"), str(samples / "tied.safetensors")
    code = ("import sys\nfrom paramtool.launch import main\n"
            f"sys.argv = ['paramtool', {command!r}, {a!r}, {b!r}, '--json']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "assert 'typer' not in sys.modules, 'typer was imported'\n")
    fast = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert fast.returncode == 0, fast.stderr
    assert fast.stdout == run(command, a, b, "--json").stdout

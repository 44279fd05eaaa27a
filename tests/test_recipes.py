"""Every example in `paramtool COMMAND --help` and every command line in the shell blocks of README.md, docs/*.md
and benchmarks/README.md runs as written, against files generated here under the names they use (issue 26); the
README stays short, and every relative link in those documents leads somewhere (issue 24)."""
from __future__ import annotations

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _mlp() -> dict:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).state_dict()


def _gpt2() -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=16))
    return {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def _merge_and_lora_files(ws: pathlib.Path, mlp: dict) -> None:
    """What the merge and LoRA examples name: a run's checkpoints, two safetensors files, model directories of
    one tiny GPT-2 architecture (base, fine-tunes, a and b) and a PEFT adapter of the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    (ws / "run").mkdir()
    for i in (8, 9, 10):
        torch.save({"epoch": i, "model": {k: v + i for k, v in mlp.items()}}, ws / "run" / f"ckpt-{i}.pt")
    save_file(mlp, ws / "a.safetensors")
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    for seed, name in enumerate(("base", "math", "code", "a", "b", "tuned")):
        torch.manual_seed(seed)
        GPT2LMHeadModel(config).save_pretrained(ws / name)
    torch.manual_seed(0)
    peft_model = get_peft_model(GPT2LMHeadModel.from_pretrained(ws / "base"),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False))
    peft_model.save_pretrained(ws / "adapter")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> pathlib.Path:
    """The files the examples name: model.pt (a 2-layer MLP), model.safetensors (a tiny GPT-2), train.ckpt
    (model, optimizer, lr_schedulers), a.pt, b.safetensors, before.pt/after.safetensors, compiled.pt, ddp.pt,
    m.safetensors, ckpt/*.pt, models.py:build, and sample_models/ from the committed generator."""
    from conftest import _load_generator

    ws = tmp_path_factory.mktemp("ws")
    (ws / "sample_models").mkdir()
    _load_generator().generate(ws / "sample_models")
    mlp, gpt2 = _mlp(), _gpt2()
    for name in ("model.pt", "a.pt", "before.pt"):
        torch.save(mlp, ws / name)
    for name in ("b.safetensors", "after.safetensors"):
        save_file(mlp, ws / name)
    for name in ("model.safetensors", "m.safetensors"):
        save_file(gpt2, ws / name)
    torch.save({f"_orig_mod.{k}": v for k, v in mlp.items()}, ws / "compiled.pt")
    torch.save({f"module.{k}": v for k, v in mlp.items()}, ws / "ddp.pt")
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    torch.save({"epoch": 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "lr_schedulers": [sched.state_dict()]}, ws / "train.ckpt")
    (ws / "ckpt").mkdir()
    for i in (1, 2):
        torch.save(mlp, ws / "ckpt" / f"epoch{i}.pt")
    (ws / "models.py").write_text("import torch\n\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Linear(4, 8), "
                                  "torch.nn.ReLU(), torch.nn.Linear(8, 1))\n")
    _merge_and_lora_files(ws, mlp)
    bin_dir = ws / ".bin"
    bin_dir.mkdir()
    shim = bin_dir / "paramtool"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m paramtool "$@"\n')
    shim.chmod(0o755)
    return ws


def _help_examples() -> list[str]:
    import typer.main

    from paramtool.cli import _verbatim_examples, app

    out = []
    for name, command in typer.main.get_command(app).commands.items():
        for paragraph in (_verbatim_examples(command.epilog) or "").split("\n\n"):
            if paragraph.startswith("\b\n"):
                lines = paragraph[2:].strip().splitlines()
                assert len(lines) == 1, f"{name}: an example is one line: {paragraph!r}"
                out.append(lines[0])
    return out


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


def _doc_recipes(doc: pathlib.Path) -> list[str]:
    """Command lines of a document's sh/console blocks (`$ ` prompts stripped; output lines left out)."""
    out, lang = [], None
    for line in doc.read_text().splitlines():
        fence = re.match(r"^```(\w*)", line)
        if fence:
            lang = None if lang is not None else fence.group(1)
            continue
        if lang in ("sh", "console", "bash"):
            text = line[2:] if line.startswith("$ ") else (line if lang != "console" else "")
            if (text.startswith("paramtool ") or re.match(r"^cat \S+ \| paramtool ", text)) and "://" not in text:
                out.append(text)  # (remote sources: test_remote runs those against servers it starts)
    return out


HELP = _help_examples()
README = _doc_recipes(ROOT / "README.md")
DOC_LINES = [line for doc in DOCS[1:] for line in _doc_recipes(doc)]


def test_examples_found():
    commands = {e.split()[1] for e in HELP if e.startswith("paramtool ")}
    assert {"inspect", "show", "init", "set", "ties", "stats", "check", "diff", "convert", "rename", "drop", "resize",
            "grad", "schemes"} <= commands
    assert len(README) >= 10
    assert len(DOC_LINES) >= 8  # docs/reference.md's examples (check, grad, surgery)


def test_readme_is_short():
    """The README is what a newcomer needs; the rest lives in docs/ (issue 24)."""
    assert len((ROOT / "README.md").read_bytes()) <= 15 * 1024


def test_readme_has_the_recipes():
    """The chapter's exercises and the daily tasks each have a recipe in the README."""
    readme = (ROOT / "README.md").read_text()
    recipes = readme.split("\n## Recipes\n", 1)[1].split("\n## ", 1)[0]
    for title in ("A layer's state dict", "One bias", "All parameters at once", "Nested blocks", "Initialize by scheme",
                  "Initialize by layer type", "Direct edits", "Tied parameters", "Inspect a model directory",
                  "Find ties", "Reinitialize the last block", "Cast to bf16", "Strip an optimizer", "Check for NaN",
                  "Diff a fine-tune"):
        assert f"**{title}**" in recipes, title
    commands = {line.split()[1] for line in README if line.startswith("paramtool ")}
    assert {"inspect", "show", "init", "set", "ties", "grad", "convert", "drop", "check", "stats", "diff"} <= commands
    assert "--type Linear" in recipes and "rgnet" in recipes and "make demo" in readme and "pipx install ." in readme


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but `-` and `_` dropped, spaces as `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(doc: pathlib.Path) -> set[str]:
    out, fence = set(), False
    for line in doc.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"^#{1,6} (.*)", line)):
            out.add(_anchor(m.group(1)))
    return out


def _links(doc: pathlib.Path) -> list[str]:
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"^[a-z]+:", t)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.relative_to(ROOT).as_posix())
def test_links_lead_somewhere(doc):
    """Every relative link of the README and the docs names a file that exists and, after `#`, one of its
    headings: moving a section cannot leave a dead link behind."""
    assert doc.exists()
    dead = []
    for link in _links(doc):
        path, _, anchor = link.partition("#")
        target = (doc.parent / path).resolve() if path else doc
        if not target.exists() or (anchor and (target.suffix != ".md" or anchor not in _anchors(target))):
            dead.append(link)
    assert dead == [], f"{doc.name}: dead links {dead}"


def _writes(line: str) -> bool:
    return " -o " in line or "--in-place" in line or line.split()[1] == "convert"


def _in_shell(line: str) -> bool:
    """Pipes, `||` and unquoted globs need a shell; plain command lines run in-process (no interpreter start)."""
    return bool(re.search(r"[|;&>]|\s[^'\s]*\*", line))


@pytest.mark.parametrize("line", HELP + README + DOC_LINES)
def test_example_runs(line, workspace, tmp_path, monkeypatch, run):
    cwd = tmp_path / "ws"
    shutil.copytree(workspace, cwd)
    if _in_shell(line):
        env = {**os.environ, "PATH": f"{cwd / '.bin'}{os.pathsep}{os.environ['PATH']}", "COLUMNS": "120"}
        r = subprocess.run(["bash", "-o", "pipefail", "-c", line], cwd=cwd, env=env, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL)
        code, stdout, stderr = r.returncode, r.stdout, r.stderr
    else:
        monkeypatch.chdir(cwd)
        r = run(*shlex.split(line, comments=True)[1:], input=b"")
        code, stdout, stderr = r.exit_code, r.stdout, r.stderr
    command = line.split("| paramtool ", 1)[1].split()[0] if line.startswith("cat ") else line.split()[1]
    assert code in ((0, 1) if command in ("diff", "check") else (0,)), f"{line}\n{stderr}"  # 1: differs, findings
    assert "error:" not in stderr and "Traceback" not in stderr, stderr
    if _writes(line):
        assert "wrote " in stderr, stderr
    elif " check " not in f" {line} ":
        assert stdout.strip(), f"{line}: no output"


def test_help_examples_are_never_wrapped(run):
    """At 60 columns each example is still one line of `--help`, so a pasted line runs one whole command."""
    for line in HELP:
        command = line.split("|")[1].split()[1] if line.startswith("cat ") else line.split()[1]
        out = run(command, "--help", env={"COLUMNS": "60"}).stdout
        assert line in [t.strip() for t in out.splitlines()], f"{line!r} wrapped in `{command} --help`"


def test_keep_dtype_error_names_keep_dtype(workspace, run, tmp_path):
    r = run("convert", workspace / "model.safetensors", tmp_path / "o.safetensors", "--dtype", "bf16", "--keep-dtype", "*norm*")
    assert r.exit_code == 1 and r.stderr.startswith("error: --keep-dtype '*norm*' matches nothing"), r.stderr

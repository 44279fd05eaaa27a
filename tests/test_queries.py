"""One implementation per read command (``queries``) and one output sink (``output``), shared by the full
command line and the fast path: the queries' results without any command line, the sink's choice of human or
JSON, the one error line, and what the two modules import."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from paramtool import output, queries, sources
from paramtool.errors import ParamtoolError


class Said:
    """A ``say`` that keeps what it is told."""

    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.notes: list[str] = []

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    def note(self, text: str) -> None:
        self.notes.append(text)


@pytest.fixture
def tied(tmp_path):
    lin = torch.nn.Linear(3, 2)
    sd = {"0.weight": lin.weight.data, "0.bias": lin.bias.data, "2.weight": lin.weight.data, "1.weight": torch.ones(4)}
    torch.save(sd, tmp_path / "m.pt")
    return tmp_path / "m.pt", sd


def test_inspect_query_selects_and_documents_without_a_command_line(tied, run):
    path, sd = tied
    found = queries.inspect(sources.resolve(str(path)), None, ["0"], queries.Silent())
    assert sorted(t.name for t in found.tensors) == ["0.bias", "0.weight"]
    doc = found.as_json()
    assert {t["name"]: t["shape"] for t in doc["tensors"]} == {n: list(sd[n].shape) for n in ("0.weight", "0.bias")}
    assert doc == run("inspect", path, "--layer", "0", "--json").json()  # the command line prints this document


def test_ties_query_groups_shared_storage(tied, run):
    path, _ = tied
    found = queries.ties(sources.resolve(str(path)), None, False, queries.Silent())
    assert [list(g.names) for g in found.groups] == [["0.weight", "2.weight"]]
    assert found.as_json() == run("ties", path, "--json").json()


def test_stats_query_numbers_match_torch_and_progress_is_called_per_tensor(tmp_path):
    x = torch.arange(12.0).reshape(3, 4)
    save_file({"x": x, "z": torch.zeros(5)}, str(tmp_path / "a.safetensors"))
    ticks: list[int] = []

    class Counting:
        def __init__(self, total: int) -> None:
            ticks.append(total)

        def __enter__(self):
            return lambda: ticks.append(-1)

        def __exit__(self, *exc) -> None:
            pass

    found = queries.stats(sources.resolve(str(tmp_path / "a.safetensors")), None, ["x"], queries.Silent(), 4,
                          progress=Counting)
    assert found.names == ["x"] and ticks == [1, -1]
    doc = found.as_json()
    (row,) = doc["tensors"]
    assert row["mean"] == pytest.approx(x.mean().item()) and row["std"] == pytest.approx(x.std().item())
    hist = doc["histograms"]["x"]
    assert row["max"] == 11.0 and sum(hist["counts"]) + hist["zeros"] == 12 and hist["zeros"] == 1


def test_diff_query_errors_are_exit_2_and_results_say_equal(tmp_path):
    save_file({"w": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.ones(2) * 2}, str(tmp_path / "b.safetensors"))
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    assert queries.diff(a, a, None).equal
    different = queries.diff(a, b, None)
    assert not different.equal and different.as_json()["changed"][0]["name"] == "w"
    with pytest.raises(ParamtoolError) as e:
        queries.diff(a, str(tmp_path / "missing.pt"), None)
    assert e.value.exit_code == 2


def test_show_query_prints_what_torch_prints_with_or_without_torch_s_printer(tmp_path):
    sd = {"f": torch.randn(5), "half": torch.randn(4).half()}  # numpy's printer; torch's (float16)
    torch.save(sd, tmp_path / "m.pt")
    src = sources.resolve(str(tmp_path / "m.pt"))
    for name, t in sd.items():
        assert queries.show(src, None, name, False, queries.Silent()) == repr(t)
        assert queries.show(src, None, name, True, queries.Silent())["shape"] == list(t.shape)
    with pytest.raises(ParamtoolError, match="did you mean 'half'"):
        queries.show(src, None, "halff", False, queries.Silent())


def test_config_tied_names_are_noted_once_through_say(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)).save_pretrained(tmp_path / "g")
    src = sources.resolve(str(tmp_path / "g"))
    ckpt = sources.load_lazy(src)
    said = Said()
    assert queries.resolved_name(src, ckpt, "lm_head.weight", said) == "transformer.wte.weight"
    assert said.notes == ["note: lm_head.weight is stored as transformer.wte.weight (config.json ties them)"]


def test_sink_decides_json_or_people_once(tied, capsys):
    path, _ = tied
    found = queries.ties(sources.resolve(str(path)), None, False, queries.Silent())
    printed: list[str] = []
    output.Sink(True).result(found, lambda console: printed.append("human"))
    assert json.loads(capsys.readouterr().out) == found.as_json() and printed == []
    output.Sink(False).result(found, lambda console: printed.append("human"))
    assert capsys.readouterr().out == "" and printed == ["human"]
    output.Sink(False).values("tensor([1.])")
    assert capsys.readouterr().out == "tensor([1.])\n"


def test_error_line_is_one_escaped_line(capsys):
    output.error_line("bad \x1b[31mname\nsecond line")
    err = capsys.readouterr().err
    assert err == "error: bad \\x1b[31mname\n"
    output.error_line("  ")
    assert capsys.readouterr().err == "error: failed\n"


def test_each_source_names_the_failing_source_and_returns_the_worst(capsys):
    def one(source):
        if source == "bad":
            raise ParamtoolError("cannot read it")
        return 0

    assert output.each_source(["good", "bad", "good"], one, True) == 1
    assert capsys.readouterr().err == "error: bad: cannot read it\n"
    with pytest.raises(ParamtoolError):  # one source: its own error, for the caller to report
        output.each_source(["bad"], one, True)


def test_queries_and_output_import_no_typer_rich_or_torch():
    code = ("import sys\nimport paramtool.queries, paramtool.output, paramtool.launch\n"
            "print([m for m in ('typer', 'click', 'rich', 'torch', 'numpy') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_launch_holds_no_command_of_its_own():
    """The fast path recognises argv and dispatches: every document it prints comes from ``queries``."""
    import inspect as pyinspect

    from paramtool import launch

    text = pyinspect.getsource(launch)
    for private in ("read_toc", "load_lazy", "find_ties", "stats_many", "compare.diff", "inspect_json", "printing."):
        assert private not in text, private

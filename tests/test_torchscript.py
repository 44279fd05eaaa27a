"""TorchScript archives (torch.jit.save), read inertly: every command sees what torch.jit.load(f).state_dict()
gives; init/set write an archive torch.jit.load loads and runs with the new values; nothing in it runs."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import warnings
import zipfile

import pytest
import torch
from torch import nn

from conftest import listing_without_torch

CANARY = "paramtool_canary_attribute"  # a name the archive's code holds: any compile of that text is recorded


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class Net(nn.Module):
    """Nested modules, Sequential and ModuleList, BatchNorm buffers, a submodule used twice, a parameter used
    in two places, a non-persistent buffer, a plain tensor attribute, several dtypes."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block())
        self.blocks[1].conv = nn.Conv1d(3, 3, 3, padding=1)
        self.head = nn.ModuleList([nn.Linear(24, 8), nn.Linear(8, 8, bias=False)])
        self.shared = nn.Linear(8, 8)
        self.again = self.shared  # one module at two paths
        self.out = nn.Linear(8, 8)
        self.out.weight = self.head[1].weight  # one parameter in two places
        self.scale = nn.Parameter(torch.tensor([1.5]))
        self.register_buffer("counts", torch.arange(4, dtype=torch.int32))
        self.register_buffer("halves", torch.linspace(0, 1, 5).to(torch.float16))
        self.register_buffer("window", torch.ones(3), persistent=False)
        self.register_buffer("absent", None)
        self.paramtool_canary_attribute = torch.zeros(2)  # a plain tensor attribute: not in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x).flatten(1)
        for layer in self.head:
            x = layer(x)
        x = self.again(self.shared(x)) * self.scale
        return self.out(x) + self.window.sum() + self.paramtool_canary_attribute.sum()


def _input() -> torch.Tensor:
    return torch.randn(4, 2, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, pathlib.Path]:
    out = tmp_path_factory.mktemp("ts")
    torch.manual_seed(0)
    net = Net()
    net(_input())  # training mode: running stats and num_batches_tracked move
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated, and tracing warns: the files are what matter
        made = {"scripted": torch.jit.script(net), "traced": torch.jit.trace(net, _input())}
        made["linear"] = torch.jit.script(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
        for name, module in made.items():
            torch.jit.save(module, str(out / f"{name}.pt"))
    return {name: out / f"{name}.pt" for name in made}


KINDS = ["scripted", "traced", "linear"]


def _state(path) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path)).state_dict()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _torch_ties(sd) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, t in sd.items():
        groups.setdefault(t.untyped_storage().data_ptr(), []).append(name)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


@pytest.mark.parametrize("kind", KINDS)
def test_inspect_lists_the_state_dict(archives, run, kind):
    sd = _state(archives[kind])
    r = run("inspect", archives[kind], "--json")
    assert r.exit_code == 0, r.stderr
    doc = r.json()
    assert doc["format"] == "torchscript" and doc["weights_only_loadable"] is False
    got = [(t["name"], tuple(t["shape"]), t["dtype"]) for t in doc["tensors"]]
    assert got == [(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in sd.items()]
    if kind != "linear":
        names = [n for n, *_ in got]
        assert "window" in names  # a loaded script module keeps no non-persistent set: torch lists it
        assert "blocks.0.bn.num_batches_tracked" in names and "absent" not in names and CANARY not in names
        assert "head.1.bias" not in names and doc["modules"]["blocks.0.bn"] == "BatchNorm1d"
        assert doc["modules"]["head"] == "ModuleList" and doc["modules"]["blocks"] == "Sequential"


@pytest.mark.parametrize("kind", KINDS)
def test_show_stats_ties_match_torch(archives, run, kind):
    path, sd = archives[kind], _state(archives[kind])
    for name, t in sd.items():
        r = run("show", path, name, "--json")
        assert r.exit_code == 0, r.stderr
        assert r.json()["values"] == t.tolist() and r.json()["dtype"] == str(t.dtype).removeprefix("torch.")
    stats = {s["name"]: s for s in run("stats", path, "--json").json()["tensors"]}
    assert list(stats) == list(sd)
    for name, t in sd.items():
        v = t.double()
        assert stats[name]["min"] == v.min().item() and stats[name]["max"] == v.max().item()
        assert stats[name]["mean"] == pytest.approx(v.mean().item(), rel=1e-9, abs=1e-12)
    groups = run("ties", path, "--json").json()["groups"]
    assert [g["names"] for g in groups] == _torch_ties(sd)
    if kind != "linear":
        assert ["again.bias", "shared.bias"] in [g["names"] for g in groups]
        assert ["head.1.weight", "out.weight"] in [g["names"] for g in groups]


@pytest.mark.parametrize("kind", KINDS)
def test_listing_imports_no_torch(archives, kind):
    for command in ("inspect", "ties"):
        p = listing_without_torch(archives[kind], command)
        assert p.returncode == 0, p.stderr[-2000:]
        assert json.loads(p.stdout)


@pytest.mark.parametrize("kind", KINDS)
def test_convert_gives_the_state_dict_bit_for_bit(archives, run, tmp_path, kind):
    from safetensors import safe_open

    sd = _state(archives[kind])
    assert run("convert", archives[kind], tmp_path / "sd.pt").exit_code == 0
    got = torch.load(tmp_path / "sd.pt", weights_only=True)
    assert list(got) == list(sd)
    for name, t in sd.items():
        assert got[name].dtype == t.dtype and torch.equal(_bits(got[name]), _bits(t))
    assert _torch_ties(got) == _torch_ties(sd)
    assert run("convert", archives[kind], tmp_path / "sd.safetensors").exit_code == 0
    with safe_open(str(tmp_path / "sd.safetensors"), "pt") as f:
        stored, aliases = set(f.keys()), f.metadata()
        for name, t in sd.items():
            key = name if name in stored else aliases[name]  # a tie is one copy, named in the metadata
            assert torch.equal(_bits(f.get_tensor(key)), _bits(t))
    r = run("diff", archives[kind], tmp_path / "sd.safetensors", "--json")
    assert r.exit_code == 0 and r.json()["same"] == len(sd)
    assert run("convert", archives[kind], "--dtype", "bf16", "-o", tmp_path / "bf16.pt").exit_code == 0
    cast = torch.load(tmp_path / "bf16.pt", weights_only=True)  # a state dict, cast storage by storage
    assert list(cast) == list(sd) and _torch_ties(cast) == _torch_ties(sd)
    for name, t in sd.items():
        assert torch.equal(cast[name], t.to(torch.bfloat16) if t.is_floating_point() else t)


def _records(path) -> dict[str, tuple[bytes, int, int]]:
    with zipfile.ZipFile(path) as z:
        return {i.filename: (z.read(i), i.header_offset, i.compress_type) for i in z.infolist()}


@pytest.mark.parametrize("kind", ["scripted", "traced"])
def test_set_and_init_write_an_archive_that_runs_with_the_new_values(archives, run, tmp_path, kind):
    path = archives[kind]
    before = _state(path)
    r = run("set", path, "head.0.weight[0, 0] = 42", "blocks.0.bn.running_mean[:] += 1", "-o", tmp_path / "set.pt")
    assert r.exit_code == 0, r.stderr
    r = run("init", path, "--scheme", "ones", "--layer", "shared", "--param", "all", "-o", tmp_path / "init.pt")
    assert r.exit_code == 0, r.stderr
    assert "(torchscript)" in r.stderr
    for out, changed in (("set.pt", {"head.0.weight", "blocks.0.bn.running_mean"}),
                         ("init.pt", {"shared.weight", "shared.bias", "again.weight", "again.bias"})):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = torch.jit.load(str(tmp_path / out))
        after = loaded.state_dict()
        assert list(after) == list(before)
        for name in before:
            assert torch.equal(after[name], before[name]) == (name not in changed), name
        if out == "set.pt":
            assert after["head.0.weight"][0, 0] == 42 and torch.equal(after["blocks.0.bn.running_mean"],
                                                                        before["blocks.0.bn.running_mean"] + 1)
        else:
            assert all((after[n] == 1).all() for n in changed)
        reference = Net().eval()  # the same computation in Python, over the new values, must agree
        assert reference.load_state_dict(after, strict=False).unexpected_keys == ["window"]  # (non-persistent)
        with torch.no_grad():
            assert torch.allclose(loaded(_input()), reference(_input()), atol=1e-5)
        # every record is the source's, byte for byte, at the same offset, but the changed storages
        old, new = _records(path), _records(tmp_path / out)
        assert list(old) == list(new) and os.path.getsize(path) == os.path.getsize(tmp_path / out)
        differ = [n for n in old if old[n] != new[n]]
        assert all(n.split("/", 1)[1].startswith("data/") for n in differ) and len(differ) == len(
            {after[n].untyped_storage().data_ptr() for n in changed})


def test_archive_through_a_pipe_stays_an_archive(archives, run, tmp_path):
    r = run("set", archives["linear"], "0.bias = 0.25")
    assert r.exit_code == 0, r.stderr
    (tmp_path / "piped.pt").write_bytes(r.stdout_bytes)
    assert torch.equal(_state(tmp_path / "piped.pt")["0.bias"], torch.full((4,), 0.25))
    r = run("inspect", "-", "--json", input=r.stdout_bytes)
    assert r.json()["format"] == "torchscript"
    r = run("set", archives["linear"], "0.bias = 1", "--format", "pt", "-o", tmp_path / "sd.pt")  # asked for
    assert r.exit_code == 0 and torch.load(tmp_path / "sd.pt", weights_only=True)["0.bias"].eq(1).all()


@pytest.mark.parametrize("argv, named", [
    (["rename", "s/^head/top/"], "rename"),
    (["drop", "--layer", "head"], "drop"),
    (["resize", "head.0.weight", "--rows", "9"], "resize"),
    (["init", "--scheme", "zeros", "--untie", "--layer", "shared"], "--untie"),
])
def test_edits_that_need_other_code_are_refused_by_name(archives, run, tmp_path, argv, named):
    out = tmp_path / "out.pt"
    r = run(argv[0], archives["scripted"], *argv[1:], "-o", out)
    assert r.exit_code == 1 and named in r.stderr and "TorchScript" in r.stderr
    assert r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())


AUDIT = r'''
import builtins, json, sys
import paramtool.cli, torch, safetensors.torch, numpy  # the tool's own imports happen before the hooks
from paramtool.cli import main
CANARY = sys.argv[1]
events = []

def tripwire(name):
    def called(*args, **kwargs):
        events.append(["called", name])
        raise RuntimeError(name + " must not be called")
    return called

torch.jit.load = tripwire("torch.jit.load")
torch._C.import_ir_module = tripwire("torch._C.import_ir_module")
torch._C.import_ir_module_from_buffer = tripwire("torch._C.import_ir_module_from_buffer")
real_compile = builtins.compile

def compile(source, filename, mode, flags=0, *args, **kwargs):  # ast.parse comes through here, with ONLY_AST
    text = source.decode("utf-8", "replace") if isinstance(source, bytes) else str(source)
    if CANARY in text:
        events.append(["compile", str(filename), bool(flags & 0x400)])
    return real_compile(source, filename, mode, flags, *args, **kwargs)

builtins.compile = compile

def hook(event, args):
    if event == "exec" and CANARY in repr(getattr(args[0], "co_names", ())) + repr(getattr(args[0], "co_consts", ())):
        events.append(["exec", getattr(args[0], "co_filename", "")])

sys.addaudithook(hook)
codes = []
for argv in json.loads(sys.argv[2]):
    sys.argv = ["paramtool"] + argv
    try:
        main()
        codes.append(0)
    except SystemExit as e:
        codes.append(e.code or 0)
print(json.dumps({"events": events, "codes": codes}))
'''


def test_nothing_in_the_archive_is_compiled_or_run(archives, tmp_path):
    path = str(archives["scripted"])
    assert CANARY.encode() in b"".join(r[0] for r in _records(path).values())  # the code names it
    commands = [["inspect", path], ["inspect", path, "--json"], ["show", path, "scale"], ["stats", path],
                ["ties", path], ["diff", path, path], ["convert", path, str(tmp_path / "c.safetensors")],
                ["convert", path, str(tmp_path / "c.pt")], ["set", path, "scale = 2", "-o", str(tmp_path / "s.pt")],
                ["init", path, "--scheme", "zeros", "--layer", "out", "-o", str(tmp_path / "i.pt")]]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(pathlib.Path(__file__).resolve().parents[1] / "src")] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    p = subprocess.run([sys.executable, "-c", AUDIT, CANARY, json.dumps(commands)], capture_output=True, text=True,
                       env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["codes"] == [0] * len(commands), p.stderr[-2000:]
    compiles = [e for e in report["events"] if e[0] == "compile"]
    assert compiles, "the class declarations were not read from the code"  # the hook sees ast.parse
    assert all(only_ast for _, _, only_ast in compiles), compiles  # parsed to a tree, never to bytecode
    assert [e for e in report["events"] if e[0] != "compile"] == []
    assert _state(tmp_path / "s.pt")["scale"].item() == 2  # (loaded here, in the test, not by paramtool)


class Holder:  # a TorchScript class (scripted in _with_object; not a module): no part of a state dict
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class WithObject(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.held = Holder(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.held.t


class OwnState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, bool]:
        return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
        self.w = state[0]
        self.training = state[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def _with_object() -> torch.jit.ScriptModule:
    torch.jit.script(Holder)
    return torch.jit.script(WithObject())


def _dynamic_quantized() -> nn.Module:
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(nn.Sequential(nn.Linear(4, 4)).eval(), {nn.Linear}, dtype=torch.qint8)


SCRIPTED = {
    "lstm": lambda: torch.jit.script(nn.LSTM(3, 4, num_layers=2)),
    "transformer": lambda: torch.jit.script(nn.TransformerEncoderLayer(8, 2, 16)),
    "embedding": lambda: torch.jit.script(nn.Embedding(10, 3)),
    "object": _with_object,
    "frozen": lambda: torch.jit.freeze(torch.jit.script(nn.Sequential(nn.Linear(2, 2)).eval())),  # no state left
    "quantized": lambda: torch.jit.script(_dynamic_quantized()),  # packed weights in a C++ class: no state dict
}


@pytest.mark.parametrize("kind", sorted(SCRIPTED))
def test_other_scripted_modules_list_what_torch_lists(run, tmp_path, kind):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(SCRIPTED[kind](), str(tmp_path / "m.pt"))
    sd = _state(tmp_path / "m.pt")
    r = run("inspect", tmp_path / "m.pt", "--json")
    assert r.exit_code == 0, r.stderr
    assert [(t["name"], tuple(t["shape"])) for t in r.json()["tensors"]] == [(n, tuple(t.shape)) for n, t in sd.items()]
    assert (len(sd) == 0) == (kind in ("frozen", "quantized"))


def test_a_module_built_by_its_own_setstate_is_refused_by_name(run, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(OwnState()), str(tmp_path / "m.pt"))
    r = run("inspect", tmp_path / "m.pt")
    assert r.exit_code == 1 and "__torch__" in r.stderr and "OwnState" in r.stderr and "__setstate__" in r.stderr


def test_a_code_running_name_in_data_pkl_is_refused(archives, run, tmp_path):
    from conftest import rewrite_zip

    marker = tmp_path / "MARKER"
    cmd = f"touch {marker}".encode()
    evil = b"\x80\x02cos\nsystem\nX" + len(cmd).to_bytes(4, "little") + cmd + b"\x85R."
    rewrite_zip(archives["linear"], tmp_path / "evil.pt", lambda n, d: evil if n.endswith("/data.pkl") else d)
    r = run("inspect", tmp_path / "evil.pt")
    assert r.exit_code == 1 and "'os.system'" in r.stderr and not marker.exists()


def test_crc_fields_are_rewritten_with_or_without_data_descriptors(archives, run, tmp_path):
    from conftest import rewrite_zip

    rewrite_zip(archives["linear"], tmp_path / "plain.pt", lambda n, d: d)  # CRCs in the local headers
    for source in (archives["linear"], tmp_path / "plain.pt"):  # torch's writer: CRCs in data descriptors
        out = tmp_path / f"out_{source.name}"
        assert run("set", source, "2.weight[0, 0] = 3", "-o", out).exit_code == 0
        with zipfile.ZipFile(out) as z:
            assert z.testzip() is None  # every record's bytes match the central directory's CRC-32
            raw = out.read_bytes()
            for info in z.infolist():  # and a local header that holds one (no data descriptor) agrees
                local = int.from_bytes(raw[info.header_offset + 14:info.header_offset + 18], "little")
                assert local == (0 if info.flag_bits & 0x08 else info.CRC), info.filename
                if info.flag_bits & 0x08:  # the data descriptor after the bytes carries it
                    name_len, extra_len = (int.from_bytes(raw[info.header_offset + k:info.header_offset + k + 2],
                                                          "little") for k in (26, 28))
                    end = info.header_offset + 30 + name_len + extra_len + info.compress_size
                    assert raw[end:end + 4] == b"PK\x07\x08"
                    assert int.from_bytes(raw[end + 4:end + 8], "little") == info.CRC, info.filename
        assert _state(out)["2.weight"][0, 0] == 3


class _Narrow(nn.Module):
    """Buffers in dtypes without a legacy storage class: an archive names them by C++ type (UInt16Storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("u", torch.tensor([1, 60000, 3]).to(torch.uint16))
        self.register_buffer("f", torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn))
        self.lin = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_every_dtype_an_archive_names(run, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(_Narrow()), str(tmp_path / "n.pt"))
    expected = _state(tmp_path / "n.pt")
    r = run("inspect", tmp_path / "n.pt", "--json")
    assert r.exit_code == 0, r.stderr
    assert [(t["name"], t["dtype"]) for t in r.json()["tensors"]] == \
        [(k, str(v.dtype).removeprefix("torch.")) for k, v in expected.items()]
    out = tmp_path / "sd.pt"
    assert run("convert", tmp_path / "n.pt", out).exit_code == 0
    back = torch.load(out, weights_only=True)
    assert all(back[k].dtype == v.dtype and torch.equal(_bits(back[k]), _bits(v)) for k, v in expected.items())

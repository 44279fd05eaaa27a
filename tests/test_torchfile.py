"""The listing unpickler: exact allowlist, no torch, no tensor bytes, hostile pickles refused by name."""
from __future__ import annotations

import collections
import io
import subprocess
import sys
import zipfile

import pytest
import torch

from paramtool.errors import FormatError, RefusedGlobal
from paramtool.formats.nn_classes import NN_MODULE_CLASSES, current
from paramtool.formats.torchfile import read_legacy_tree, read_zip_tree, sniff_torch
from paramtool.toc import FakeTensor
from paramtool.tree import assign_names, infos


def listing(root):
    names = assign_names(root)
    return [(i.name, i.shape, i.dtype, i.offset, i.stride) for i in infos(root, names)]


def torch_listing(obj):
    sd = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
    return [(n, tuple(t.shape), str(t.dtype)[6:], t.storage_offset(), tuple(t.stride())) for n, t in sd.items()]


@pytest.mark.parametrize("legacy", [False, True])
def test_tree_matches_torch(tmp_path, legacy):
    base = torch.arange(12.0).reshape(3, 4)
    sd = collections.OrderedDict(
        w=torch.randn(3, 4), b=torch.zeros(3, dtype=torch.bfloat16), i=torch.arange(5), t=base.t(), row=base[1],
        base=base, p=torch.nn.Parameter(torch.ones(2)),
    )
    path = tmp_path / "x.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    root = read_legacy_tree(str(path)) if legacy else read_zip_tree(str(path))
    assert listing(root) == torch_listing(sd)
    assert root["t"].storage == root["base"].storage == root["row"].storage
    assert root["w"].storage != root["base"].storage
    assert root["p"].is_parameter and root["p"].requires_grad


def test_training_checkpoint_and_whole_module(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(4, 2)).sum().backward()
    opt.step()
    torch.save({"epoch": 3, "model": net.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "c.pt")
    root = read_zip_tree(str(tmp_path / "c.pt"))
    assert root["epoch"] == 3 and isinstance(root["optimizer"]["state"][0]["exp_avg"], FakeTensor)
    assert [n for n, *_ in listing(root)] == list(net.state_dict())
    torch.save(net, tmp_path / "m.pt")
    assert listing(read_zip_tree(str(tmp_path / "m.pt"))) == torch_listing(net)


def test_reads_no_tensor_bytes(tmp_path):
    torch.save({"a": torch.randn(100), "b": torch.randn(3, 3)}, tmp_path / "g.pt")
    src = zipfile.ZipFile(tmp_path / "g.pt")
    with zipfile.ZipFile(tmp_path / "garbage.pt", "w") as out:
        for info in src.infolist():
            data = src.read(info)
            out.writestr(info, b"\xff" * len(data) if "/data/" in info.filename else data)
    assert listing(read_zip_tree(str(tmp_path / "garbage.pt"))) == listing(read_zip_tree(str(tmp_path / "g.pt")))


def test_missing_storage_record(tmp_path):
    torch.save({"a": torch.ones(4)}, tmp_path / "a.pt")
    src = zipfile.ZipFile(tmp_path / "a.pt")
    with zipfile.ZipFile(tmp_path / "m.pt", "w") as out:
        for info in src.infolist():
            if not info.filename.endswith("/data/0"):
                out.writestr(info, src.read(info))
    with pytest.raises(FormatError, match="missing"):
        read_zip_tree(str(tmp_path / "m.pt"))


def test_view_beyond_storage(tmp_path):
    torch.save({"a": torch.ones(4)}, tmp_path / "a.pt")
    src = zipfile.ZipFile(tmp_path / "a.pt")
    with zipfile.ZipFile(tmp_path / "big.pt", "w") as out:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"K\x04\x85", b"K\x09\x85")  # shape (4,) -> (9,)
            out.writestr(info, data)
    with pytest.raises(FormatError):
        read_zip_tree(str(tmp_path / "big.pt"))


PAYLOADS = {
    "os.system GLOBAL": (b"cos\nsystem\n(S'touch {m}'\ntR.", "os.system"),
    "posix.system": (b"cposix\nsystem\n(S'touch {m}'\ntR.", "posix.system"),
    "builtins.exec": (b"cbuiltins\nexec\n(S'open(\"{m}\",\"w\")'\ntR.", "builtins.exec"),
    "builtins.eval": (b"c__builtin__\neval\n(S'open(\"{m}\",\"w\")'\ntR.", "__builtin__.eval"),
    "subprocess INST": (b"(S'touch'\nS'{m}'\nisubprocess\nPopen\n.", "subprocess.Popen"),
    "STACK_GLOBAL": (b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c\x0btouch {m}\x85R.", "os.system"),
    "importlib": (b"cimportlib\nimport_module\n(S'os'\ntR.", "importlib.import_module"),
    "runpy": (b"crunpy\n_run_code\n(S'open(\"{m}\",\"w\")'\n}tR.", "runpy._run_code"),
    "BUILD setstate": (b"ccollections\nOrderedDict\n)R}S'x'\ncos\nsystem\nsb.", "os.system"),
    "getattr": (b"cbuiltins\ngetattr\n(cbuiltins\nopen\nS'write'\ntR.", "builtins.getattr"),
}


def _payload(template: bytes, marker) -> bytes:
    return template.replace(b"{m}", str(marker).encode())


@pytest.mark.parametrize("case", sorted(PAYLOADS))
def test_bare_pickle_refused(tmp_path, case):
    template, name = PAYLOADS[case]
    marker = tmp_path / "MARKER"
    (tmp_path / "x.pt").write_bytes(_payload(template, marker))
    with pytest.raises(RefusedGlobal) as e:
        read_legacy_tree(str(tmp_path / "x.pt"))
    assert e.value.name == name
    assert not marker.exists()


@pytest.mark.parametrize("case", ["os.system GLOBAL", "STACK_GLOBAL", "builtins.exec"])
def test_zip_data_pkl_refused(tmp_path, case):
    template, name = PAYLOADS[case]
    marker = tmp_path / "MARKER"
    torch.save({"a": torch.ones(1)}, tmp_path / "ok.pt")
    src = zipfile.ZipFile(tmp_path / "ok.pt")
    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as out:
        for info in src.infolist():
            data = _payload(template, marker) if info.filename.endswith("data.pkl") else src.read(info)
            out.writestr(info, data)
    with pytest.raises(RefusedGlobal, match=name.replace(".", r"\.")):
        read_zip_tree(str(tmp_path / "evil.pt"))
    assert not marker.exists()


def test_nested_inside_state_dict_refused(tmp_path):
    marker = tmp_path / "MARKER"
    evil = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01X\x01\x00\x00\x00bcos\nsystem\nX" + \
        len(f"touch {marker}").to_bytes(4, "little") + f"touch {marker}".encode() + b"\x85Ru."
    (tmp_path / "n.pt").write_bytes(evil)
    with pytest.raises(RefusedGlobal, match="os.system"):
        read_legacy_tree(str(tmp_path / "n.pt"))
    assert not marker.exists()


@pytest.mark.parametrize("data", [b"", b"\x80", b"\x80\x02}q\x00(X", b"PK\x03\x04garbage", bytes(range(256)) * 4])
def test_broken_files_are_format_errors(tmp_path, data):
    (tmp_path / "b.pt").write_bytes(data)
    with pytest.raises(FormatError):
        (read_zip_tree if data.startswith(b"PK") else read_legacy_tree)(str(tmp_path / "b.pt"))


def test_truncated_legacy(tmp_path):
    torch.save({"a": torch.ones(100)}, tmp_path / "l.pt", _use_new_zipfile_serialization=False)
    data = (tmp_path / "l.pt").read_bytes()
    for cut in (10, len(data) // 2, len(data) - 8):
        (tmp_path / "t.pt").write_bytes(data[:cut])
        with pytest.raises(FormatError):
            read_legacy_tree(str(tmp_path / "t.pt"))


def test_sniff():
    assert sniff_torch(b"PK\x03\x04rest") == "pt"
    assert sniff_torch(b"\x80\x02\x8a\x0a") == "pt-legacy"
    assert sniff_torch(b"\x00\x01") is None and sniff_torch(b"") is None


def test_nn_class_list_matches_installed_torch():
    assert set(current()) == set(NN_MODULE_CLASSES)


def test_listing_imports_neither_torch_nor_numpy(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "z.pt")
    torch.save({"a": torch.ones(2)}, tmp_path / "l.pt", _use_new_zipfile_serialization=False)
    code = (
        "import sys\n"
        "from paramtool.formats.torchfile import read_zip_tree, read_legacy_tree\n"
        f"read_zip_tree({str(tmp_path / 'z.pt')!r}); read_legacy_tree({str(tmp_path / 'l.pt')!r})\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr

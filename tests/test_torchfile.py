"""The listing unpickler: exact allowlist, no torch, no tensor bytes, hostile pickles refused by name."""
from __future__ import annotations

import collections
import subprocess
import sys
import zipfile

import pytest
import torch

from conftest import rewrite_zip
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
    rewrite_zip(tmp_path / "g.pt", tmp_path / "garbage.pt", lambda n, d: b"\xff" * len(d) if "/data/" in n else d)
    assert listing(read_zip_tree(str(tmp_path / "garbage.pt"))) == listing(read_zip_tree(str(tmp_path / "g.pt")))


def test_view_beyond_storage(tmp_path):
    torch.save({"a": torch.ones(4)}, tmp_path / "a.pt")
    # shape (4,) -> (9,) in the pickle
    rewrite_zip(tmp_path / "a.pt", tmp_path / "big.pt",
                lambda n, d: d.replace(b"K\x04\x85", b"K\x09\x85") if n.endswith("data.pkl") else d)
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
    "NEWOBJ Popen": (b"\x80\x02csubprocess\nPopen\n]X\x05\x00\x00\x00touchaX{n}{m}a\x85\x81.", "subprocess.Popen"),
    "NEWOBJ_EX": (b"\x80\x04\x8c\nsubprocess\x8c\x05Popen\x93)}\x92.", "subprocess.Popen"),
    "builtins.__import__": (b"cbuiltins\n__import__\n(S'os'\ntR.", "builtins.__import__"),
    "nt.system": (b"cnt\nsystem\n(S'touch {m}'\ntR.", "nt.system"),
    "prefix is not enough": (b"\x80\x02ctorch.nn.modules.linear\nos\n)\x81.", "torch.nn.modules.linear.os"),
    "torch.load itself": (b"ctorch\nload\n(S'x'\ntR.", "torch.load"),
}


def _payload(template: bytes, marker) -> bytes:
    m = str(marker).encode()
    return template.replace(b"{n}", len(m).to_bytes(4, "little")).replace(b"{m}", m)


@pytest.mark.parametrize("case", sorted(PAYLOADS))
def test_bare_pickle_refused(tmp_path, case):
    template, name = PAYLOADS[case]
    marker = tmp_path / "MARKER"
    (tmp_path / "x.pt").write_bytes(_payload(template, marker))
    with pytest.raises(RefusedGlobal) as e:
        read_legacy_tree(str(tmp_path / "x.pt"))
    assert e.value.name == name
    assert not marker.exists()


def test_unknown_class_is_inert_not_refused():
    # issue 10: a class paramtool does not know is kept as a record of its name, never created nor refused
    from paramtool.formats.unpickle import Inert, unpickle

    obj, names = unpickle(b"\x80\x02cmymodule\nEvil\n)\x81.")
    assert isinstance(obj, Inert) and obj.name == "mymodule.Evil" and names == {"mymodule.Evil"}
    assert "mymodule" not in sys.modules


@pytest.mark.parametrize("case", ["os.system GLOBAL", "STACK_GLOBAL", "builtins.exec"])
def test_zip_data_pkl_refused(tmp_path, case):
    template, name = PAYLOADS[case]
    marker = tmp_path / "MARKER"
    torch.save({"a": torch.ones(1)}, tmp_path / "ok.pt")
    rewrite_zip(tmp_path / "ok.pt", tmp_path / "evil.pt",
                lambda n, d: _payload(template, marker) if n.endswith("data.pkl") else d)
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


# ---------------------------------------------------------------------------------------------------------------
# More of the contract: ties, requires_grad, whole modules, storages, hostile variants.


def _zip_pkl(path):
    z = zipfile.ZipFile(path)
    return next(z.read(n) for n in z.namelist() if n.endswith("/data.pkl"))


@pytest.mark.parametrize("legacy", [False, True])
def test_tied_names_share_one_storage_and_sizes_match_torch(tmp_path, legacy):
    emb = torch.randn(5, 3)
    sd = {"embed.weight": emb, "head.weight": emb, "other": torch.randn(5, 3), "half": torch.ones(4, dtype=torch.half)}
    torch.save(sd, tmp_path / "t.pt", _use_new_zipfile_serialization=not legacy)
    root = (read_legacy_tree if legacy else read_zip_tree)(str(tmp_path / "t.pt"))
    assert root["embed.weight"] is root["head.weight"] or root["embed.weight"].storage == root["head.weight"].storage
    assert root["embed.weight"].storage.key == root["head.weight"].storage.key
    assert root["other"].storage.key != root["embed.weight"].storage.key
    assert root["half"].dtype == "float16"
    loaded = torch.load(tmp_path / "t.pt", weights_only=True)
    for name, t in loaded.items():
        ref = root[name].storage
        assert ref.nbytes == t.untyped_storage().nbytes(), name
        assert ref.key[0] == ("legacy" if legacy else "zip")


def test_requires_grad_plain_tensor_is_not_a_parameter(tmp_path):
    torch.save({"g": torch.ones(3, requires_grad=True), "n": torch.ones(3)}, tmp_path / "g.pt")
    root = read_zip_tree(str(tmp_path / "g.pt"))
    assert root["g"].requires_grad and not root["g"].is_parameter
    assert not root["n"].requires_grad
    torch.save({"p": torch.nn.Parameter(torch.ones(2), requires_grad=False)}, tmp_path / "p.pt")
    p = read_zip_tree(str(tmp_path / "p.pt"))["p"]
    assert p.is_parameter and not p.requires_grad


@pytest.mark.parametrize("legacy", [False, True])
def test_whole_module_becomes_fake_modules(tmp_path, legacy):
    from paramtool.toc import FakeModule

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.LayerNorm(2)))
    torch.save(net, tmp_path / "m.pt", _use_new_zipfile_serialization=not legacy)
    root = (read_legacy_tree if legacy else read_zip_tree)(str(tmp_path / "m.pt"))
    assert isinstance(root, FakeModule) and root.cls == "torch.nn.modules.container.Sequential"
    kids = root.state["_modules"]
    assert [m.cls for m in kids.values()] == [
        "torch.nn.modules.linear.Linear", "torch.nn.modules.activation.ReLU", "torch.nn.modules.container.Sequential"]
    w = kids["0"].state["_parameters"]["weight"]
    assert isinstance(w, FakeTensor) and w.is_parameter and w.requires_grad and w.shape == (2, 2)
    assert kids["2"].state["_modules"]["0"].state["normalized_shape"] == (2,)
    assert listing(root) == torch_listing(net)


def test_state_dict_metadata_build_is_kept(tmp_path):
    net = torch.nn.Linear(2, 2)
    torch.save(net.state_dict(), tmp_path / "s.pt")
    root = read_zip_tree(str(tmp_path / "s.pt"))
    assert isinstance(root, collections.OrderedDict) and list(root) == ["weight", "bias"]
    assert root._metadata[""]["version"] == 1  # BUILD on OrderedDict sets _metadata as torch does


def test_nn_module_classes_exact():
    assert "torch.nn.modules.linear.Linear" in NN_MODULE_CLASSES
    assert "torch.nn.modules.linear" not in NN_MODULE_CLASSES and "torch.nn.Linear" not in NN_MODULE_CLASSES


def test_only_data_pkl_is_read(tmp_path, monkeypatch):
    torch.save({"a": torch.randn(10), "b": torch.randn(2, 2)}, tmp_path / "r.pt")
    opened = []
    real_open = zipfile.ZipFile.open

    def spy(self, name, *args, **kwargs):
        opened.append(name.filename if isinstance(name, zipfile.ZipInfo) else name)
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    read_zip_tree(str(tmp_path / "r.pt"))
    assert opened and all("/data/" not in n for n in opened), opened
    assert any(n.endswith("/data.pkl") for n in opened)


def test_missing_record_message_names_file_and_key(tmp_path):
    torch.save({"a": torch.ones(4), "b": torch.ones(2)}, tmp_path / "a.pt")
    rewrite_zip(tmp_path / "a.pt", tmp_path / "m.pt", lambda n, d: None if n.endswith("/data/1") else d)
    with pytest.raises(FormatError) as e:
        read_zip_tree(str(tmp_path / "m.pt"))
    assert str(tmp_path / "m.pt") in str(e.value) and "'1'" in str(e.value) and "\n" not in str(e.value)


def test_storage_record_smaller_than_claimed(tmp_path):
    torch.save({"a": torch.ones(4)}, tmp_path / "a.pt")
    rewrite_zip(tmp_path / "a.pt", tmp_path / "s.pt", lambda n, d: d[:8] if n.endswith("/data/0") else d)
    with pytest.raises(FormatError, match="claims 4"):
        read_zip_tree(str(tmp_path / "s.pt"))


def test_negative_stride_refused(tmp_path):
    torch.save({"a": torch.ones(4)}, tmp_path / "a.pt")
    assert _zip_pkl(tmp_path / "a.pt").count(b"K\x01\x85") == 1
    rewrite_zip(tmp_path / "a.pt", tmp_path / "n.pt",
                 lambda n, d: d.replace(b"K\x01\x85", b"J\xff\xff\xff\xff\x85") if n.endswith("data.pkl") else d)
    with pytest.raises(FormatError, match="negative"):
        read_zip_tree(str(tmp_path / "n.pt"))


def test_data_pkl_size_cap(tmp_path, monkeypatch):
    from paramtool.formats import torchfile

    torch.save({"a": torch.ones(4)}, tmp_path / "a.pt")
    monkeypatch.setattr(torchfile, "MAX_PICKLE", 16)
    with pytest.raises(FormatError, match="limit"):
        read_zip_tree(str(tmp_path / "a.pt"))
    assert torchfile.MAX_PICKLE <= 1 << 30


def test_build_cannot_alter_a_checked_tensor(tmp_path):
    torch.save({"a": torch.ones(4)}, tmp_path / "a.pt")
    data = _zip_pkl(tmp_path / "a.pt")
    assert data.endswith(b"s.")
    # after the tensor is made (and its view checked), BUILD {"shape": (100,)} on it, then store it
    evil = data[:-2] + b"}X\x05\x00\x00\x00shapeK\x64\x85sbs."
    rewrite_zip(tmp_path / "a.pt", tmp_path / "e.pt", lambda n, d: evil if n.endswith("data.pkl") else d)
    with pytest.raises(FormatError, match="modifies"):
        read_zip_tree(str(tmp_path / "e.pt"))


def test_build_cannot_poison_a_global_stand_in(tmp_path):
    (tmp_path / "p.pt").write_bytes(b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeX\x04\x00\x00\x00int8sb.")
    with pytest.raises(FormatError):
        read_legacy_tree(str(tmp_path / "p.pt"))
    fn = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(N}X\x0c\x00\x00\x00__defaults__)stb."
    (tmp_path / "f.pt").write_bytes(fn)
    with pytest.raises(FormatError):
        read_legacy_tree(str(tmp_path / "f.pt"))
    torch.save({"a": torch.ones(2)}, tmp_path / "ok.pt")
    assert read_zip_tree(str(tmp_path / "ok.pt"))["a"].dtype == "float32"


def test_nested_zip_payload_refused(tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"a": torch.ones(1)}, tmp_path / "ok.pt")
    data = _zip_pkl(tmp_path / "ok.pt")
    cmd = f"touch {marker}".encode()
    extra = b"X\x01\x00\x00\x00bcos\nsystem\nX" + len(cmd).to_bytes(4, "little") + cmd + b"\x85Rs"
    evil = data[:-1] + extra + b"."
    rewrite_zip(tmp_path / "ok.pt", tmp_path / "evil.pt", lambda n, d: evil if n.endswith("data.pkl") else d)
    with pytest.raises(RefusedGlobal) as e:
        read_zip_tree(str(tmp_path / "evil.pt"))
    assert e.value.name == "os.system" and str(tmp_path / "evil.pt") in str(e.value)
    assert not marker.exists()




def test_ext_opcode_goes_through_the_allowlist(tmp_path):
    import copyreg

    copyreg.add_extension("os", "system", 240)
    try:
        (tmp_path / "x.pt").write_bytes(b"\x80\x02\x82\xf0(S'touch MARKER'\ntR.")
        with pytest.raises(RefusedGlobal) as e:
            read_legacy_tree(str(tmp_path / "x.pt"))
        assert e.value.name == "os.system"
    finally:
        copyreg.remove_extension("os", "system", 240)


def test_legacy_header_then_payload_refused(tmp_path):
    import pickle

    marker = tmp_path / "MARKER"
    head = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}))
    (tmp_path / "l.pt").write_bytes(head + f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    with pytest.raises(RefusedGlobal, match="os.system"):
        read_legacy_tree(str(tmp_path / "l.pt"))
    assert not marker.exists()


@pytest.mark.parametrize("obj", [42, {"a": 1}, 0x1950A86A20F9469CFC6D])
def test_bare_pickle_without_magic_is_format_error(tmp_path, obj):
    import pickle

    (tmp_path / "b.pt").write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(FormatError, match="not a torch checkpoint"):
        read_legacy_tree(str(tmp_path / "b.pt"))


@pytest.mark.parametrize("data", [
    b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00\x7f\x85R.",  # bytearray(2 GiB)
    b"\x80\x02]q\x00h\x00a.",  # a list that contains itself
    b"\x80\x02" + b"]" * 1000 + b"a" * 999 + b".",  # nested 1000 deep
    b"\x80\x02]q\x00" + b"(h\x00h\x00lq\x00" * 200 + b".",  # 2**200 paths through shared references
])
def test_resource_bombs_are_format_errors(tmp_path, data):
    (tmp_path / "b.pt").write_bytes(data)
    with pytest.raises(FormatError):
        read_legacy_tree(str(tmp_path / "b.pt"))


def test_legacy_storages_past_end_of_file(tmp_path):
    torch.save({"a": torch.ones(1000)}, tmp_path / "l.pt", _use_new_zipfile_serialization=False)
    data = (tmp_path / "l.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[:-100])
    with pytest.raises(FormatError, match="truncated"):
        read_legacy_tree(str(tmp_path / "t.pt"))
    assert read_legacy_tree(str(tmp_path / "l.pt"))["a"].shape == (1000,)


def test_random_bytes_never_raise_anything_but_format_errors(tmp_path):
    import random

    rng = random.Random(0)
    good = (tmp_path / "g.pt")
    torch.save({"a": torch.ones(3), "b": [1, 2.5, "x"]}, good, _use_new_zipfile_serialization=False)
    base = good.read_bytes()
    for i in range(300):
        data = bytearray(base)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        (tmp_path / "f.pt").write_bytes(bytes(data[: rng.randint(1, len(data))]))
        try:
            read_legacy_tree(str(tmp_path / "f.pt"))
        except (FormatError, RefusedGlobal) as e:
            assert "\n" not in str(e)


def test_sniff_pickle_protocol_byte():
    assert sniff_torch(b"\x80\x04\x95") == "pt-legacy"
    assert sniff_torch(b"\xff\xd8\xff") is None and sniff_torch(b"\x00") is None  # JPEG, NUL: no pickle opcode


def test_unsupported_zip_version_is_a_format_error(tmp_path):
    # found by the fuzzer: zipfile raises NotImplementedError for a "version needed to extract" it does not know
    torch.save({"a": torch.ones(2)}, tmp_path / "a.pt")
    data = bytearray((tmp_path / "a.pt").read_bytes())
    at = data.index(b"PK\x01\x02")  # first central directory entry
    data[at + 6 : at + 8] = (64).to_bytes(2, "little")  # version needed to extract: 6.4
    (tmp_path / "v.pt").write_bytes(bytes(data))
    with pytest.raises(FormatError, match="v.pt"):
        read_zip_tree(str(tmp_path / "v.pt"))

"""Crafted files found by the final review: each is refused with one ``error:`` line (never ``internal error``),
nothing from the file runs, and nothing outside the checkpoint is read."""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import rewrite_zip


def one_error(r, code: int = 1) -> None:
    assert r.exit_code == code, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "internal error" not in lines[0], r.stderr


def _with_pickle(tmp_path, name: str, payload: bytes):
    """A real torch zip whose data.pkl is replaced by ``payload``."""
    src, dst = tmp_path / "src.pt", tmp_path / name
    torch.save({"w": torch.zeros(2)}, src)
    rewrite_zip(src, dst, lambda n, data: payload if n.endswith("/data.pkl") else data)
    return dst


def test_global_names_cannot_carry_opcodes(tmp_path, run):
    """A GLOBAL written back as text must not smuggle opcodes: a name with a newline is not a Python name."""
    marker = tmp_path / "MARKER"
    name = f"Namespace\n0cposix\nsystem\n(S'touch {marker}'\ntR0cargparse\nNamespace"
    payload = (b"\x80\x02}X\x01\x00\x00\x00a" + b"\x8c\x08argparse" + b"\x8c" + bytes([len(name)]) + name.encode()
               + b"\x93)\x81s.")
    path = _with_pickle(tmp_path, "inject.pt", payload)
    for args in (["inspect"], ["convert", "-o", str(tmp_path / "out.pt")]):
        one_error(run(args[0], path, *args[1:]))
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("dotted", ["_osx_support._read_output", "_aix_support._read_cmd_output",
                                    "torch.utils.bottleneck.__main__.run_cprofile", "numpy.memmap", "torch.from_file"])
def test_more_code_running_names_refused(tmp_path, run, dotted):
    module, name = dotted.rsplit(".", 1)
    payload = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n)R."
    r = run("inspect", _with_pickle(tmp_path, "g.pt", payload))
    one_error(r)
    assert dotted in r.stderr


def test_ordered_dict_build_sets_only_metadata(tmp_path, run):
    """BUILD on an OrderedDict may set ``_metadata`` (as torch's loader does), never shadow a method."""
    payload = b"\x80\x02ccollections\nOrderedDict\n)R}X\x05\x00\x00\x00itemsK\x01sb."
    one_error(run("inspect", _with_pickle(tmp_path, "od.pt", payload)))


def test_compressed_pickle_record_refused(tmp_path, run):
    src, dst = tmp_path / "src.pt", tmp_path / "deflated.pt"
    torch.save({"w": torch.zeros(2)}, src)
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w") as out:
        for info in z.infolist():
            data = z.read(info)
            if info.filename.endswith("data.pkl"):
                info.compress_type = zipfile.ZIP_DEFLATED
            out.writestr(info, data)
    r = run("inspect", dst)
    one_error(r)
    assert "compressed" in r.stderr


def _safetensors_with_header(path, header: str) -> None:
    raw = header.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def test_hostile_safetensors_headers(tmp_path, run):
    deep = tmp_path / "deep.safetensors"
    _safetensors_with_header(deep, "[" * 100_000 + "]" * 100_000)
    huge = tmp_path / "inf.safetensors"
    _safetensors_with_header(huge, json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
                             .replace("[1]", "[1e400]"))
    for path in (deep, huge):
        one_error(run("inspect", path))
        one_error(run("diff", path, path), code=2)  # diff follows cmp: an error is 2


def test_hostile_index(tmp_path, run):
    d = tmp_path / "ck"
    d.mkdir()
    save_file({"w": torch.zeros(2)}, str(d / "model-00001-of-00001.safetensors"))
    index = d / "model.safetensors.index.json"
    index.write_text("[" * 100_000 + "]" * 100_000)
    one_error(run("inspect", d))
    index.write_text(json.dumps({"metadata": [1, 2], "weight_map": {"w": "model-00001-of-00001.safetensors"}}))
    one_error(run("inspect", d))


def _dcp(tmp_path):
    import warnings

    import torch.distributed.checkpoint as dcp

    d = tmp_path / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": {"w": torch.arange(4.0)}}, checkpoint_id=str(d))
    return d


def _rewrite_metadata(d, edit) -> None:
    with open(d / ".metadata", "rb") as f:
        md = pickle.load(f)  # our own test file
    edit(md)
    with open(d / ".metadata", "wb") as f:
        pickle.dump(md, f)


def test_dcp_lengths_beyond_the_file_refused_before_allocating(tmp_path, run):
    d = _dcp(tmp_path)

    def grow(md):
        for info in md.storage_data.values():
            info.length = 1 << 62

    _rewrite_metadata(d, grow)
    for command in ("stats", "show"):
        r = run(command, d, *(["model.w"] if command == "show" else []))
        one_error(r)
        assert "beyond the file" in r.stderr


def test_dcp_deep_or_unhashable_places_refused(tmp_path, run):
    d = _dcp(tmp_path)

    def deep(md):
        md.planner_data = {fqn: tuple(f"p{i}" for i in range(5000)) for fqn in md.state_dict_metadata}

    _rewrite_metadata(d, deep)
    one_error(run("inspect", d))
    d2 = _dcp(tmp_path / "b")

    def unhashable(md):
        md.planner_data = {fqn: ("model", ["x"]) for fqn in md.state_dict_metadata}

    _rewrite_metadata(d2, unhashable)
    one_error(run("inspect", d2))


def test_sidecar_symlink_leading_out_is_linked_not_read(tmp_path, run):
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    d = tmp_path / "model"
    d.mkdir()
    save_file({"w": torch.zeros(2)}, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text("{}")
    (d / "tokenizer.json").symlink_to(secret)
    r = run("convert", d, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    out = tmp_path / "out" / "tokenizer.json"
    assert out.is_symlink() and os.path.realpath(out) == os.path.realpath(secret)
    assert (tmp_path / "out" / "config.json").read_text() == "{}"


# --- from the review of the writers --------------------------------------------------------------------------

def _sharded(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100,
                                                                 n_positions=64))
    d = tmp_path / "gsh"
    model.save_pretrained(d, max_shard_size="50KB")
    return d


def test_output_inside_a_sharded_source_is_refused(tmp_path, run):
    d = _sharded(tmp_path)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    for target in ("model.safetensors.index.json", "model-00001-of-00003.safetensors"):
        r = run("convert", d, "-o", d / target)
        assert r.exit_code == 2 and "file of the sharded checkpoint" in r.stderr, r.stderr
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_in_place_never_changes_a_files_format(tmp_path, run):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    before = path.read_bytes()
    for args in (["--in-place", "--format", "pt"], ["-o", str(path), "--format", "pt"]):
        r = run("convert", path, *args)
        assert r.exit_code == 2 and "--in-place keeps" in r.stderr, r.stderr
    assert path.read_bytes() == before
    legacy = tmp_path / "l.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert run("convert", legacy, "--in-place", "--format", "pt").exit_code == 0  # torch stays torch
    assert torch.equal(torch.load(legacy, weights_only=True)["w"], torch.ones(2))


def test_sharded_drop_recounts_the_index_metadata(tmp_path, run):
    d = _sharded(tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["metadata"]["total_parameters"] = 1  # whatever it says, the write recounts it
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    r = run("drop", d, "--layer", "transformer.h.1", "-o", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    meta = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["metadata"]
    from safetensors import safe_open

    numel = size = 0
    for shard in set(json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"].values()):
        with safe_open(str(tmp_path / "out" / shard), "pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                numel, size = numel + t.numel(), size + t.numel() * t.element_size()
    assert meta["total_parameters"] == numel and meta["total_size"] == size


def test_non_finite_numbers_are_strings_in_every_json(tmp_path, run):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.tensor([float("nan"), 1.0, float("inf")])}, str(a))
    save_file({"w": torch.tensor([float("nan"), float("inf"), 2.0])}, str(b))
    stats = run("stats", a, "--json")
    assert stats.exit_code == 0 and "NaN" not in stats.stdout and "Infinity" not in stats.stdout
    row = stats.json()["tensors"][0]
    assert row["mean"] == "nan"  # (it was null before: the contract's strings everywhere)
    d = run("diff", a, b, "--json")
    assert d.exit_code == 1 and "NaN" not in d.stdout and "Infinity" not in d.stdout
    assert d.json()["changed"][0]["max_abs_diff"] in ("nan", "inf")
    bad = run("diff", a, b, "--rtol", "-1")
    assert bad.exit_code == 2


def _records(obj) -> list[tuple[str, bytes]]:
    buf = io.BytesIO()
    torch.save(obj, buf)
    z = zipfile.ZipFile(buf)
    return [(n.split("/", 1)[1], z.read(n)) for n in z.namelist() if not n.endswith("serialization_id")]


def _locals(records, base: int) -> tuple[bytes, list]:
    """Stored local records (no extra field) and their central-directory entries, the first at ``base``."""
    out, entries = io.BytesIO(), []
    for name, data in records:
        n = ("archive/" + name).encode()
        crc = zipfile.crc32(data)
        entries.append((n, base + out.tell(), crc, len(data)))
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0x21, crc, len(data), len(data), len(n), 0) + n + data)
    return out.getvalue(), entries


def _directory(entries, delta: int = 0) -> bytes:
    return b"".join(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0x21, crc, size, size, len(n),
                                0, 0, 0, 0, 0, off - delta) + n for n, off, crc, size in entries)


@pytest.mark.parametrize("decoy_pickle", [None, b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00truep\x01\x85R."])
def test_zip_whose_directory_is_not_where_its_end_record_says_is_refused(tmp_path, run, decoy_pickle):
    """Two archives in one file: torch's reader takes the end record's directory offset as it is (the decoy,
    first), Python's zipfile corrects it to the directory before the end record (the real one). paramtool
    would show other values than torch.load, or miss a data.pkl that runs code: refused, one line."""
    real = _records({"w": torch.ones(4)})
    decoy = _records({"w": torch.full((4,), 666.0)})
    if decoy_pickle is not None:
        decoy = [(n, decoy_pickle if n == "data.pkl" else d) for n, d in real]
    first, first_entries = _locals(decoy, 0)
    first += b"\0" * 4096  # room, so the second archive's shifted offsets stay positive
    first_dir = _directory(first_entries)
    second, second_entries = _locals(real, len(first) + len(first_dir))
    shift = len(first_dir) + len(second)
    second_dir = _directory(second_entries, delta=shift)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(real), len(real), len(second_dir), len(first), 0)
    (tmp_path / "split.pt").write_bytes(first + first_dir + second + second_dir + end)
    if decoy_pickle is None:
        assert torch.load(tmp_path / "split.pt", weights_only=True)["w"][0] == 666  # torch reads the decoy
    for argv in (["inspect", "--json"], ["show", "w"], ["stats"], ["convert"]):
        extra = [str(tmp_path / "o.safetensors")] if argv[0] == "convert" else []
        r = run(argv[0], tmp_path / "split.pt", *argv[1:], *extra)
        assert r.exit_code == 1 and "ambiguous zip" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.safetensors").exists()


def test_tensors_saved_by_rebuild_tensor_v3_are_rewritten_as_torch_writes_them(tmp_path, run):
    """torch.save writes uint16/32/64 and float8 tensors with _rebuild_tensor_v3 over an untyped storage: a
    rewritten pickle names them the same way, so torch loads them back with their dtype and bytes."""
    x = torch.tensor([1, 60000, 3]).to(torch.uint16)
    f8 = torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn)
    torch.save({"x": x, "f8": f8, "w": torch.randn(3)}, tmp_path / "u16.pt")
    for argv in (["convert", "--dtype", "bf16", "--keep-dtype", "f8", "-o"], ["rename", "s/w/v/", "-o"],
                 ["convert", "-o"]):
        out = tmp_path / f"{argv[0]}{len(argv)}.pt"
        r = run(argv[0], tmp_path / "u16.pt", *argv[1:], out)
        assert r.exit_code == 0, r.stderr
        back = torch.load(out, weights_only=True)
        assert back["x"].dtype == torch.uint16 and torch.equal(back["x"].view(torch.int16), x.view(torch.int16))
        assert back["f8"].dtype == torch.float8_e4m3fn and torch.equal(back["f8"].view(torch.uint8), f8.view(torch.uint8))


def test_compressed_storage_records_are_loaded_whole(tmp_path, run):
    """torch never deflates a storage record but torch.load reads one: such a file has no byte ranges, so every
    command takes the loaded path and sees torch.load's values (a byte range of deflated bytes means nothing)."""
    w = torch.arange(1000.0).reshape(10, 100)
    torch.save({"w": w, "z": torch.zeros(5000)}, tmp_path / "plain.pt")
    with zipfile.ZipFile(tmp_path / "plain.pt") as zi, zipfile.ZipFile(tmp_path / "d.pt", "w") as zo:
        for i in zi.infolist():
            zo.writestr(i.filename, zi.read(i.filename),
                        compress_type=zipfile.ZIP_DEFLATED if "/data/" in i.filename else zipfile.ZIP_STORED)
    assert torch.equal(torch.load(tmp_path / "d.pt", weights_only=True)["w"], w)
    stats = {t["name"]: t for t in run("stats", tmp_path / "d.pt", "--json").json()["tensors"]}
    assert stats["w"]["max"] == 999.0 and stats["z"]["zeros"] == 1.0
    assert run("diff", tmp_path / "d.pt", tmp_path / "plain.pt").exit_code == 0
    for argv in (["convert", tmp_path / "d.pt", tmp_path / "o.safetensors"],
                 ["convert", tmp_path / "d.pt", tmp_path / "c.safetensors", "--dtype", "bf16"],
                 ["rename", tmp_path / "d.pt", "s/w/v/", "-o", tmp_path / "r.pt"],
                 ["init", tmp_path / "d.pt", "--layer", "z", "--scheme", "ones", "--param", "all", "--in-place"]):
        r = run(*argv)
        assert r.exit_code == 0, (argv, r.stderr)
    assert torch.equal(load_file(str(tmp_path / "o.safetensors"))["w"], w)
    assert torch.equal(load_file(str(tmp_path / "c.safetensors"))["w"], w.bfloat16())
    assert torch.equal(torch.load(tmp_path / "r.pt", weights_only=True)["v"], w)
    back = torch.load(tmp_path / "d.pt", weights_only=True)
    assert torch.equal(back["w"], w) and torch.equal(back["z"], torch.ones(5000))

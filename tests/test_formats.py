"""The one format interface: the registry finds each format by name, by a file's bytes and by an output
path, its names are the contract's JSON strings, and no module outside formats/ compares format strings."""
from __future__ import annotations

import pathlib
import re

import pytest
import torch
from safetensors.torch import save_file

from paramtool import formats
from paramtool.errors import FormatError

SRC = pathlib.Path(__file__).resolve().parent.parent / "src" / "paramtool"
NAMES = ("pt", "pt-legacy", "torchscript", "safetensors", "sharded", "dcp", "directory", "module", "gguf")


def test_registry_names_are_the_contract_strings():
    assert sorted(f.name for f in formats.REGISTRY) == sorted(NAMES)
    for name in NAMES:
        assert formats.by_name(name).name == name
    assert formats.find("nn") is None and formats.find(None) is None


def test_sniff_file_picks_the_format_from_the_bytes(tmp_path):
    t = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    save_file(t, tmp_path / "a.bin")  # the extension does not decide
    torch.save(t, tmp_path / "b.safetensors")
    torch.save(t, tmp_path / "c.pt", _use_new_zipfile_serialization=False)
    assert formats.sniff_file(str(tmp_path / "a.bin")) is formats.SAFETENSORS
    assert formats.sniff_file(str(tmp_path / "b.safetensors")) is formats.PT
    assert formats.sniff_file(str(tmp_path / "c.pt")) is formats.PT_LEGACY
    with pytest.warns(DeprecationWarning):  # (torch.jit is deprecated; its archives are still read)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "d.pt"))  # a zip: records decide
    assert formats.sniff_file(str(tmp_path / "d.pt")) is formats.TORCHSCRIPT
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "text").write_bytes(b"%PDF-1.7 not a checkpoint")
    with pytest.raises(FormatError, match="empty file"):
        formats.sniff_file(str(tmp_path / "empty"))
    with pytest.raises(FormatError, match="not a checkpoint"):
        formats.sniff_file(str(tmp_path / "text"))


def test_output_path_extension_names_a_single_file_format():
    assert formats.for_output_path("m.safetensors", formats.PT) is formats.SAFETENSORS
    assert formats.for_output_path("M.PTH", formats.SAFETENSORS) is formats.PT
    assert formats.for_output_path("model.bin", formats.SAFETENSORS) is formats.PT
    assert formats.for_output_path("model", formats.SAFETENSORS) is formats.SAFETENSORS
    assert formats.for_output_path(None, formats.PT) is formats.PT


def test_capabilities():
    assert formats.PT.can_patch(formats.PT) and formats.SAFETENSORS.can_patch(formats.SAFETENSORS)
    assert not formats.PT.can_patch(formats.SAFETENSORS) and not formats.PT_LEGACY.can_patch(formats.PT_LEGACY)
    assert [f.name for f in formats.REGISTRY if f.is_container] == ["sharded", "dcp", "directory"]
    assert not formats.SAFETENSORS.holds_non_tensors and formats.PT.holds_non_tensors


_COMPARE = re.compile(r'(==|!=|\bin \(|\bnot in \()[^#\n]*"(' + "|".join(map(re.escape, NAMES)) + r')"')


def test_no_module_outside_formats_compares_format_strings():
    hits = [f"{p.name}:{i}: {line.strip()}" for p in sorted(SRC.glob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if _COMPARE.search(line.split("#")[0])]
    assert hits == []

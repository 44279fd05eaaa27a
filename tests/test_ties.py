"""`paramtool ties`: storage identity, alias vs overlap, metadata ties in safetensors, --values, module ties."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file, save_model

from paramtool.ties import find_ties
from paramtool.toc import TensorInfo


def groups(run, *args):
    r = run("ties", *args, "--json")
    assert r.exit_code == 0, r.stderr
    return [(g["names"], g["kind"], g["source"]) for g in r.json()["groups"]]


def test_tied_sample_reports_exact_groups(samples, run):
    assert groups(run, samples / "tied.pt") == [
        (["2.bias", "4.bias"], "alias", "storage"),
        (["2.weight", "4.weight"], "alias", "storage"),
    ]
    assert groups(run, samples / "mlp.pt") == []
    assert run("ties", samples / "mlp.pt").stdout.strip() == "no ties"


def test_tied_safetensors_from_save_model_reports_metadata(samples, run):
    assert groups(run, samples / "tied.safetensors") == [
        (["2.bias", "4.bias"], "alias", "metadata"),
        (["2.weight", "4.weight"], "alias", "metadata"),
    ]


def test_views_are_overlaps(tmp_path, run):
    base = torch.arange(24.0).reshape(4, 6)
    torch.save({"base": base, "slice": base[:, 1:3], "t": base.t(), "row": base[2], "other": torch.zeros(3)},
               tmp_path / "v.pt")
    got = groups(run, tmp_path / "v.pt")
    assert got == [(["base", "row", "slice", "t"], "overlap", "storage")]


def test_disjoint_views_share_a_storage_as_slices():
    """As torch groups them (one storage, two data pointers' worth of views): reported, as "slices"; they share
    no bytes, so no edit of one reaches the other (storage_groups, what edits follow, keeps them apart)."""
    from paramtool.ties import storage_groups

    infos = [
        TensorInfo("a", (3,), "float32", "s", 0, (1,)),
        TensorInfo("b", (3,), "float32", "s", 3, (1,)),
        TensorInfo("e", (0,), "float32", "s", 0, (1,)),
    ]
    assert [(g.names, g.kind) for g in find_ties(infos)] == [(("a", "b"), "slices")]
    assert storage_groups(infos) == []


def test_pt_safetensors_pt_keeps_ties(samples, tmp_path, run):
    st, back = tmp_path / "t.safetensors", tmp_path / "back.pt"
    assert run("convert", samples / "tied.pt", st).exit_code == 0
    assert run("convert", st, back).exit_code == 0
    sd, orig = torch.load(back, weights_only=True), torch.load(samples / "tied.pt", weights_only=True)
    assert sd["2.weight"].untyped_storage().data_ptr() == sd["4.weight"].untyped_storage().data_ptr()
    assert all(torch.equal(sd[k], orig[k]) for k in orig)
    assert list(sd) == list(orig)  # the order comes back too, tied names in their places


def test_view_ties_roundtrip_through_safetensors(tmp_path, run):
    base = torch.arange(24.0).reshape(4, 6)
    torch.save({"base": base, "t": base.t(), "row": base[2]}, tmp_path / "v.pt")
    run("convert", tmp_path / "v.pt", tmp_path / "v.safetensors")
    assert groups(run, tmp_path / "v.safetensors") == [(["base", "row", "t"], "overlap", "metadata")]
    run("convert", tmp_path / "v.safetensors", tmp_path / "v2.pt")
    sd = torch.load(tmp_path / "v2.pt", weights_only=True)
    assert torch.equal(sd["t"], base.t()) and torch.equal(sd["row"], base[2])
    sd["base"][2, 0] = -1
    assert sd["row"][0] == -1  # real sharing, not a copy


def test_save_model_file_read_with_ties(tmp_path, run):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    save_model(Tied(), str(tmp_path / "m.safetensors"))
    assert groups(run, tmp_path / "m.safetensors") == [(["emb.weight", "head.weight"], "alias", "metadata")]


def test_values_finds_equal_bytes_only(tmp_path, run):
    a = torch.randn(4, 4)
    save_file({"x": a, "y": a.clone(), "z": torch.randn(4, 4), "w": torch.zeros(3)}, str(tmp_path / "v.safetensors"))
    assert groups(run, tmp_path / "v.safetensors") == []
    assert groups(run, tmp_path / "v.safetensors", "--values") == [(["x", "y"], "alias", "values")]


def test_tied_embedding_head_module_and_init(tmp_path, run):
    spec = "nn:let e = Embedding(10, 4) in Sequential(e, Linear(4, 4), e)"
    # positions 0 and 2 are one module: a tied input embedding and output "head"
    assert groups(run, spec) == [(["0.weight", "2.weight"], "alias", "storage")]
    r = run("init", spec, "--scheme", "zeros", "--layer", "2", "-o", tmp_path / "a.pt")
    assert r.exit_code == 0 and "0.weight" in r.stderr
    sd = torch.load(tmp_path / "a.pt", weights_only=True)
    assert torch.count_nonzero(sd["0.weight"]) == 0
    run("init", spec, "--scheme", "zeros", "--layer", "2", "--untie", "--seed", "1", "-o", tmp_path / "b.pt")
    sd = torch.load(tmp_path / "b.pt", weights_only=True)
    assert torch.count_nonzero(sd["2.weight"]) == 0 and torch.count_nonzero(sd["0.weight"]) > 0


def test_ties_listing_reads_no_tensor_bytes(samples, tmp_path, run):
    import zipfile

    src = zipfile.ZipFile(samples / "tied.pt")
    with zipfile.ZipFile(tmp_path / "garbage.pt", "w") as out:
        for info in src.infolist():
            data = src.read(info)
            if "/data/" in info.filename:
                data = b"\xff" * len(data)
            out.writestr(info, data)
    assert groups(run, tmp_path / "garbage.pt") == groups(run, samples / "tied.pt")

"""Remote checkpoints, read by byte range from real servers on 127.0.0.1: an HTTP server that implements Range
(and the Hub's URL layout, with HF_ENDPOINT pointing at it), and SeaweedFS for S3. The servers count requests
and bytes, so listings are proven to read only what they list."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import safetensors.torch as st
import torch
from conftest import listing_without_torch
from servers import RangeServer, Seaweed

MIB = 1 << 20


def _tensors(doc):
    return [(t["name"], t["shape"], t["dtype"], t["tied_to"]) for t in doc["tensors"]]


def _model(layers: int, width: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    return net.state_dict()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints to serve: each also kept as a local copy to compare with."""
    root = tmp_path_factory.mktemp("served")
    big = _model(40, 256)  # 40 x 256 KiB weights: a 10 MiB file, a few KiB of listing
    st.save_file(big, root / "big.safetensors")
    torch.save(big, root / "big.pt")
    small = _model(3, 8)
    torch.save(small, root / "legacy.pt", _use_new_zipfile_serialization=False)
    many = {f"layer.{i}.weight": torch.full((2,), float(i)) for i in range(1500)}  # a header above 64 KiB
    st.save_file(many, root / "many.safetensors")
    # a sharded checkpoint: three shards and their index
    shards = root / "sharded"
    shards.mkdir()
    names = list(big)
    weight_map = {}
    for i in range(3):
        part = {n: big[n] for n in names[i::3]}
        fname = f"model-{i + 1:05d}-of-00003.safetensors"
        st.save_file(part, shards / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (shards / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    # a Hub repository: a model directory
    repo = root / "org" / "tiny"
    repo.mkdir(parents=True)
    st.save_file(small, repo / "model.safetensors", metadata={"format": "pt"})
    (repo / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    (repo / "README.md").write_text("a tiny model\n")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": net.state_dict(), "epoch": 3}, checkpoint_id=str(root / "dcp"))
    shutil.copytree(root / "dcp", root / "org" / "dcp")
    hub_sharded = root / "org" / "sharded"
    shutil.copytree(shards, hub_sharded)
    (hub_sharded / "config.json").write_text(json.dumps({"model_type": "big"}))
    return root


@pytest.fixture(scope="module")
def http_server(files):
    server = RangeServer(files)
    yield server
    server.close()


@pytest.fixture
def server(http_server, monkeypatch):
    from paramtool import remote

    remote.forget()
    http_server.reset()
    http_server.ignore_range, http_server.fail, http_server.drop_after = False, 0, None
    http_server.token, http_server.after_request, http_server.latency = None, None, 0.0
    monkeypatch.setenv("HF_ENDPOINT", http_server.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(http_server.root / "no-hf-home"))
    yield http_server
    remote.forget()


# --- HTTP: listing reads only what it lists ------------------------------------------------------------------


def test_safetensors_listing_is_one_range_request(server, files, run):
    r = run("inspect", f"{server.url}/big.safetensors", "--json")
    assert r.exit_code == 0, r.stderr
    assert _tensors(r.json()) == _tensors(run("inspect", files / "big.safetensors", "--json").json())
    assert len(server.requests) == len(server.ranged()) == 1  # nothing but one ranged GET
    assert server.sent() <= 64 * 1024 < os.path.getsize(files / "big.safetensors")


def test_large_safetensors_header_takes_two_requests(server, files, run):
    r = run("inspect", f"{server.url}/many.safetensors", "--json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["num_tensors"] == 1500
    assert len(server.requests) == len(server.ranged()) == 2


def test_torch_zip_listing_reads_directory_and_pickle_only(server, files, run):
    r = run("inspect", f"{server.url}/big.pt", "--json")
    assert r.exit_code == 0, r.stderr
    assert _tensors(r.json()) == _tensors(run("inspect", files / "big.pt", "--json").json())
    assert len(server.requests) == len(server.ranged()) == 2  # the head (its pickle), the tail (its directory)
    assert server.sent() < 512 * 1024 and os.path.getsize(files / "big.pt") > 10 * MIB


def test_torch_zip_listing_of_many_records_takes_three_requests(server, files, run):
    """3000 storages: a 330 KB pickle and a 180 KB central directory, neither within the first window. The
    listing asks for the head, the tail (end records and the whole directory) and the rest of the pickle with
    the small records after it (``Blob.will_read``: one request), each byte once."""
    torch.save({f"model.layers.{i}.mlp.weight": torch.full((2,), float(i)) for i in range(3000)}, files / "many.pt")
    try:
        r = run("inspect", f"{server.url}/many.pt", "--json")
        assert r.exit_code == 0, r.stderr
        assert _tensors(r.json()) == _tensors(run("inspect", files / "many.pt", "--json").json())
        assert len(server.requests) == len(server.ranged()) == 3
        ranges = sorted(tuple(int(x) for x in rng.split("=")[1].split("-")) for _, _, rng, _ in server.requests)
        assert all(a_end < b for (_, a_end), (b, _) in zip(ranges, ranges[1:]))  # no byte asked for twice
        assert server.sent() < (files / "many.pt").stat().st_size
    finally:
        os.unlink(files / "many.pt")


def test_listing_a_20_gib_sharded_checkpoint_moves_under_1_mib(server, files, run):
    """Four 5 GiB safetensors shards (sparse files: headers written, data holes) and their index: the listing is
    the index and each shard's head, the shards fetched concurrently, well under 1 MiB in all."""
    root = files / "twenty"
    root.mkdir()
    weight_map = {}
    try:
        for i in range(4):
            name = f"model-{i + 1:05d}-of-00004.safetensors"
            header = {f"layers.{i}.{k}.weight": {"dtype": "F32", "shape": [32768, 10240],
                                                 "data_offsets": [k * (1280 << 20), (k + 1) * (1280 << 20)]}
                      for k in range(4)}
            raw = json.dumps(header).encode()
            raw += b" " * (-len(raw) % 8)
            with open(root / name, "wb") as f:
                f.write(len(raw).to_bytes(8, "little") + raw)
                f.truncate(8 + len(raw) + (5 << 30))
            weight_map.update({n: name for n in header})
        (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        server.latency = 0.05  # (requests sent at once overlap at the server)
        r = run("inspect", f"{server.url}/twenty/model.safetensors.index.json", "--json")
        assert r.exit_code == 0, r.stderr
        assert r.json()["num_tensors"] == 16 and r.json()["num_params"] * 4 == 20 << 30
        # the index with its config.json (absent) at once, then the four shards' heads at once: two round trips
        assert sorted(r[1].rsplit("/", 1)[1] for r in server.requests) == sorted(
            ["config.json", "model.safetensors.index.json"] + list(set(weight_map.values())))
        assert all(r[0] == "GET" for r in server.requests) and server.most_at_once >= 4
        assert server.sent() < (1 << 20)
    finally:
        shutil.rmtree(root)


def test_legacy_torch_file_listing(server, files, run):
    r = run("inspect", f"{server.url}/legacy.pt", "--json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["format"] == "pt-legacy"
    assert _tensors(r.json()) == _tensors(run("inspect", files / "legacy.pt", "--json").json())
    assert len(server.requests) == len(server.ranged())


def test_sharded_index_reads_each_shard_header_once(server, files, run):
    r = run("inspect", f"{server.url}/sharded/model.safetensors.index.json", "--json")
    assert r.exit_code == 0, r.stderr
    local = run("inspect", files / "sharded" / "model.safetensors.index.json", "--json").json()
    assert r.json()["format"] == "sharded" and _tensors(r.json()) == _tensors(local)
    for i in range(3):
        assert len(server.ranged(f"model-{i + 1:05d}-of-00003.safetensors")) == 1
    assert server.sent() < 512 * 1024


def test_listing_imports_no_torch(server):
    r = listing_without_torch(f"{server.url}/big.pt")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["num_tensors"] == 80


# --- HTTP: values by range -----------------------------------------------------------------------------------


def test_stats_show_diff_over_http_equal_local(server, files, run):
    for name in ("big.safetensors", "big.pt", "legacy.pt"):
        remote = run("stats", f"{server.url}/{name}", "--json")
        assert remote.exit_code == 0, remote.stderr
        assert remote.json()["tensors"] == run("stats", files / name, "--json").json()["tensors"]
    assert (run("ties", f"{server.url}/big.safetensors", "--values", "--json").json()["groups"]
            == run("ties", files / "big.safetensors", "--values", "--json").json()["groups"])
    shown = run("show", f"{server.url}/big.pt", "3.bias", "--json")
    assert torch.equal(torch.tensor(shown.json()["values"]), torch.load(files / "big.pt")["3.bias"])
    same = run("diff", files / "big.safetensors", f"{server.url}/big.pt")
    assert same.exit_code == 0, same.stderr
    changed = _model(40, 256)
    changed["7.weight"][3, 4] += 1
    st.save_file(changed, files / "changed.safetensors")
    try:
        d = run("diff", f"{server.url}/big.safetensors", f"{server.url}/changed.safetensors", "--json")
        assert d.exit_code == 1
        assert [c["name"] for c in d.json()["changed"]] == ["7.weight"]
    finally:
        os.unlink(files / "changed.safetensors")


def test_stats_reads_every_byte_once_by_range(server, files, run):
    assert run("stats", f"{server.url}/big.pt", "--json").exit_code == 0
    size = os.path.getsize(files / "big.pt")
    assert len(server.requests) == len(server.ranged())  # no whole-object download
    assert size * 0.95 < server.sent() < size * 1.1


def test_stats_reads_ahead_within_its_bound(server, files, run, monkeypatch):
    from paramtool import remote
    from paramtool.formats import remote_storage

    monkeypatch.setattr(remote_storage, "AHEAD", 1 << 20)  # storages read ahead of the one asked: at most 1 MiB more
    for source in ("big.pt", "big.safetensors"):
        server.reset()
        r = run("stats", f"{server.url}/{source}", "--layer", "3", "--layer", "30", "--json")
        assert r.exit_code == 0, r.stderr
        assert r.json()["tensors"] == run("stats", files / source, "--layer", "3", "--layer", "30", "--json").json()["tensors"]
        selected = 2 * (256 * 256 + 256) * 4
        assert selected < server.sent() < 256 * 1024 + selected + (1 << 20) + 256 * 1024  # head/tail, asked, ahead
        remote.forget()


def _peak_rss(*args: str) -> int:
    """The peak resident memory (bytes) of ``paramtool ARGS`` run in a process of its own (its ``VmHWM``: not
    ``ru_maxrss``, which a child inherits from the process that started it)."""
    code = ("import runpy, sys\nsys.argv = ['paramtool', *sys.argv[1:]]\ntry:\n"
            "    runpy.run_module('paramtool', run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code, e\n"
            "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0], file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return int(r.stderr.split()[-1]) * 1024


def test_value_commands_hold_parts_of_a_large_tensor_not_the_tensor(server, files, tmp_path):
    """A tensor much larger than a part (``remote.PART``) and above ``remote.SPILL``: stats, diff and a conversion
    from the server hold a few parts of it in the process (peak resident memory within 40 MiB of the same
    command on the local copy, where the tensor is 96 MiB), asking at most a part per request and at most
    ``remote.STREAM_AHEAD`` at once (a storage read ahead: two storages at once)."""
    from paramtool import remote

    assert remote.SPILL < 96 * MIB
    torch.manual_seed(0)
    st.save_file({"big": torch.randn(24 * MIB), "small": torch.randn(1000)}, files / "huge.safetensors")
    local, url = str(files / "huge.safetensors"), f"{server.url}/huge.safetensors"
    def convert(source, out):
        return ["convert", source, "--dtype", "bf16", "-o", str(tmp_path / out)]

    cases = [(["stats", local], ["stats", url]), (["diff", local, local], ["diff", local, url]),
             (convert(local, "l.pt"), convert(url, "r.pt"))]
    for on_disk, remote_args in cases:
        want = _peak_rss(*on_disk)
        server.reset()
        got = _peak_rss(*remote_args)
        assert got < want + 40 * MIB, (remote_args[0], got / MIB, want / MIB)
        assert server.sent() > 96 * MIB and max(r[3] for r in server.requests) <= remote.PART
        assert server.most_at_once <= 2 * remote.STREAM_AHEAD
    assert torch.equal(torch.load(tmp_path / "r.pt", weights_only=True)["big"],
                       torch.load(tmp_path / "l.pt", weights_only=True)["big"])
    (files / "huge.safetensors").unlink()


def test_stats_computes_on_a_large_storage_as_it_arrives(server, files, run, tmp_path, monkeypatch):
    """stats without histograms (one pass over the values) takes a storage of ``formats.remote_storage.STREAMED``
    bytes or more as its parts arrive (``remote.Stream``) and computes on each: never spilled to a file and
    mapped (``RemoteBlob.mapped`` is not called, not even to read it ahead), and the numbers are those of the
    local copy to the bit (the parts hold whole chunks of ``numeric.values``), float32 and bfloat16, a last part
    cut short included. With histograms (two passes over the values) such a storage is spilled and mapped."""
    from paramtool import remote
    from paramtool.formats import remote_storage

    monkeypatch.setattr(remote, "PART", 2 * MIB)
    monkeypatch.setattr(remote, "SPILL", 4 * MIB)
    monkeypatch.setattr(remote_storage, "STREAMED", 4 * MIB)
    torch.manual_seed(0)
    state = {"a.weight": torch.randn(2_621_441), "b.bias": torch.randn(10),
             "c.weight": torch.randn(3_000_001).to(torch.bfloat16), "d.weight": torch.randn(1000) + 5}
    st.save_file(state, files / "parts.safetensors")
    torch.save(state, files / "parts.pt")
    spilled = []
    mapped = remote.RemoteBlob.mapped

    def spy(blob, offset, nbytes, private=False):
        spilled.append(nbytes)
        return mapped(blob, offset, nbytes, private)

    monkeypatch.setattr(remote.RemoteBlob, "mapped", spy)
    try:
        for name in ("parts.safetensors", "parts.pt"):
            server.reset()
            got = run("stats", f"{server.url}/{name}", "--json")
            assert got.exit_code == 0, got.stderr
            assert got.json()["tensors"] == run("stats", files / name, "--json").json()["tensors"]
            assert spilled == [] and files.joinpath(name).stat().st_size <= server.sent()
            assert max(r[3] for r in server.ranged(name)) <= 2 * MIB
            remote.forget()
        hist = run("stats", f"{server.url}/parts.safetensors", "--hist", "--json")
        assert hist.exit_code == 0, hist.stderr
        assert hist.json() == {**run("stats", files / "parts.safetensors", "--hist", "--json").json(),
                               "source": f"{server.url}/parts.safetensors"}
        assert sorted(spilled) == [6_000_002, 10_485_764]
    finally:
        os.unlink(files / "parts.safetensors")
        os.unlink(files / "parts.pt")


def test_diff_computes_on_large_storages_as_they_arrive(server, files, run, monkeypatch):
    """diff takes a storage of ``formats.remote_storage.STREAMED`` bytes or more as its parts arrive, on either
    side or both, and compares and sums each chunk pair in one pass: nothing spilled to a file, every byte
    received once, and the same report as on the local copies (bit-exact, within tolerances, NaN included)."""
    from paramtool import remote
    from paramtool.formats import remote_storage

    monkeypatch.setattr(remote, "PART", 2 * MIB)
    monkeypatch.setattr(remote, "SPILL", 4 * MIB)
    monkeypatch.setattr(remote_storage, "STREAMED", 4 * MIB)
    torch.manual_seed(0)
    a = {"w": torch.randn(2_621_441), "v": torch.randn(3_000_001).to(torch.bfloat16), "b": torch.randn(10)}
    b = {k: t.clone() for k, t in a.items()}
    b["w"][2_600_000] += 1e-3  # in the last part, cut short
    b["v"][5] = float("nan")
    st.save_file(a, files / "da.safetensors")
    st.save_file(b, files / "db.safetensors")
    st.save_file(a, files / "dc.safetensors")  # a's values again: equal
    spilled = []
    monkeypatch.setattr(remote.RemoteBlob, "mapped", lambda *args, **kw: spilled.append(args) or None)
    try:
        for flags in ([], ["--atol", "1e-2"]):
            want = run("diff", files / "da.safetensors", files / "db.safetensors", "--json", *flags).json()
            for left in (f"{server.url}/da.safetensors", str(files / "da.safetensors")):
                server.reset()
                got = run("diff", left, f"{server.url}/db.safetensors", "--json", *flags)
                assert got.exit_code == 1, got.stderr
                assert got.json()["changed"] == want["changed"] and want["changed"]
                size = sum((files / n).stat().st_size for n in ("da.safetensors", "db.safetensors")
                           if server.url in (left if n == "da.safetensors" else server.url))
                assert size - 4096 <= server.sent() < size + 256 * 1024  # each byte once (and a header window)
        assert [c["name"] for c in want["changed"]] == ["v"]  # within 1e-2 but NaN
        same = run("diff", f"{server.url}/da.safetensors", f"{server.url}/dc.safetensors", "--json")
        assert same.exit_code == 0 and same.json()["same"] == 3, same.stderr
        assert spilled == []
    finally:
        for n in ("da", "db", "dc"):
            os.unlink(files / f"{n}.safetensors")


def test_ties_values_reads_samples_then_only_the_candidates(server, files, run, monkeypatch):
    """ties --values over HTTP: every tensor of a shared shape and dtype costs its three 4 KiB samples (ranged
    reads, not the tensor), and only tensors whose samples match another's are read whole, a large one as it
    arrives; the groups are those of the local copy."""
    from paramtool import remote
    from paramtool.formats import remote_storage

    monkeypatch.setattr(remote, "PART", 2 * MIB)
    monkeypatch.setattr(remote_storage, "STREAMED", 4 * MIB)
    torch.manual_seed(0)
    state = {f"layer.{i}.weight": torch.randn(1024, 1024) for i in range(12)}  # 4 MiB each
    state["copy.weight"] = state["layer.3.weight"].clone()
    state["same_ends.weight"] = state["layer.5.weight"].clone()
    state["same_ends.weight"][100, 100] += 1  # samples match layer.5, its bytes do not
    st.save_file(state, files / "vt.safetensors")
    try:
        want = run("ties", files / "vt.safetensors", "--values", "--json").json()["groups"]
        assert [g["names"] for g in want] == [["copy.weight", "layer.3.weight"]]
        server.reset()
        got = run("ties", f"{server.url}/vt.safetensors", "--values", "--json")
        assert got.exit_code == 0, got.stderr
        assert got.json()["groups"] == want
        whole = 4 * (4 * MIB)  # layer.3, copy, layer.5, same_ends: checksummed
        compared = 2 * (4 * MIB)  # layer.3 and copy: compared byte for byte
        assert whole < server.sent() < whole + compared + 14 * 3 * 4096 + 256 * 1024
    finally:
        os.unlink(files / "vt.safetensors")


def _on_a_terminal(*args: str) -> tuple[int, bytes, bytes]:
    """``paramtool ARGS`` with its stderr on a pseudo-terminal: (exit status, stdout, what the terminal got)."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "paramtool", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave, env={**os.environ, "TERM": "xterm", "COLUMNS": "100"})
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # (the terminal's other end closed)
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    out = proc.stdout.read()
    proc.stdout.close()
    return proc.wait(), out, seen


def test_a_terminal_sees_the_bytes_received(server, files):
    """On a terminal, value commands show the bytes a remote source sends as they arrive (a transient display on
    stderr, once ``output.TRANSFER_SHOWN`` bytes came), and print the same result; a listing shows none."""
    from paramtool import output

    torch.manual_seed(0)
    st.save_file({"w": torch.randn(output.TRANSFER_SHOWN // 4 + MIB)}, files / "shown.safetensors")
    url = f"{server.url}/shown.safetensors"
    try:
        for args in (["stats", url, "--json"], ["diff", url, str(files / "shown.safetensors"), "--json"]):
            code, out, terminal = _on_a_terminal(*args)
            assert code == 0, terminal
            piped = subprocess.run([sys.executable, "-m", "paramtool", *args], capture_output=True, check=True)
            assert json.loads(out) == json.loads(piped.stdout) and b"received" not in piped.stderr
            assert b"received" in terminal and b"MiB" in terminal, terminal[-300:]
        code, out, terminal = _on_a_terminal("inspect", url, "--json")
        assert code == 0 and b"received" not in terminal, terminal
    finally:
        os.unlink(files / "shown.safetensors")


def test_convert_remote_to_local(server, files, run, tmp_path):
    out = tmp_path / "out.safetensors"
    r = run("convert", f"{server.url}/big.pt", "-o", out)
    assert r.exit_code == 0, r.stderr
    got = st.load_file(out)
    want = torch.load(files / "big.pt", weights_only=True)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    out_pt = tmp_path / "out.pt"
    assert run("convert", f"{server.url}/big.safetensors", "-o", out_pt, "--dtype", "bf16").exit_code == 0
    back = torch.load(out_pt, weights_only=True)
    assert all(torch.equal(back[k], want[k].to(torch.bfloat16)) for k in want)


def test_init_from_remote_source_writes_local(server, files, run, tmp_path):
    out = tmp_path / "init.safetensors"
    r = run("init", f"{server.url}/big.safetensors", "--scheme", "zeros", "--layer", "0", "-o", out)
    assert r.exit_code == 0, r.stderr
    got = st.load_file(out)
    assert not got["0.weight"].any() and torch.equal(got["1.weight"], _model(40, 256)["1.weight"])


def test_writing_to_remote_is_a_usage_error(server, run, tmp_path):
    r = run("convert", f"{server.url}/big.pt", "-o", f"{server.url}/out.safetensors")
    assert r.exit_code == 2 and "read-only" in r.stderr
    r = run("init", f"{server.url}/big.pt", "--scheme", "zeros", "--in-place")
    assert r.exit_code == 2 and r.stderr.startswith("error:")


# --- the Hub -----------------------------------------------------------------------------------------------------


def test_hub_repository_resolves_like_a_model_directory(server, files, run):
    r = run("inspect", "hf://org/tiny", "--json")
    assert r.exit_code == 0, r.stderr
    local = run("inspect", files / "org" / "tiny", "--json").json()
    assert r.json()["format"] == "directory" == local["format"]
    assert _tensors(r.json()) == _tensors(local)
    paths = [p for _, p, _, _ in server.requests]
    assert "/api/models/org/tiny/revision/main" in paths
    assert "/org/tiny/resolve/main/model.safetensors" in paths
    assert not any("README" in p for p in paths)  # sidecars are listed, not read
    f = run("stats", "hf://org/tiny@v1.0/model.safetensors", "--json")
    assert f.exit_code == 0 and any("/resolve/v1.0/" in p for _, p, _, _ in server.requests)


def test_hub_sharded_repository(server, files, run):
    server.latency = 0.05  # (requests sent at once overlap at the server)
    r = run("inspect", "hf://org/sharded", "--json")
    assert r.exit_code == 0, r.stderr
    local = run("inspect", files / "org" / "sharded", "--json").json()
    assert r.json()["format"] == local["format"] == "sharded" and _tensors(r.json()) == _tensors(local)
    gets = [p for m, p, _, _ in server.requests if m == "GET"]
    assert gets.count("/api/models/org/sharded/revision/main") == 1  # listed once
    for i in range(3):  # each shard's header in one request
        assert len(server.ranged(f"/org/sharded/resolve/main/model-{i + 1:05d}-of-00003.safetensors")) == 1
    assert server.sent() < 512 * 1024
    # three round trips: the listing; the index and config.json at once; the shards' heads at once
    names = [p.rsplit("/", 1)[1] for _, p, _, _ in server.requests]
    assert names[0] == "main" and sorted(names[1:3]) == ["config.json", "model.safetensors.index.json"]
    assert len(names) == 6 and server.most_at_once >= 3


def test_hub_dcp_listing_reads_metadata_only(server, files, run):
    r = run("inspect", "hf://org/dcp", "--json")
    assert r.exit_code == 0, r.stderr
    local = run("inspect", files / "dcp", "--json").json()
    assert r.json()["format"] == "dcp" and _tensors(r.json()) == _tensors(local)
    assert {p for m, p, _, _ in server.requests if m == "GET"} == {
        "/api/models/org/dcp/revision/main", "/org/dcp/resolve/main/.metadata"}
    ties = run("ties", "hf://org/dcp", "--values", "--json")
    assert ties.exit_code == 0
    assert ties.json()["groups"] == run("ties", files / "dcp", "--values", "--json").json()["groups"]


def test_hub_token(server, run, monkeypatch):
    server.token = "s3cret-token"
    r = run("inspect", "hf://org/tiny")
    assert r.exit_code == 1 and r.stderr.startswith("error:") and "401" in r.stderr
    assert "Traceback" not in r.stderr
    from paramtool import remote

    remote.forget()
    monkeypatch.setenv("HF_TOKEN", "s3cret-token")
    r = run("inspect", "hf://org/tiny", "--json")
    assert r.exit_code == 0, r.stderr
    assert "s3cret" not in r.stdout + r.stderr


def test_redirects(server, files, run, monkeypatch):
    r = run("inspect", f"{server.url}/redirect/127.0.0.1/big.safetensors", "--json")
    assert r.exit_code == 0, r.stderr
    assert _tensors(r.json()) == _tensors(run("inspect", files / "big.safetensors", "--json").json())
    bad = run("inspect", f"{server.url}/redirect/x/file:///etc/passwd")
    assert bad.exit_code == 1 and "non-HTTP" in bad.stderr



def test_a_token_is_not_sent_to_another_host(server):
    from paramtool import remote
    from paramtool.errors import ParamtoolError

    server.token = "tok"
    auth = {"Authorization": "Bearer tok"}
    same = remote.HttpObject(f"{server.url}/redirect/127.0.0.1/big.safetensors", "same", auth)
    assert same.fetch_into(bytearray(8), 0) == 8
    other = remote.HttpObject(f"{server.url}/redirect/localhost/big.safetensors", "other", auth)
    with pytest.raises(ParamtoolError, match="access denied"):
        other.fetch_into(bytearray(8), 0)
    assert "/big.safetensors" in [r[1] for r in server.requests]  # it reached localhost, without the token


def test_missing_objects_are_one_line(server, run):
    for source in (f"{server.url}/nothing.safetensors", "hf://org/none", "hf://org/tiny/absent.pt"):
        r = run("inspect", source)
        assert r.exit_code == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error:"), r.stderr


# --- faults ------------------------------------------------------------------------------------------------------


def test_server_ignoring_range_is_refused(server, files, run):
    server.ignore_range = True
    r = run("inspect", f"{server.url}/big.safetensors")
    assert r.exit_code == 1 and "ignored the byte range" in r.stderr
    assert server.sent() < 8 * MIB  # the body (10 MiB) was not read through: the client hung up
    # an object within the first range asked for, answered whole (200): that is all of it, taken as such
    r = run("stats", f"{server.url}/legacy.pt", "--json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["tensors"] == run("stats", files / "legacy.pt", "--json").json()["tensors"]


def test_503_bursts_are_retried(server, files, run):
    server.fail = 3
    r = run("stats", f"{server.url}/big.pt", "--json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["tensors"] == run("stats", files / "big.pt", "--json").json()["tensors"]
    assert server.fail == 0  # all three 503s were answered, and retried


def test_connection_dropped_mid_range_resumes(server, files, run):
    def drop_once(request):
        if request[0] == "GET" and server.drop_after is None and not getattr(drop_once, "done", False):
            drop_once.done = True
            server.drop_after = 100_000  # the next ranged answer stops after 100 kB

    server.after_request = drop_once
    r = run("stats", f"{server.url}/big.safetensors", "--json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["tensors"] == run("stats", files / "big.safetensors", "--json").json()["tensors"]
    def span(rng):
        first, last = rng.removeprefix("bytes=").split("-")
        return int(first), int(last) - int(first) + 1

    cut = [(span(rng)[0], sent) for _, _, rng, sent in server.ranged() if sent < span(rng)[1]]
    assert cut, "no connection was dropped"
    start, sent = cut[0]
    assert any(span(rng)[0] == start + sent for _, _, rng, _ in server.ranged())  # resumed where it stopped


def test_object_replaced_mid_read_is_an_error(server, files, run, tmp_path):
    target = files / "swap.safetensors"
    shutil.copy(files / "big.safetensors", target)

    def swap(request):
        if request[1].endswith("swap.safetensors") and not getattr(swap, "done", False):
            swap.done = True
            data = target.read_bytes()
            (files / "swap.tmp").write_bytes(data[:-4] + b"\0\0\0\0")
            os.replace(files / "swap.tmp", target)  # another object (another ETag) at the same URL

    server.after_request = swap
    try:
        r = run("stats", f"{server.url}/swap.safetensors", "--json")
        assert r.exit_code == 1 and "changed while it was read" in r.stderr
        assert r.stdout == ""
    finally:
        os.unlink(target)


def test_https_with_the_certificates_given(files, tmp_path, monkeypatch):
    """An HTTPS server whose certificate only a given bundle trusts (as ``AWS_CA_BUNDLE`` names one for an S3
    store's presigned reads): read with that bundle, refused without it (one line, after the retries)."""
    from paramtool import remote
    from paramtool.errors import FormatError

    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a certificate with")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = RangeServer(files, tls=(str(cert), str(key)))
    try:
        url = f"{server.url}/big.safetensors"
        trusted = remote.HttpObject(url, "trusted", cafile=str(cert))
        head = bytearray(8)
        assert trusted.fetch_into(head, 0) == 8 and head == (files / "big.safetensors").read_bytes()[:8]
        monkeypatch.setattr(remote, "RETRIES", 1)
        with pytest.raises(FormatError, match="cannot connect"):
            remote.HttpObject(url, "untrusted").fetch_into(bytearray(8), 0)
    finally:
        server.close()


# --- S3 (SeaweedFS) ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory, files):
    store = Seaweed(tmp_path_factory.mktemp("seaweed"))
    try:
        env = store.env()
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=store.endpoint)
        fs.mkdir("ckpts")
        fs.put(str(files / "big.safetensors"), "ckpts/big.safetensors")
        fs.put(str(files / "big.pt"), "ckpts/models/big.pt")
        for name in os.listdir(files / "sharded"):
            fs.put(str(files / "sharded" / name), f"ckpts/sharded/{name}")
        for name in os.listdir(files / "org" / "tiny"):
            fs.put(str(files / "org" / "tiny" / name), f"ckpts/tiny/{name}")
        dcp_dir = files / "dcp"
        for name in os.listdir(dcp_dir):
            fs.put(str(dcp_dir / name), f"ckpts/dcp/{name}")
        yield store
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        store.close()


@pytest.fixture
def s3(seaweed):
    from paramtool import remote

    remote.forget()
    yield seaweed
    remote.forget()


def test_s3_file_and_prefixes_list_as_local(s3, files, run):
    cases = [("s3://ckpts/big.safetensors", files / "big.safetensors"),
             ("s3://ckpts/models/big.pt", files / "big.pt"),
             ("s3://ckpts/sharded/", files / "sharded"),
             ("s3://ckpts/tiny/", files / "org" / "tiny"),
             ("s3://ckpts/dcp/", files / "dcp")]
    for source, local in cases:
        r = run("inspect", source, "--json")
        assert r.exit_code == 0, (source, r.stderr)
        want = run("inspect", local, "--json").json()
        assert r.json()["format"] == want["format"] and _tensors(r.json()) == _tensors(want), source


@pytest.fixture(params=["presigned", "get_object"])
def s3_reads(request, s3, monkeypatch):
    """Both ways an S3 object's ranges are read: GETs of a presigned URL (the usual one), and s3fs's
    GetObject calls (where no URL can be signed: monkeypatched so)."""
    import s3fs

    if request.param == "get_object":
        def unsigned(*args, **kwargs):
            raise ValueError("no credentials to sign with")

        monkeypatch.setattr(s3fs.S3FileSystem, "url", unsigned)
    return request.param


def test_s3_values(s3_reads, files, run, tmp_path):
    r = run("stats", "s3://ckpts/models/big.pt", "--json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["tensors"] == run("stats", files / "big.pt", "--json").json()["tensors"]
    assert run("diff", files / "big.safetensors", "s3://ckpts/big.safetensors").exit_code == 0
    assert run("diff", files / "big.safetensors", "s3://ckpts/sharded/").exit_code == 0
    shown = run("show", "s3://ckpts/dcp/", "1.bias", "--json")
    assert shown.exit_code == 0, shown.stderr
    assert shown.json() == run("show", files / "dcp", "1.bias", "--json").json()
    out = tmp_path / "conv"
    c = run("convert", "s3://ckpts/sharded/", "-o", out, "--format", "pt")
    assert c.exit_code == 0, c.stderr
    assert run("diff", out, files / "big.safetensors").exit_code == 0


def test_s3_missing(s3, run):
    r = run("inspect", "s3://ckpts/absent.safetensors")
    assert r.exit_code == 1 and r.stderr.startswith("error:") and "not found" in r.stderr
    assert "paramtool-secret" not in r.stdout + r.stderr


def test_s3_writes(s3, files, run):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint)
    c = run("convert", "s3://ckpts/sharded/", "-o", "s3://ckpts/out/", "--format", "pt")
    assert c.exit_code == 0, c.stderr
    assert "s3://ckpts/out/" in c.stderr
    assert sorted(os.path.basename(p) for p in fs.ls("ckpts/out")) == [
        "pytorch_model-00001-of-00003.bin", "pytorch_model-00002-of-00003.bin", "pytorch_model-00003-of-00003.bin",
        "pytorch_model.bin.index.json"]
    assert run("diff", files / "big.safetensors", "s3://ckpts/out/").exit_code == 0
    again = run("convert", "s3://ckpts/sharded/", "-o", "s3://ckpts/out/")
    assert again.exit_code == 1 and "not empty" in again.stderr
    f = run("init", "s3://ckpts/big.safetensors", "--scheme", "zeros", "--layer", "0", "-o", "s3://ckpts/init.pt")
    assert f.exit_code == 0, f.stderr
    got = torch.load(fs.open("ckpts/init.pt", "rb"), weights_only=True)
    assert not got["0.weight"].any() and torch.equal(got["1.weight"], _model(40, 256)["1.weight"])


def test_s3_one_file_to_a_prefix_goes_under_it(s3, files, run):
    """``-o s3://bucket/prefix/`` where one file is written puts it at ``prefix/`` + the source's file name, as
    ``aws s3 cp FILE s3://bucket/prefix/`` does (never an object whose key ends in '/'); written in another
    format, with that format's extension; beside what the prefix already holds. A directory still needs a new
    prefix."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint)
    same = run("convert", files / "big.pt", "-o", "s3://ckpts/single/")
    assert same.exit_code == 0, same.stderr
    assert "wrote s3://ckpts/single/big.pt " in same.stderr
    remote_src = run("convert", "s3://ckpts/models/big.pt", "-o", "s3://ckpts/single/", "--format", "safetensors")
    assert remote_src.exit_code == 0, remote_src.stderr
    assert "wrote s3://ckpts/single/big.safetensors " in remote_src.stderr
    fs.invalidate_cache()
    assert sorted(fs.find("ckpts/single")) == ["ckpts/single/big.pt", "ckpts/single/big.safetensors"]
    assert run("diff", files / "big.pt", "s3://ckpts/single/big.pt").exit_code == 0
    assert run("diff", files / "big.pt", "s3://ckpts/single/big.safetensors").exit_code == 0
    assert run("inspect", "s3://ckpts/single/big.safetensors", "--json").json()["format"] == "safetensors"
    sharded = run("convert", "s3://ckpts/sharded/", "-o", "s3://ckpts/single/")
    assert sharded.exit_code == 1 and "not empty" in sharded.stderr


def test_s3_killed_multipart_upload_is_aborted_by_the_next_write(s3, run, tmp_path):
    """A multipart upload killed (SIGKILL) between its parts stays incomplete in the bucket; the next write of the
    same key aborts it before writing, and the object it writes is whole."""
    fs = _bucket(s3)
    torch.manual_seed(0)
    state = {"a": torch.randn(3 << 20), "b": torch.randn(3 << 20)}  # 12 MiB each: three 5 MiB parts
    source = tmp_path / "model.safetensors"
    st.save_file(state, source)
    code = ("import sys\nfrom paramtool import remote\nremote.PUT_PART = 5 << 20\nfrom paramtool.launch import main\n"
            f"sys.argv = ['paramtool', 'convert', {str(source)!r}, '-o', *sys.argv[1:]]\nmain()\n")
    env = dict(os.environ, PARAMTOOL_FAULT_COUNT=str(tmp_path / "count"))

    def write(key, *options, **extra):
        return subprocess.run([sys.executable, "-c", code, f"s3://ckpts/{key}", *options], env=dict(env, **extra),
                              capture_output=True, text=True)

    def incomplete():
        return [u["Key"] for u in fs.call_s3("list_multipart_uploads", Bucket="ckpts", Prefix="parts/").get("Uploads", [])]

    counted = write("parts/counted.safetensors")
    assert counted.returncode == 0, counted.stderr
    steps = int((tmp_path / "count").read_text())  # ... "upload", then one step per part
    killed = write("parts/model.safetensors", PARAMTOOL_FAULT_AT=str(steps - 1))  # after two parts of three
    assert killed.returncode == -9, killed.stderr
    assert incomplete() == ["parts/model.safetensors"] and not fs.exists("ckpts/parts/model.safetensors")
    again = write("parts/model.safetensors")
    assert again.returncode == 0, again.stderr
    assert incomplete() == []
    got = st.load(fs.cat_file("ckpts/parts/model.safetensors"))
    assert sorted(got) == ["a", "b"] and all(torch.equal(got[k], state[k]) for k in state)
    sharded = ("--max-shard-size", "13MB")  # a prefix: the next write under it aborts what was left there
    assert write("parts/counted/", *sharded).returncode == 0
    steps = int((tmp_path / "count").read_text())
    killed = write("parts/dir/", *sharded, PARAMTOOL_FAULT_AT=str(steps - 1))  # in the second shard's upload
    assert killed.returncode == -9 and incomplete() == ["parts/dir/model-00002-of-00002.safetensors"]
    assert fs.ls("ckpts/parts/dir") == ["ckpts/parts/dir/model-00001-of-00002.safetensors"]  # (no index: no checkpoint)
    fs.rm("ckpts/parts/dir", recursive=True)  # (a directory is written to an empty prefix)
    assert write("parts/dir/", *sharded).returncode == 0 and incomplete() == []
    assert run("diff", source, "s3://ckpts/parts/dir/").exit_code == 0


def test_s3_without_the_extra_names_it(s3):
    code = ("import sys\nsys.modules['s3fs'] = None\nfrom paramtool.launch import main\n"
            "sys.argv = ['paramtool', 'inspect', 's3://ckpts/big.safetensors']\nmain()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 1 and "paramtool[remote]" in r.stderr and r.stderr.startswith("error:"), r.stderr


def test_s3_object_replaced_mid_read_is_an_error(s3, s3_reads):
    import s3fs

    from paramtool import remote
    from paramtool.errors import FormatError

    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint)
    fs.pipe_file("ckpts/swap.bin", b"a" * (1 << 20))
    blob = remote.open_blob("s3://ckpts/swap.bin")
    assert (blob._object._http is not None) == (s3_reads == "presigned")
    assert blob.pread(1 << 19, 1 << 17) == b"a" * (1 << 17)
    fs.pipe_file("ckpts/swap.bin", b"b" * (1 << 20))
    with pytest.raises(FormatError, match="changed while it was read"):
        blob.pread(0, 1 << 19)


def test_s3_faults_between_client_and_store(s3, s3_reads, files, run, monkeypatch):
    """A proxy in front of SeaweedFS cuts an answer mid-range and answers 503 bursts: the reads are retried (a
    cut range resumed) and the numbers are those of the local copy, on both ways of reading S3 ranges."""
    import s3fs
    from servers import FaultProxy

    from paramtool import remote

    proxy = FaultProxy(s3.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    remote.forget()  # (the s3fs filesystem is made anew, for the proxy)
    want = run("stats", files / "big.safetensors", "--json").json()["tensors"]
    try:
        proxy.arm(3 << 20)  # inside a storage's range, a few MiB in
        r = run("stats", "s3://ckpts/big.safetensors", "--json")
        assert r.exit_code == 0, r.stderr
        assert proxy.dropped == 1
        assert r.json()["tensors"] == want
        remote.forget()
        s3fs.S3FileSystem.clear_instance_cache()  # (new connections: the first two get the 503s)
        proxy.fail = 2
        r = run("stats", "s3://ckpts/big.safetensors", "--json")
        assert r.exit_code == 0, r.stderr
        assert proxy.failed == 2
        assert r.json()["tensors"] == want
        # an upload cut mid-body: retried to a whole object, or one error line and no object at all
        remote.forget()
        s3fs.S3FileSystem.clear_instance_cache()
        proxy.arm(4 << 20, requests=True)
        r = run("convert", files / "big.pt", "-o", "s3://ckpts/faulty/model.safetensors")
        fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint, skip_instance_cache=True, use_listings_cache=False)
        assert proxy.dropped == 2
        if r.exit_code == 0:
            got = st.load(fs.cat_file("ckpts/faulty/model.safetensors"))
            assert all(torch.equal(got[k], t) for k, t in st.load_file(files / "big.safetensors").items())
        else:
            assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
            assert not fs.exists("ckpts/faulty/model.safetensors")
    finally:
        proxy.close()
        remote.forget()


# --- S3: --in-place ------------------------------------------------------------------------------------------------


def _bucket(s3):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=s3.endpoint, skip_instance_cache=True, use_listings_cache=False)


def _upload_sharded(fs, files, prefix):
    for name in os.listdir(files / "sharded"):
        fs.put(str(files / "sharded" / name), f"{prefix}/{name}")


def _sharded_state(fs, prefix):
    """The checkpoint a reader of the prefix's index finds now (every shard it names read with safetensors)."""
    index = json.loads(fs.cat_file(f"{prefix}/model.safetensors.index.json"))
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(st.load(fs.cat_file(f"{prefix}/{shard}")))
    assert sorted(state) == sorted(index["weight_map"])
    return state


def test_s3_in_place_object_is_one_conditional_put(s3, files, run):
    fs = _bucket(s3)
    fs.put(str(files / "big.safetensors"), "ckpts/inplace/one.safetensors")
    r = run("set", "s3://ckpts/inplace/one.safetensors", "0.bias = 3", "--in-place")
    assert r.exit_code == 0, r.stderr
    got = st.load(fs.cat_file("ckpts/inplace/one.safetensors"))
    assert torch.equal(got["0.bias"], torch.full((256,), 3.0)) and torch.equal(got["1.weight"], _model(40, 256)["1.weight"])
    r = run("set", "s3://ckpts/inplace/one.safetensors", "0.bias = 4", "-o", "s3://ckpts/inplace/one.safetensors")
    assert r.exit_code == 0, r.stderr  # -o naming the source counts as --in-place
    assert torch.equal(st.load(fs.cat_file("ckpts/inplace/one.safetensors"))["0.bias"], torch.full((256,), 4.0))
    assert fs.ls("ckpts/inplace", detail=False) == ["ckpts/inplace/one.safetensors"]
    r = run("set", "s3://ckpts/inplace/one.safetensors", "0.bias = 5", "--in-place", "-o", "s3://ckpts/other.pt")
    assert r.exit_code == 2


def test_s3_in_place_refuses_an_object_replaced_since_it_was_read(s3, files, tmp_path):
    from paramtool import remote
    from paramtool.errors import ParamtoolError

    fs = _bucket(s3)
    fs.pipe_file("ckpts/inplace/race.bin", b"a" * 1000)
    blob = remote.open_blob("s3://ckpts/inplace/race.bin")
    assert blob.pread(0, 10) == b"a" * 10  # read: its ETag is pinned
    fs.pipe_file("ckpts/inplace/race.bin", b"b" * 1000)  # another writer
    new = tmp_path / "new.bin"
    new.write_bytes(b"c" * 1000)
    with pytest.raises(ParamtoolError, match="changed since it was read"):
        remote.replace_object(remote.s3fs_filesystem(), str(new), "ckpts/inplace/race.bin", "s3://ckpts/inplace/race.bin")
    assert fs.cat_file("ckpts/inplace/race.bin") == b"b" * 1000  # the other writer's version stays
    remote.forget()


def test_s3_in_place_sharded_commits_through_the_index(s3, files, run, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the rewrite is staged (removed at exit)
    fs = _bucket(s3)
    _upload_sharded(fs, files, "ckpts/inplace-sharded")
    before = {p: fs.info(p)["ETag"] for p in fs.ls("ckpts/inplace-sharded", detail=False)}
    for value in (6, 7):  # twice: the second rewrite renames the renamed shard again, without growing its name
        r = run("set", "s3://ckpts/inplace-sharded/", f"0.bias = {value}", "--in-place")
        assert r.exit_code == 0, r.stderr
        state = _sharded_state(fs, "ckpts/inplace-sharded")
        want = dict(_model(40, 256), **{"0.bias": torch.full((256,), float(value))})
        assert all(torch.equal(state[n], want[n]) for n in want) and sorted(state) == sorted(want)
        names = sorted(os.path.basename(p) for p in fs.ls("ckpts/inplace-sharded", detail=False))
        assert len(names) == 4 and all(len(n) <= len("model-00001-of-00003.12345678.safetensors") for n in names)
        staged = [sorted(os.listdir(d / "checkpoint")) for d in tmp_path.glob("paramtool-upload-*")]
        assert len(staged) == 1 and len(staged[0]) == 2, staged  # the changed shard and the index: the others not downloaded
        for d in tmp_path.glob("paramtool-upload-*"):
            shutil.rmtree(d)
    original = json.loads((files / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]["0.bias"]
    index = json.loads(fs.cat_file("ckpts/inplace-sharded/model.safetensors.index.json"))
    assert index["weight_map"]["0.bias"] != original  # a shard an old index names is never overwritten
    assert not fs.exists(f"ckpts/inplace-sharded/{original}")  # deleted once no index names it
    kept = [p for p in before if os.path.basename(p) not in (original, "model.safetensors.index.json")]
    assert len(kept) == 2 and all(fs.info(p)["ETag"] == before[p] for p in kept)  # not uploaded again


def test_s3_in_place_killed_at_every_upload_step_leaves_old_or_new(s3, files, tmp_path):
    fs = _bucket(s3)
    old = _model(40, 256)
    new = dict(old, **{"0.bias": torch.full((256,), 9.0)})
    env = dict(os.environ, TMPDIR=str(tmp_path), PARAMTOOL_FAULT_COUNT=str(tmp_path / "count"))
    command = [sys.executable, "-m", "paramtool", "set", "", "0.bias = 9", "--in-place"]

    def attempt(prefix, **extra):
        fs.rm(prefix, recursive=True) if fs.exists(prefix) else None
        _upload_sharded(fs, files, prefix)
        command[4] = f"s3://{prefix}/"
        return subprocess.run(command, env=dict(env, **extra), capture_output=True, text=True)

    done = attempt("ckpts/killed")
    assert done.returncode == 0, done.stderr
    steps = int((tmp_path / "count").read_text())
    uploads = 3  # the new shard, the index (the commit), the old shard's deletion
    seen = set()
    for at in range(steps - uploads - 1, steps + 1):  # the last local step, then each step of the upload
        r = attempt("ckpts/killed", PARAMTOOL_FAULT_AT=str(at))
        assert r.returncode == -9, (at, r.stderr)
        state = _sharded_state(fs, "ckpts/killed")
        which = [name for name, want in (("old", old), ("new", new))
                 if sorted(state) == sorted(want) and all(torch.equal(state[n], want[n]) for n in want)]
        assert len(which) == 1, at
        seen.add(which[0])
        again = subprocess.run(command, env=env, capture_output=True, text=True)  # the next write goes through
        assert again.returncode == 0, again.stderr
        assert torch.equal(_sharded_state(fs, "ckpts/killed")["0.bias"], new["0.bias"])
    assert seen == {"old", "new"}


def _dcp_state(directory):
    """The checkpoint torch's own DCP reader finds in a local directory."""
    import torch.distributed.checkpoint as dcp

    state = {"model": {k: torch.empty_like(v) for k, v in torch.nn.Sequential(torch.nn.Linear(4, 8),
                                                                              torch.nn.Linear(8, 2)).state_dict().items()},
             "epoch": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(directory))
    return state


def test_s3_in_place_dcp_killed_at_every_upload_step_leaves_old_or_new(s3, files, tmp_path):
    fs = _bucket(s3)
    env = dict(os.environ, TMPDIR=str(tmp_path), PARAMTOOL_FAULT_COUNT=str(tmp_path / "count"))
    command = [sys.executable, "-m", "paramtool", "set", "s3://ckpts/dcp-killed/", "1.bias = 5", "--in-place"]
    old = _dcp_state(files / "dcp")
    new = dict(old, model=dict(old["model"], **{"1.bias": torch.full((2,), 5.0)}))

    def attempt(**extra):
        fs.rm("ckpts/dcp-killed", recursive=True) if fs.exists("ckpts/dcp-killed") else None
        for name in os.listdir(files / "dcp"):
            fs.put(str(files / "dcp" / name), f"ckpts/dcp-killed/{name}")
        return subprocess.run(command, env=dict(env, **extra), capture_output=True, text=True)

    def now():
        shutil.rmtree(tmp_path / "back", ignore_errors=True)
        fs.get("ckpts/dcp-killed/", str(tmp_path / "back"), recursive=True)
        state = _dcp_state(tmp_path / "back")
        return [name for name, want in (("old", old), ("new", new)) if state["epoch"] == want["epoch"]
                and all(torch.equal(state["model"][k], want["model"][k]) for k in want["model"])]

    done = attempt()
    assert done.returncode == 0, done.stderr
    assert now() == ["new"]
    steps = int((tmp_path / "count").read_text())
    seen = set()
    for at in range(steps - 3, steps + 1):  # the last local step, the new data file, .metadata, the old one's deletion
        assert attempt(PARAMTOOL_FAULT_AT=str(at)).returncode == -9, at
        which = now()
        assert len(which) == 1, at
        seen.add(which[0])
    assert seen == {"old", "new"}


def test_s3_in_place_dcp_commits_through_metadata(s3, files, run, tmp_path):
    import torch.distributed.checkpoint as dcp

    fs = _bucket(s3)
    for name in os.listdir(files / "dcp"):
        fs.put(str(files / "dcp" / name), f"ckpts/inplace-dcp/{name}")
    old = sorted(p for p in fs.ls("ckpts/inplace-dcp", detail=False) if p.endswith(".distcp"))
    r = run("set", "s3://ckpts/inplace-dcp/", "1.bias = 1", "--in-place")
    assert r.exit_code == 0, r.stderr
    now = sorted(p for p in fs.ls("ckpts/inplace-dcp", detail=False) if p.endswith(".distcp"))
    assert now and not set(now) & set(old)  # new data files under new names; the old ones deleted after the commit
    fs.get("ckpts/inplace-dcp/", str(tmp := tmp_path / "back"), recursive=True)
    state = {"model": {k: torch.empty_like(v) for k, v in torch.nn.Sequential(torch.nn.Linear(4, 8),
                                                                              torch.nn.Linear(8, 2)).state_dict().items()},
             "epoch": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(tmp))  # torch's own reader
    assert torch.equal(state["model"]["1.bias"], torch.ones(2)) and state["epoch"] == 3
    shown = run("show", "s3://ckpts/inplace-dcp/", "0.weight", "--json")
    assert shown.json() == run("show", files / "dcp", "0.weight", "--json").json()

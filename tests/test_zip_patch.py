"""``init``/``set`` on a torch zip write one pass over the source (``ZipStorageFile.patch``): every byte is the
source's but the changed storages' and their CRC-32 fields, and torch reads the result as the edit says."""
from __future__ import annotations

import zipfile

import torch


def test_patched_zip_differs_only_in_changed_storages_and_their_crcs(tmp_path, run):
    torch.manual_seed(0)
    sd = {"a.weight": torch.randn(64, 32), "a.bias": torch.randn(64), "b.weight": torch.randn(8, 64)}
    src, out = tmp_path / "m.pt", tmp_path / "o.pt"
    torch.save(sd, src)
    r = run("init", src, "--layer", "a", "--scheme", "normal", "--seed", "1", "-o", out)
    assert r.exit_code == 0, r.stderr
    before, after = src.read_bytes(), out.read_bytes()
    assert len(before) == len(after)
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None  # every CRC-32 matches its record
        infos = {i.filename.split("/", 1)[1]: i for i in z.infolist()}
    got = torch.load(out, weights_only=True)
    assert torch.equal(got["b.weight"], sd["b.weight"]) and torch.equal(got["a.bias"], sd["a.bias"])
    assert not torch.equal(got["a.weight"], sd["a.weight"])
    # the bytes that differ all lie in a.weight's record or in a CRC-32 field
    record = next(name for name, i in infos.items() if name.startswith("data/") and i.file_size == 64 * 32 * 4)
    info = infos[record]
    name_len, extra_len = (int.from_bytes(after[info.header_offset + o:info.header_offset + o + 2], "little")
                           for o in (26, 28))  # the local header's own (torch pads there, not centrally)
    data_at = info.header_offset + 30 + name_len + extra_len
    allowed = set(range(data_at, data_at + info.file_size))
    differ = [i for i, (x, y) in enumerate(zip(before, after)) if x != y]
    outside = [i for i in differ if i not in allowed]
    assert differ and len(outside) <= 12  # its local header's, data descriptor's and central directory's CRC-32
    crc = zipfile.ZipFile(out).getinfo(info.filename).CRC.to_bytes(4, "little")
    for i in outside:
        assert after[i] in crc

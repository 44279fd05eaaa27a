"""What a local write's start-up does without: the remote medium (``paramtool.remote`` imports ``http.client``,
``ssl`` and ``email``, about 35 ms) is imported only when a source or an output is remote."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import launch_without

REMOTE = ("paramtool.remote", "http.client", "ssl")


@pytest.mark.parametrize("args", [["convert", "{pt}", "{out}.safetensors"],
                                  ["rename", "{st}", "s/^a/b/", "-o", "{out}.safetensors"],
                                  ["drop", "{pt}", "--layer", "a.weight", "-o", "{out}.pt"],
                                  ["convert", "{st}", "{out}.safetensors", "--dtype", "bf16"]])
def test_local_write_does_not_import_the_remote_medium(tmp_path, args):
    sd = {"a.weight": torch.randn(4, 4), "c.weight": torch.randn(3)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    torch.save(sd, tmp_path / "m.pt")
    names = {"pt": str(tmp_path / "m.pt"), "st": str(tmp_path / "m.safetensors"), "out": str(tmp_path / "out")}
    r = launch_without([a.format(**names) for a in args], REMOTE, entry="paramtool.cli")
    assert r.returncode == 0, r.stderr
    out = tmp_path / ("out.pt" if args[-1].endswith(".pt") else "out.safetensors")
    got = torch.load(out, weights_only=True) if out.suffix == ".pt" else load_file(str(out))
    assert set(got) == ({"b.weight", "c.weight"} if args[0] == "rename" else
                        {"c.weight"} if args[0] == "drop" else set(sd))
    assert torch.equal(got["c.weight"], sd["c.weight"].to(got["c.weight"].dtype))

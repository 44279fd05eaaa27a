"""Training checkpoints as their libraries write them: a real Lightning ``Trainer.fit`` (Adam, a StepLR scheduler,
``save_hyperparameters``), read, narrowed with ``--key``, edited and converted, and loaded back by Lightning."""
from __future__ import annotations

import shutil
import warnings

import pytest
import torch

L = pytest.importorskip("lightning")


class LitModel(L.LightningModule):
    def __init__(self, hidden: int = 8, lr: float = 0.01, name: str = "tiny"):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

    def training_step(self, batch, index):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        optim = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return [optim], [torch.optim.lr_scheduler.StepLR(optim, step_size=1)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint written by ``trainer.save_checkpoint`` after 2 training steps."""
    path = tmp_path_factory.mktemp("lightning") / "model.ckpt"
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randn(8, 1))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(LitModel(hidden=8, lr=0.01, name="tiny"), torch.utils.data.DataLoader(data, batch_size=4))
    trainer.save_checkpoint(path)
    return path


@pytest.fixture
def ckpt(trained, tmp_path):
    shutil.copy(trained, tmp_path / "model.ckpt")
    return tmp_path / "model.ckpt"


def raw(path):
    return torch.load(path, weights_only=False, map_location="cpu")


def test_inspect_hyper_parameters_shows_values(ckpt, run):
    r = run("inspect", ckpt, "--key", "hyper_parameters")
    assert r.exit_code == 0, r.stderr
    assert "hidden: 8" in r.stdout and "lr: 0.01" in r.stdout and "name: 'tiny'" in r.stdout
    doc = run("inspect", ckpt, "--key", "hyper_parameters", "--json").json()
    assert doc["values"] == {"hidden": 8, "lr": 0.01, "name": "tiny"} and doc["key"] == "hyper_parameters"
    assert doc["tensors"] == [] and doc["num_tensors"] == 0 and doc["source"] == str(ckpt)
    doc = run("inspect", ckpt, "--key", "lr_schedulers", "--json").json()
    assert doc["values"][0]["step_size"] == 1 and doc["values"][0]["_last_lr"] == [0.001]


def test_inspect_args_sub_tree_non_finite_values_follow_the_json_convention(tmp_path, run):
    torch.save({"args": {"lr": float("inf"), "layers": [1, 2], "opt": {"name": "adam", "eps": float("nan")}},
                "model": torch.nn.Linear(2, 2).state_dict()}, tmp_path / "train.pt")
    doc = run("inspect", tmp_path / "train.pt", "--key", "args", "--json").json()
    assert doc["values"] == {"lr": "inf", "layers": [1, 2], "opt": {"name": "adam", "eps": "nan"}}
    text = run("inspect", tmp_path / "train.pt", "--key", "args").stdout
    assert "layers: [1, 2]" in text and "opt" in text and "name: 'adam'" in text


def test_init_warns_about_optimizer_states_and_lightning_loads_the_result(ckpt, run, tmp_path):
    before = raw(ckpt)
    r = run("init", ckpt, "--scheme", "zeros", "--layer", "net.0", "-o", tmp_path / "out.ckpt")
    assert r.exit_code == 0, r.stderr
    assert "optimizer state in 'optimizer_states.0'" in r.stderr and "net.0.weight" in r.stderr and "stale" in r.stderr
    model = LitModel.load_from_checkpoint(tmp_path / "out.ckpt")
    assert model.hparams.name == "tiny"
    sd = before["state_dict"]
    assert torch.count_nonzero(model.net[0].weight) == 0
    for name in ("net.0.bias", "net.2.weight", "net.2.bias"):
        assert torch.equal(model.state_dict()[name], sd[name]), name
    after = raw(tmp_path / "out.ckpt")
    assert set(after) == set(before) and after["epoch"] == before["epoch"]
    for i, moments in before["optimizer_states"][0]["state"].items():
        assert all(torch.equal(after["optimizer_states"][0]["state"][i][k], v) for k, v in moments.items())


def test_set_with_key_keeps_the_whole_checkpoint(ckpt, run):
    r = run("set", ckpt, "--key", "state_dict", "net.2.bias = 5", "--in-place")
    assert r.exit_code == 0, r.stderr
    model = LitModel.load_from_checkpoint(ckpt)
    assert model.net[2].bias.item() == 5
    assert set(raw(ckpt)) >= {"optimizer_states", "lr_schedulers", "hyper_parameters", "loops"}


def test_convert_state_dict_sub_tree_to_safetensors_and_pt(ckpt, run, tmp_path):
    from safetensors.torch import load_file

    sd = raw(ckpt)["state_dict"]
    r = run("convert", ckpt, "--key", "state_dict", tmp_path / "out.safetensors")
    assert r.exit_code == 0, r.stderr
    st = load_file(tmp_path / "out.safetensors")
    assert set(st) == set(sd) and all(torch.equal(st[k], v) for k, v in sd.items())
    r = run("convert", ckpt, "--key", "state_dict", tmp_path / "sd.pt")
    assert r.exit_code == 0, r.stderr
    pt = torch.load(tmp_path / "sd.pt", weights_only=True)
    assert list(pt) == list(sd) and all(torch.equal(pt[k], v) for k, v in sd.items())  # the sub-tree only
    model = LitModel()
    model.load_state_dict(pt)  # strict: no missing or unexpected keys
    assert torch.equal(model.net[0].weight, sd["net.0.weight"])


def test_drop_extra_is_honoured_for_pt_and_never_silent_for_safetensors(ckpt, run, tmp_path):
    sd = raw(ckpt)["state_dict"]
    r = run("convert", ckpt, tmp_path / "all.safetensors")
    assert r.exit_code == 1 and "--drop-extra" in r.stderr and "epoch" in r.stderr
    assert not (tmp_path / "all.safetensors").exists()
    r = run("convert", ckpt, "--drop-extra", tmp_path / "weights.pt")
    assert r.exit_code == 0, r.stderr
    flat = torch.load(tmp_path / "weights.pt", weights_only=True)
    assert list(flat) == list(sd) and all(torch.equal(flat[k], v) for k, v in sd.items())
    r = run("convert", ckpt, tmp_path / "whole.pt")  # without --drop-extra a torch file keeps everything
    assert r.exit_code == 0 and set(raw(tmp_path / "whole.pt")) == set(raw(ckpt))

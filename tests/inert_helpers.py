"""Objects that real training checkpoints hold beside their tensors, for tests/test_inert.py.

Kept in their own module so a test can prove paramtool never imports it while reading a file that names it.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class TrainConfig:
    lr: float = 0.1
    name: str = "run-1"
    layers: tuple = (4, 8)


def lightning_module_class():
    """A small LightningModule (defined lazily: importing lightning is slow)."""
    import lightning as L
    import torch

    class TinyModule(L.LightningModule):
        def __init__(self, cfg, extra, lr: float = 0.05):
            super().__init__()
            self.save_hyperparameters()
            self.layer = torch.nn.Linear(4, 2)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    return TinyModule


class AttrDict(dict):
    """A dict with attribute access, as EasyDict / AttributeDict-style checkpoints use for their state."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

"""Generate the sample checkpoints, deterministically (fixed seeds): python sample_models/generate.py [--out DIR]

The three models of D2L's parameter-management chapter, each as a torch state dict (.pt) and safetensors,
plus a training checkpoint and a bfloat16 model. Everything is a few KB.
"""
from __future__ import annotations

import argparse
import pathlib

import torch
from safetensors.torch import save_file
from torch import nn


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def block1() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU())


def block2() -> nn.Module:
    net = nn.Sequential()
    for i in range(4):
        net.add_module(f"block {i}", block1())
    return net


def rgnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(block2(), nn.Linear(4, 1))


def tied() -> nn.Module:
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(8, 1))


def training_checkpoint() -> dict:
    net = mlp()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)
    loss = nn.functional.mse_loss(net(x), y)
    loss.backward()
    opt.step()
    return {"epoch": 3, "model": net.state_dict(), "optimizer": opt.state_dict(), "loss": round(loss.item(), 6)}


def save_tied_safetensors(model: nn.Module, path: pathlib.Path) -> None:
    """What ``safetensors.torch.save_model`` writes (one copy of each tied tensor, the dropped names in the
    metadata as ``{dropped: kept}``), but with a fixed choice of names so the bytes are reproducible."""
    kept: dict[int, str] = {}
    tensors, metadata = {}, {}
    for name, t in model.state_dict().items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in kept:
            metadata[name] = kept[ptr]
        else:
            kept[ptr] = name
            tensors[name] = t
    save_file(tensors, str(path), metadata=dict(sorted(metadata.items())) or None)


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, build in (("mlp", mlp), ("rgnet", rgnet), ("tied", tied)):
        model = build()
        torch.save(model.state_dict(), out_dir / f"{name}.pt")
        save_tied_safetensors(model, out_dir / f"{name}.safetensors")
        written += [out_dir / f"{name}.pt", out_dir / f"{name}.safetensors"]
    bf16 = {k: v.to(torch.bfloat16) for k, v in mlp().state_dict().items()}
    torch.save(bf16, out_dir / "bf16.pt")
    save_file(bf16, str(out_dir / "bf16.safetensors"))
    torch.save(training_checkpoint(), out_dir / "train.pt")
    written += [out_dir / "bf16.pt", out_dir / "bf16.safetensors", out_dir / "train.pt"]
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parent)
    for path in generate(parser.parse_args().out):
        print(path)

"""A small LightningModule and data for the Lightning tests (also run as a 2-process DDP worker).

    python tests/workers/lightning_module.py OUT_DIR      # Trainer(devices=2, strategy="ddp") on the CPU
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Classifier(pl.LightningModule):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class TwoOptimizers(Classifier):
    """Manual optimization with two optimizers over different parameters: SGD with momentum for the first layer,
    Adam for the rest."""

    def __init__(self, width: int = 32) -> None:
        super().__init__(width)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        first, rest = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        first.zero_grad()
        rest.zero_grad()
        self.manual_backward(loss)
        first.step()
        rest.step()
        return loss

    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1, momentum=0.9),
                torch.optim.Adam([p for layer in self.net[1:] for p in layer.parameters()], lr=0.01)]


class RandomData(pl.LightningDataModule):
    """`loader()` as a datamodule (for LightningCLI)."""

    def train_dataloader(self) -> DataLoader:
        return loader()


def loader(rank_offset: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(rank_offset)
    x = torch.randn(64, 16, generator=g)
    return DataLoader(TensorDataset(x, (x[:, :4].argmax(1))), batch_size=8, shuffle=False)


def main(out_dir: str) -> None:
    from dst_prune.distributed.ddp import mask_digest
    from dst_prune.integrations.lightning import DSTCallback

    pl.seed_everything(0)
    callback = DSTCallback(sparsity=0.75, method="rigl", update_every=2, dense_stem_and_head=False)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=12, logger=False, callbacks=[callback],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Classifier(), loader())
    dst = callback.dst
    calls = []  # Lightning must ask every rank for the callback's state (a collective under FSDP2)
    state_dict = callback.state_dict
    callback.state_dict = lambda: calls.append(1) or state_dict()
    trainer.save_checkpoint(Path(out_dir, "ddp.ckpt"))
    Path(out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(
        {"digest": mask_digest(dst.targets), "in_sync": dst.check_sync(), "updates": dst.update_index,
         "active": sum(t.active() for t in dst.targets), "budget": dst.budget, "state_dict_calls": len(calls)}))


if __name__ == "__main__":
    main(sys.argv[1])

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
    Path(out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(
        {"digest": mask_digest(dst.targets), "in_sync": dst.check_sync(), "updates": dst.update_index,
         "active": sum(t.active() for t in dst.targets), "budget": dst.budget}))


if __name__ == "__main__":
    main(sys.argv[1])

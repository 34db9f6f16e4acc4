"""The HF callback's save path under FSDP2 on 2 CPU ranks (gloo), through a real `transformers.Trainer`.

    torchrun --standalone --nproc_per_node 2 tests/workers/hf_fsdp_save.py OUT_DIR

A tiny GPT-2 is made sparse by `DSTCallback` while the Trainer is built, then sharded with `fully_shard`
(per block, then the root) before training, as transformers' own load-time FSDP2 does: the model is marked
as sharded by transformers (`_is_distributed_loading_by_transformers`), so the Trainer neither wraps it in
DDP nor shards it again, and saves with `save_only_model=True` (the only form transformers saves such a
model in). Every checkpoint runs the callback's save path, whose `dst.state_dict()` gathers the sharded
masks: a collective that every rank must join. Each rank writes one JSON file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import DistributedConfig, GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from dst_prune.integrations.hf import DSTCallback

VOCAB = 64


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    args = TrainingArguments(output_dir=f"{out_dir}/run", max_steps=4, per_device_train_batch_size=4, save_steps=2,
                             save_only_model=True, report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1000,
                             seed=0, learning_rate=1e-3, max_grad_norm=0.0)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False))
    # sharded below, as transformers' own FSDP2 loading (`from_pretrained(distributed_config=...)`) does
    model._is_distributed_loading_by_transformers = True
    model.config.distributed_config = DistributedConfig(fsdp_size=world)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": (ids := torch.randint(0, VOCAB, (16,), generator=g)), "labels": ids} for _ in range(32)]
    callback = DSTCallback(sparsity=0.9, method="rigl", update_every=1)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    mesh = init_device_mesh("cpu", (world,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    trainer.train()
    dst = callback.dst
    saved = sorted(p.parent.name for p in Path(out_dir, "run").glob("checkpoint-*/dst_state.pt"))
    state = torch.load(Path(out_dir, "run", "checkpoint-4", "dst_state.pt"), weights_only=True)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "sharded": all(t.sharded for t in dst.targets), "in_sync": dst.check_sync(), "updates": dst.update_index,
        "saved": saved, "digest": dst.state_dict()["masks_digest"], "saved_digest": state["masks_digest"],
        "saved_step": state["step_count"]}))
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])

"""The framework callbacks, installed as `dst_prune.integrations`: `hf` (transformers' Trainer), `lightning`,
`timm` (timm's train.py) and `accelerate`; `callback_core` is what they share.

Each module imports its outside framework; `dst_prune` itself does not. What `scripts/train.py` needs
(checkpoints, datasets, run log, plots, models) is in `dst_prune.training`.
"""

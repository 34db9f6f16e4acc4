"""What `scripts/train.py` needs: the safe checkpoint folder (`checkpoints`), the datasets it trains on
(`data`, `datasets`), the run log (`run_log`), plots (`plots`) and the models it builds by name (`models`).

These import their outside libraries (safetensors, torchvision, timm, tensorboard, matplotlib): install the
`[train]` extra. `import dst_prune` never imports this package.
"""

"""Supervised fine-tuning (full, LoRA, QLoRA).

config (TrainConfig, recipes) -> data (rows to examples) -> setup (model, optimizer, data) ->
trainer (the `Trainer` loop and `train`), with loss, order (which rows each step takes),
distributed, checkpoints and metrics as its parts.
"""

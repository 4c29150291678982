"""AdamW with linear warmup and linear decay, shared by the task modules."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn


def adamw_with_linear_schedule(
    module: L.LightningModule, learning_rate: float, weight_decay: float, warmup_ratio: float
) -> dict[str, Any]:
    """Build the optimizer over the parameters trainable *now* and a per-step warmup/decay schedule.

    A PEFT callback freezes the base and injects adapters before Lightning calls
    ``configure_optimizers``, so ``requires_grad`` is read here, not in ``__init__``. Weight decay
    applies to matrices only; biases and norm scales (1-D) are not decayed.
    """
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(
            f"{type(module).__name__} has no trainable parameters: every parameter has requires_grad=False,"
            " so there is nothing to optimize. If a PEFT callback froze the base model, check that its target"
            " modules match layers of this model (and that the callback is passed to the Trainer)."
        )
    groups = [
        {"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate)

    total = module.trainer.estimated_stepping_batches
    if not math.isfinite(total):
        rank_zero_warn(
            "The number of training steps is unknown (no max_steps and an unsized dataloader), so the learning"
            " rate stays constant after warmup. Set Trainer(max_steps=...) to get the linear decay."
        )
    total = int(total) if math.isfinite(total) else None
    warmup = int(warmup_ratio * total) if total is not None else 0

    def factor(step: int) -> float:
        # Never exactly 0, so no optimizer step is wasted at lr = 0.
        if step < warmup:
            return (step + 1) / warmup
        if total is None:
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def check_schedule_args(owner: str, learning_rate: float, weight_decay: float, warmup_ratio: float) -> None:
    if learning_rate <= 0:
        raise ValueError(f"{owner}: learning_rate must be > 0, got {learning_rate}.")
    if weight_decay < 0:
        raise ValueError(f"{owner}: weight_decay must be >= 0, got {weight_decay}.")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(
            f"{owner}: warmup_ratio is the fraction of training steps spent warming up and must be in [0, 1),"
            f" got {warmup_ratio}."
        )

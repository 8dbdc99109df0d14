"""Optimizer and learning-rate schedule (pure functions of the config and the step)."""

from __future__ import annotations

import math

import torch

from tuneforge.config import RANGE_START, TrainSettings


def build_optimizer(model: torch.nn.Module, train: TrainSettings) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (never on biases, norms or other 1-D parameters)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # foreach=True: one fused update over all tensors instead of a Python loop per parameter.
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=train.lr, betas=(0.9, 0.999), eps=train.adam_eps,
                             foreach=True)


def warmup_steps(train: TrainSettings, total_steps: int) -> int:
    return math.ceil(train.warmup_ratio * total_steps)


def lr_at(step: int, total_steps: int, train: TrainSettings) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to `lr`, then the chosen decay to 0; or, for
    "exponential", a geometric rise from lr x RANGE_START at the first step to lr at the last (a range test)."""
    if train.scheduler == "exponential":
        return train.lr * RANGE_START ** (1.0 - step / max(1, total_steps - 1))
    warm = warmup_steps(train, total_steps)
    if step < warm:
        return train.lr * (step + 1) / warm
    if train.scheduler == "constant":
        return train.lr
    decay_steps = max(1, total_steps - warm)
    progress = min(1.0, (step - warm) / decay_steps)
    if train.scheduler == "linear":
        return train.lr * (1.0 - progress)
    return train.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

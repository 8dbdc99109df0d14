"""Validation loss: the answer-token mean cross-entropy over a whole held-out set."""

from __future__ import annotations

import torch

from tuneforge.data.batching import collate
from tuneforge.data.tokenize import TokenizedExample
from tuneforge.train.forward import batch_loss_sum


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    examples: list[TokenizedExample],
    batch_size: int,
    packing: bool,
    pad_id: int,
    device: str,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], packing, pad_id).to(device)
        with torch.autocast(device_type=device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            total += float(batch_loss_sum(model, batch))
        count += batch.num_targets
    model.train(was_training)
    return total / max(count, 1)

"""Validation loss: the answer-token mean cross-entropy over a whole held-out set."""

from __future__ import annotations

import torch

from tuneforge.data.batching import collate
from tuneforge.data.tokenize import TokenizedExample
from tuneforge.train import distributed
from tuneforge.train.forward import AnswerTokenLossSum


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    examples: list[TokenizedExample],
    batch_size: int,
    packing: bool,
    pad_id: int,
    device: str,
    autocast_dtype: torch.dtype | None = None,
    world: distributed.World | None = None,
    loss_module: torch.nn.Module | None = None,
) -> float:
    """`loss_module`: the (DDP/FSDP-wrapped) `AnswerTokenLossSum` of a distributed run; each rank then scores its
    share of the batches and the sums are added up over ranks."""
    world = world or distributed.World("none")
    loss_module = loss_module or AnswerTokenLossSum(model)
    was_training = loss_module.training
    loss_module.eval()
    batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    mine = distributed.my_share(world, batches)
    total, count = 0.0, 0
    # Every rank makes the same number of forward passes (FSDP all-gathers weights in each); a rank whose share is
    # shorter repeats a batch and does not count it.
    for i in range(distributed.share_count(world, len(batches))):
        rows = mine[i] if i < len(mine) else batches[0]
        batch = collate(rows, packing, pad_id).to(device)
        with torch.autocast(device_type=device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss_sum = float(loss_module(batch))
        if i < len(mine):
            total, count = total + loss_sum, count + batch.num_targets
    loss_module.train(was_training)
    total, count = distributed.all_reduce_sum(world, [total, float(count)])
    return total / max(count, 1)

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
    total, count = _loss_sums(model, examples, batch_size, packing, pad_id, device, autocast_dtype, world, loss_module)
    return total / max(count, 1)


def validation_by_source(model, examples: list[TokenizedExample], batch_size: int, packing: bool, pad_id: int,
                         device: str, autocast_dtype=None, world=None, loss_module=None) -> tuple[float, dict[str, float]]:
    """The overall validation loss and one per source (examples' `origin`), each an answer-token mean: what a user
    watches to see the task improve while general data holds (or not)."""
    names = list(dict.fromkeys(ex.origin for ex in examples))
    sums = {name: _loss_sums(model, [ex for ex in examples if ex.origin == name], batch_size, packing, pad_id, device,
                             autocast_dtype, world, loss_module) for name in names}
    total, count = sum(t for t, _ in sums.values()), sum(c for _, c in sums.values())
    return total / max(count, 1), {name: t / max(c, 1) for name, (t, c) in sums.items()}


@torch.no_grad()
def _loss_sums(model, examples, batch_size, packing, pad_id, device, autocast_dtype, world, loss_module):
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
    return total, count

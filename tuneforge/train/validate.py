"""Validation loss: the answer-token mean cross-entropy over a whole held-out set."""

from __future__ import annotations

import torch

from tuneforge.data.batching import collate, merge_micro_batches
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
                         device: str, autocast_dtype=None, world=None, loss_module=None,
                         tokens_per_batch: int = 0) -> tuple[float, dict[str, float]]:
    """The overall validation loss and one per source (examples' `origin`), each an answer-token mean: what a user
    watches to see the task improve while general data holds (or not). `tokens_per_batch`: packed rows of up to
    this many tokens instead of batch_size examples (training's micro-batch budget: a pass without gradients holds
    less than a training pass of the same row)."""
    names = list(dict.fromkeys(ex.origin for ex in examples))
    sums = {name: _loss_sums(model, [ex for ex in examples if ex.origin == name], batch_size, packing, pad_id, device,
                             autocast_dtype, world, loss_module, tokens_per_batch) for name in names}
    total, count = sum(t for t, _ in sums.values()), sum(c for _, c in sums.values())
    return total / max(count, 1), {name: t / max(c, 1) for name, (t, c) in sums.items()}


def validation_pairs(loss_module: torch.nn.Module, pairs: list, batch_size: int, collate_fn, device: str,
                     autocast_dtype=None, world=None) -> tuple[float, list[float]]:
    """A preference objective's mean loss over held-out pairs and the summed statistics of
    tuneforge.train.preference.STATS. ORPO's NLL term is a token mean over the whole set, as over a whole step."""
    batches = [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)]
    collated = [collate_fn(rows) for rows in batches]
    nll_tokens = sum(b.num_nll_targets for b in collated)
    for batch in collated:
        batch.nll_scale = len(pairs) / nll_tokens if nll_tokens else 0.0
    if collated and collated[0].kl_batch is not None:  # KTO: its KL estimate over the whole held-out set first
        from tuneforge.train.preference import set_kl

        world = world or distributed.World("none")
        set_kl(loss_module, distributed.my_share(world, collated), distributed.share_count(world, len(collated)),
               world, device, autocast_dtype, collated[0])
    total, count, stats = _batch_sums(loss_module, collated, device, autocast_dtype, world)
    return total / max(count, 1), stats


@torch.no_grad()
def _loss_sums(model, examples, batch_size, packing, pad_id, device, autocast_dtype, world, loss_module,
               tokens_per_batch: int = 0):
    loss_module = loss_module or AnswerTokenLossSum(model)
    groups = [list(range(i, min(i + batch_size, len(examples)))) for i in range(0, len(examples), batch_size)]
    if packing and tokens_per_batch:
        groups = merge_micro_batches(groups, [ex.packed_length for ex in examples], tokens_per_batch)
    batches = [collate([examples[i] for i in group], packing, pad_id) for group in groups]
    total, count, _ = _batch_sums(loss_module, batches, device, autocast_dtype, world)
    return total, count


@torch.no_grad()
def _batch_sums(loss_module, batches, device, autocast_dtype, world) -> tuple[float, float, list[float]]:
    """(summed loss, what it is a mean over, summed statistics) of this rank's share of `batches`, added up over
    ranks. Every rank makes the same number of forward passes (FSDP all-gathers weights in each); a rank whose share
    is shorter repeats a batch and does not count it."""
    world = world or distributed.World("none")
    was_training = loss_module.training
    loss_module.eval()
    mine = distributed.my_share(world, batches)
    total, count, stats = 0.0, 0, None
    for i in range(distributed.share_count(world, len(batches))):
        batch = (mine[i] if i < len(mine) else batches[0]).to(device)
        with torch.autocast(device_type=device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            out = loss_module(batch)
        loss_sum, batch_stats = out if isinstance(out, tuple) else (out, None)
        if batch_stats is not None and stats is None:  # every rank sums as many statistics, counted or not
            stats = torch.zeros_like(batch_stats.cpu())
        if i < len(mine):
            total, count = total + float(loss_sum), count + batch.divisor_count
            if batch_stats is not None:
                stats += batch_stats.cpu()
    loss_module.train(was_training)
    stats_list = [] if stats is None else stats.tolist()
    total, count, *stats_list = distributed.all_reduce_sum(world, [total, float(count), *stats_list])
    return total, count, stats_list

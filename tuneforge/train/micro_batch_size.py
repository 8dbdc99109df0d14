"""How many tokens a packed micro-batch holds (train.micro_batch_tokens): sized by memory, not by batch_size.

A step's examples can be laid out in any number of packed rows without changing its update (the loss is divided by
the step's answer tokens, however it is split). Fewer, longer rows make each matmul bigger and each pass through
the layers rarer. What limits them is memory: activations grow with the tokens of a row. 'auto' takes the whole
step in one row, shortened until the memory estimate for it fits a share of the memory available, and never past
AUTO_MAX_TOKENS, beyond which bench/train_speed.py measured no further gain on this CPU, only more memory.
"""

from __future__ import annotations

import dataclasses
import logging

from tuneforge.config import RunConfig
from tuneforge.data.batching import StepPlan, epoch_steps, merge_micro_batches

log = logging.getLogger("tuneforge")

AUTO_MAX_TOKENS = 1024
MEMORY_SHARE = 0.5  # of the memory available (free RAM, or free GPU memory) that the estimated peak may take
SMALLEST = 256  # 'auto' halves the row until it fits, down to this


def largest_step_tokens(lengths: list[int], plan: StepPlan, world_size: int) -> int:
    """Tokens of the largest share one process takes of any step of the first epoch (later epochs draw the same
    examples in another order: their steps are as large within a few examples)."""
    largest = 0
    for step in epoch_steps(lengths, plan, 0):
        for rank in range(world_size):
            largest = max(largest, sum(lengths[i] for batch in step[rank::world_size] for i in batch))
    return largest


def largest_planned_tokens(lengths: list[int], plan: StepPlan, world_size: int) -> int:
    """Tokens of the largest micro-batch the step plan itself makes (before any re-layout)."""
    return max((sum(lengths[i] for i in batch) for step in epoch_steps(lengths, plan, 0) for batch in step),
               default=0)


def largest_row(lengths: list[int], plan: StepPlan, world_size: int, budget: int) -> list[int]:
    """The examples (indices) of the micro-batch holding the most tokens in the first epoch, as the loop lays each
    process's share of a step out with `budget`: what memory must hold at once."""
    largest, most = [], 0
    for step in epoch_steps(lengths, plan, 0):
        for rank in range(world_size):
            for batch in merge_micro_batches(step[rank::world_size], lengths, budget):
                tokens = sum(lengths[i] for i in batch)
                if tokens > most:
                    largest, most = batch, tokens
    return largest


def micro_batch_tokens(cfg: RunConfig, lengths: list[int], plan: StepPlan, world_size: int) -> tuple[int, str]:
    """The budget and one line saying why; 0 keeps the planned micro-batches (padded rows, or asked for)."""
    setting = cfg.train.micro_batch_tokens
    if not cfg.data.packing:
        return 0, "micro-batches: as planned (padded rows are not re-laid out)"
    if setting != "auto":
        return setting, (f"micro-batches: packed rows of at most {setting:,} tokens (train.micro_batch_tokens)"
                         if setting else "micro-batches: batch_size examples each (train.micro_batch_tokens=0)")
    step = largest_step_tokens(lengths, plan, world_size)
    budget = min(step, AUTO_MAX_TOKENS)
    planned = largest_planned_tokens(lengths, plan, world_size)
    if budget <= planned:  # no row would hold more than a planned micro-batch already does: nothing to check
        return budget, (f"micro-batches: packed rows of at most {budget:,} tokens (train.micro_batch_tokens=auto: "
                        f"the largest step holds {step:,} tokens a process)")
    fits, why = _fits_in_memory(cfg, lengths, budget)
    if fits is None:
        return 0, f"micro-batches: batch_size examples each ({why})"
    while not fits and budget > SMALLEST:
        budget = max(SMALLEST, budget // 2)
        fits, why = _fits_in_memory(cfg, lengths, budget)
    return budget, (f"micro-batches: packed rows of at most {budget:,} tokens (train.micro_batch_tokens=auto: the "
                    f"largest step holds {step:,} tokens a process; {why})")


def _fits_in_memory(cfg: RunConfig, lengths: list[int], budget: int) -> tuple[bool | None, str]:
    """Whether the estimated peak for a row of `budget` tokens (examples of this data's mean length) fits; None
    when the planner has no estimate for this model or method."""
    from tuneforge.errors import UserError
    from tuneforge.plan.estimate import GIB, available_memory, spec_from_config
    from tuneforge.plan.memory import estimate_memory

    mean = max(1, round(sum(lengths) / len(lengths)))
    row = (mean,) * max(1, budget // mean)
    try:
        estimate = estimate_memory(dataclasses.replace(spec_from_config(cfg), example_lengths=row,
                                                       target_tokens=None))
    except UserError as exc:  # a method or model the planner cannot estimate: stay at the planned size
        return None, f"no memory estimate: {exc}"
    available, what = available_memory(estimate.spec.device)
    if available is None:
        return True, f"estimated peak {estimate.peak / GIB:.1f} GiB"
    return (estimate.peak <= MEMORY_SHARE * available,
            f"estimated peak {estimate.peak / GIB:.1f} GiB of {available / GIB:.1f} GiB {what}")

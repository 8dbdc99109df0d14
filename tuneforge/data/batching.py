"""Step plans and collation: which examples go into each optimizer step, and how they are laid out in memory.

An optimizer step always consumes `batch_size x grad_accum` examples in the same order, packed or not: packing only
changes the memory layout (one padding-free row instead of a padded rectangle), never what is learned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tuneforge.data.tokenize import TokenizedExample


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a fixed function of (seed, epoch), so a resumed run sees the same order."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples).tolist()


def steps_per_epoch(num_examples: int, batch_size: int, grad_accum: int) -> int:
    per_step = batch_size * grad_accum
    return -(-num_examples // per_step)


def epoch_steps(num_examples: int, batch_size: int, grad_accum: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """Steps of one epoch, each a list of micro-batches of example indices. The last step may be smaller."""
    order = epoch_order(num_examples, seed, epoch)
    per_step = batch_size * grad_accum
    steps = []
    for start in range(0, num_examples, per_step):
        chunk = order[start : start + per_step]
        steps.append([chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)])
    return steps


@dataclass
class Batch:
    """Model inputs plus where the targets are: `predict_at` indexes the flattened [B*T] positions whose next token is
    a target, `targets` holds those next tokens."""

    input_ids: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor | None  # [B, T] for padded batches, None for a packed row
    cu_seqlens: torch.Tensor | None  # [n+1] example boundaries of a packed row
    predict_at: torch.Tensor  # [N] flat positions
    targets: torch.Tensor  # [N]
    num_tokens: int  # real (non-pad) tokens

    @property
    def num_targets(self) -> int:
        return int(self.targets.numel())

    def to(self, device: torch.device) -> "Batch":
        move = lambda t: t.to(device, non_blocking=True) if t is not None else None  # noqa: E731
        return Batch(
            move(self.input_ids),
            move(self.position_ids),
            move(self.attention_mask),
            self.cu_seqlens,  # read on the host by the attention loop
            move(self.predict_at),
            move(self.targets),
            self.num_tokens,
        )


def collate_packed(examples: list[TokenizedExample]) -> Batch:
    """Concatenate examples into one row [1, sum(len)]: no padding; positions restart at each example."""
    ids, positions, predict_at, targets, bounds = [], [], [], [], [0]
    for ex in examples:
        offset = len(ids)
        ids += ex.input_ids
        positions += range(len(ex.input_ids))
        for i, is_target in enumerate(ex.target):
            if is_target and i > 0:
                predict_at.append(offset + i - 1)
                targets.append(ex.input_ids[i])
        bounds.append(len(ids))
    return Batch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        position_ids=torch.tensor([positions], dtype=torch.long),
        attention_mask=None,
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
        predict_at=torch.tensor(predict_at, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        num_tokens=len(ids),
    )


def collate_padded(examples: list[TokenizedExample], pad_id: int) -> Batch:
    """Right-padded rectangle [B, max_len] with an attention mask (the unpacked layout)."""
    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    predict_at, targets = [], []
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        mask[row, :n] = 1
        for i, is_target in enumerate(ex.target):
            if is_target and i > 0:
                predict_at.append(row * width + i - 1)
                targets.append(ex.input_ids[i])
    positions = torch.arange(width).expand(len(examples), width).contiguous()
    return Batch(
        input_ids=ids,
        position_ids=positions,
        attention_mask=mask,
        cu_seqlens=None,
        predict_at=torch.tensor(predict_at, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        num_tokens=int(mask.sum()),
    )


def collate(examples: list[TokenizedExample], packing: bool, pad_id: int) -> Batch:
    return collate_packed(examples) if packing else collate_padded(examples, pad_id)

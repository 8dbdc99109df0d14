"""Step plans and collation: which examples go into each optimizer step, and how they are laid out in memory.

With `batch_size`, an optimizer step consumes `batch_size x grad_accum` examples in the same order, packed or not:
packing only changes the memory layout (one padding-free row instead of a padded rectangle), never what is learned.
With `tokens_per_batch`, micro-batches are filled up to a token budget instead, and unpacked batches can be grouped
by length so little compute goes to padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tuneforge.data.preference_tokens import TokenizedPair, TokenizedUnpaired
from tuneforge.data.tokenize import TokenizedExample


@dataclass(frozen=True)
class StepPlan:
    """How an epoch's examples become optimizer steps (see `epoch_steps`)."""

    batch_size: int  # examples per micro-batch (when tokens_per_batch is 0)
    grad_accum: int  # micro-batches per optimizer step
    tokens_per_batch: int = 0  # > 0: fill each micro-batch up to this many tokens instead
    packing: bool = True  # packed rows cost their real tokens; padded ones cost rows x longest row
    group_by_length: bool = False  # padded only: batch examples of similar length to waste less on padding
    seed: int = 0


# Length grouping sorts within windows of this many micro-batches' worth of the shuffled order (HF Trainer's
# "megabatch" idea): enough to cut padding sharply, small enough that the epoch stays well shuffled.
GROUP_WINDOW_BATCHES = 50
GROUP_WINDOW_TOKENS_EXAMPLES = 256


def epoch_steps(lengths: list[int], plan: StepPlan, epoch: int,
                pool: list[int] | None = None) -> list[list[list[int]]]:
    """Steps of one epoch, each a list of micro-batches of example indices; a pure function of (lengths, plan, epoch,
    pool) so a resumed run replays the same plan. The last step may be smaller. `pool`: the epoch's examples when
    sources are mixed (tuneforge.data.mixing.epoch_pool); every example once otherwise."""
    rng = np.random.default_rng([plan.seed, epoch])
    if pool is None:
        order = rng.permutation(len(lengths)).tolist()
    else:
        order = [pool[i] for i in rng.permutation(len(pool))]
    grouped = plan.group_by_length and not plan.packing
    if grouped:
        window = GROUP_WINDOW_TOKENS_EXAMPLES if plan.tokens_per_batch else GROUP_WINDOW_BATCHES * plan.batch_size
        order = [i for start in range(0, len(order), window)
                 for i in sorted(order[start : start + window], key=lambda i: -lengths[i])]
    if plan.tokens_per_batch:
        micro = _fill_token_budget(order, lengths, plan.tokens_per_batch, plan.packing)
    else:
        micro = [order[i : i + plan.batch_size] for i in range(0, len(order), plan.batch_size)]
    if grouped:  # sorted windows give batches from long to short; shuffle the batches, not their contents
        micro = [micro[i] for i in rng.permutation(len(micro))]
    return [micro[i : i + plan.grad_accum] for i in range(0, len(micro), plan.grad_accum)]


def steps_in_epochs(lengths: list[int], plan: StepPlan, epochs: int, pool_of=None) -> int:
    """Optimizer steps in `epochs` epochs (token budgets make the count depend on each epoch's order).
    `pool_of(epoch)`: each epoch's examples when sources are mixed."""
    if not plan.tokens_per_batch:
        sizes = [len(pool_of(e)) if pool_of else len(lengths) for e in range(epochs)]
        return sum(_ceil_div(_ceil_div(n, plan.batch_size), plan.grad_accum) for n in sizes)
    return sum(len(epoch_steps(lengths, plan, e, pool_of(e) if pool_of else None)) for e in range(epochs))


def merge_micro_batches(micro_batches: list[list[int]], lengths: list[int], budget: int) -> list[list[int]]:
    """The same examples in the same order, in as few packed micro-batches of at most `budget` tokens as they fill
    (an example longer than the budget gets one of its own); `budget` 0 keeps them as planned. A step's loss is
    divided by the whole step's target count, so how its examples are split into micro-batches cannot change its
    gradient; fewer, longer rows make bigger matmuls and fewer passes through the layers."""
    if budget <= 0:
        return micro_batches
    return _fill_token_budget([i for batch in micro_batches for i in batch], lengths, budget, packing=True)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _fill_token_budget(order: list[int], lengths: list[int], budget: int, packing: bool) -> list[list[int]]:
    """Greedy micro-batches in `order`, each costing at most `budget` tokens (an example longer than the budget gets a
    micro-batch of its own). A packed row costs the sum of its lengths; a padded one rows x its longest row."""
    batches, current, longest, total = [], [], 0, 0
    for i in order:
        n = lengths[i]
        cost = total + n if packing else (len(current) + 1) * max(longest, n)
        if current and cost > budget:
            batches.append(current)
            current, longest, total = [], 0, 0
        current.append(i)
        longest, total = max(longest, n), total + n
    if current:
        batches.append(current)
    return batches


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
    # Preference pairs (collate_pairs): per pair (start, prompt end, chosen end, end) in the row, which sequence each
    # target belongs to (2k: pair k's chosen completion, 2k + 1: its rejected one), the reference log-probabilities.
    pairs: torch.Tensor | None = None  # [n, 4], read on the host by the attention loop
    sequence_of: torch.Tensor | None = None  # [N]
    reference: torch.Tensor | None = None  # [n, 2]
    nll_scale: float = 0.0  # ORPO: step pairs / step NLL tokens, set by the loop before the forward
    # KTO (collate_unpaired): which answers are desirable [n]; the step's KL estimate, set by the loop before the
    # forward; the prompts with their KL completions, the batch KTO's KL pass runs (kl_pass marks it).
    desirable: torch.Tensor | None = None
    kl: float = 0.0
    kl_batch: "Batch | None" = None
    kl_pass: bool = False

    @property
    def num_targets(self) -> int:
        return int(self.targets.numel())

    @property
    def num_pairs(self) -> int:
        return 0 if self.sequence_of is None else len(self.reference)

    @property
    def num_nll_targets(self) -> int:
        """Targets of the chosen sequences, prompt included (ORPO's NLL term): 0 unless prompt targets were laid out."""
        if self.sequence_of is None or not bool((self.sequence_of < 0).any()):
            return 0
        return int(((self.sequence_of < 0) | (self.sequence_of % 2 == 0)).sum())

    @property
    def divisor_count(self) -> int:
        """What the step's loss is a mean over: answer tokens, or pairs for a preference objective."""
        return self.num_pairs if self.sequence_of is not None else self.num_targets

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
            self.pairs,
            move(self.sequence_of),
            move(self.reference),
            self.nll_scale,
            move(self.desirable),
            self.kl,
            self.kl_batch,  # moved when its pass runs
            self.kl_pass,
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
    return _packed_row(ids, positions, bounds, predict_at, targets)


def _packed_row(ids, positions, bounds, predict_at, targets, **extra) -> Batch:
    """One padding-free row [1, T] from its lists; `extra`: a preference batch's fields."""
    return Batch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        position_ids=torch.tensor([positions], dtype=torch.long),
        attention_mask=None,
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
        predict_at=torch.tensor(predict_at, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        num_tokens=len(ids),
        **extra,
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


def collate_pairs(pairs: list[TokenizedPair], share_prompt: bool = True, prompt_targets: bool = False) -> Batch:
    """Preference pairs in one packed row. Shared (the default): [prompt, chosen, rejected] per pair, where the rejected
    tokens attend to the prompt and themselves, never to the chosen ones, and take the positions they would have
    after the prompt; so each prompt is computed once, for both completions. Unshared: [prompt, chosen] and
    [prompt, rejected] as two packed examples (what TRL computes; the shared row's reference in the tests).
    `prompt_targets`: the prompt's own tokens are targets too (sequence -1), for ORPO's NLL of the chosen sequence."""
    ids, positions, predict_at, targets, sequence_of, bounds, groups = [], [], [], [], [], [0], []
    for k, pair in enumerate(pairs):
        start, p = len(ids), len(pair.prompt_ids)
        if prompt_targets:
            predict_at += range(start, start + p - 1)
            targets += pair.prompt_ids[1:]
            sequence_of += [-1] * (p - 1)
        if share_prompt:
            ids += pair.prompt_ids
            positions += range(p)
        sides = ((pair.chosen_ids, pair.chosen_target), (pair.rejected_ids, pair.rejected_target))
        for side, (completion, target) in enumerate(sides):
            if not share_prompt:
                if side:
                    bounds.append(len(ids))
                ids += pair.prompt_ids
                positions += range(p)
            # The answer's first token is predicted from the prompt's last one (in the shared row, not the chosen's).
            last_prompt, first = (start + p - 1 if share_prompt else len(ids) - 1), len(ids)
            ids += completion
            positions += range(p, p + len(completion))
            for i, is_target in enumerate(target):
                if is_target:
                    predict_at.append(last_prompt if i == 0 else first + i - 1)
                    targets.append(completion[i])
                    sequence_of.append(2 * k + side)
        groups.append((start, start + p, start + p + len(pair.chosen_ids), len(ids)))
        bounds.append(len(ids))
    reference = [pair.reference or (0.0, 0.0) for pair in pairs]
    return _packed_row(ids, positions, bounds, predict_at, targets,
                       pairs=torch.tensor(groups, dtype=torch.int64) if share_prompt else None,
                       sequence_of=torch.tensor(sequence_of, dtype=torch.long),
                       reference=torch.tensor(reference, dtype=torch.float32))



def collate_unpaired(examples: list[TokenizedUnpaired]) -> Batch:
    """KTO's micro-batch: each prompt with its answer in one packed row, and beside it (`kl_batch`) each prompt with its
    KL completion, for the no-gradient pass that estimates the KL term before the step's losses."""
    reference = torch.tensor([ex.reference or (0.0, 0.0) for ex in examples], dtype=torch.float32)
    batch = collate_pairs([ex.as_pair() for ex in examples])
    batch.reference, batch.desirable = reference, torch.tensor([ex.desirable for ex in examples])
    batch.kl_batch = collate_pairs([ex.as_pair(kl=True) for ex in examples])
    batch.kl_batch.reference, batch.kl_batch.kl_pass = reference, True
    return batch

"""Packed rows behave exactly like each example run alone; packing changes the layout, never what is learned."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tuneforge.data.batching import StepPlan, collate_packed, collate_padded, epoch_steps, steps_in_epochs
from tuneforge.data.formats import normalise_row
from tuneforge.data.tokenize import tokenize_example
from tuneforge.model.attention import use_packed_attention
from tuneforge.train.forward import batch_loss_sum

ROWS = [
    {"instruction": "Name a colour.", "output": "Blue."},
    {"instruction": "What is the capital of Italy? Answer in one word please.", "output": "Rome"},
    {"instruction": "Count to three.", "input": "Use digits.", "output": "1, 2, 3"},
    {"instruction": "Say something long.", "output": "This is a somewhat longer answer with several words."},
]


def tokenized(tokenizer):
    return [tokenize_example(tokenizer, normalise_row(r, "instruction", f"f:{i}")) for i, r in enumerate(ROWS)]


def test_packed_logits_and_loss_equal_examples_alone(tokenizer, tiny_model):
    examples = tokenized(tokenizer)
    model = tiny_model.eval()
    alone_logits, alone_losses = [], []
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex.input_ids])
            alone_logits.append(model(input_ids=ids).logits[0])
            alone_losses.append(float(batch_loss_sum(model, collate_padded([ex], tokenizer.pad_token_id))))
        use_packed_attention(model)
        packed = collate_packed(examples)
        body_out = model.model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                               cu_seq_lens_q=packed.cu_seqlens, cu_seq_lens_k=packed.cu_seqlens).last_hidden_state
        packed_logits = model.lm_head(body_out)[0]
        bounds = packed.cu_seqlens.tolist()
        for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            assert (packed_logits[start:end] - alone_logits[i]).abs().max() < 1e-4
        per_example = [float(batch_loss_sum(model, collate_packed([ex]))) for ex in examples]
        assert max(abs(a - b) for a, b in zip(per_example, alone_losses)) < 1e-4
        total = float(batch_loss_sum(model, packed))
        assert abs(total - sum(alone_losses)) < 1e-3


def test_packed_and_padded_gradients_match(tokenizer, tiny_model):
    examples = tokenized(tokenizer)
    model = tiny_model.train()
    targets = sum(ex.num_targets - 0 for ex in examples)

    def grads(batch):
        model.zero_grad()
        (batch_loss_sum(model, batch) / targets).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    padded = grads(collate_padded(examples, tokenizer.pad_token_id))
    use_packed_attention(model)
    packed = grads(collate_packed(examples))
    for name in padded:
        assert torch.allclose(padded[name], packed[name], atol=1e-5), name


def test_step_plan_is_layout_independent_and_covers_every_example_once():
    lengths = [10] * 21
    plan = StepPlan(batch_size=4, grad_accum=2, seed=3)
    steps = epoch_steps(lengths, plan, epoch=0)
    flat = [i for step in steps for mb in step for i in mb]
    assert sorted(flat) == list(range(21))
    assert [sum(len(mb) for mb in step) for step in steps] == [8, 8, 5]
    assert epoch_steps(lengths, plan, epoch=0) == steps
    assert epoch_steps(lengths, plan, epoch=1) != steps
    # packing alone never changes which examples a step takes (what is learned), only their memory layout
    assert epoch_steps(lengths, StepPlan(4, 2, packing=False, group_by_length=False, seed=3), 0) == steps
    assert steps_in_epochs(lengths, plan, 3) == 9


def _lengths(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(5, 400, size=n).tolist()


@pytest.mark.parametrize("packing", [True, False])
def test_tokens_per_batch_fills_micro_batches_up_to_the_budget(packing):
    lengths = _lengths()
    lengths[7] = 900  # longer than the budget: a micro-batch of its own
    plan = StepPlan(batch_size=1, grad_accum=2, tokens_per_batch=600, packing=packing, group_by_length=False, seed=1)
    steps = epoch_steps(lengths, plan, 0)
    micro = [mb for step in steps for mb in step]
    assert sorted(i for mb in micro for i in mb) == list(range(len(lengths)))
    cost = (lambda mb: sum(lengths[i] for i in mb)) if packing else (lambda mb: len(mb) * max(lengths[i] for i in mb))
    assert all(cost(mb) <= 600 or len(mb) == 1 for mb in micro)
    assert [7] in micro
    # greedy: no micro-batch could have taken the first example of the next one
    for a, b in zip(micro, micro[1:]):
        assert cost(a + b[:1]) > 600
    assert steps_in_epochs(lengths, plan, 2) == len(steps) + len(epoch_steps(lengths, plan, 1))


def test_length_grouping_cuts_padding_and_keeps_every_example():
    lengths = _lengths(800)
    plain = StepPlan(batch_size=8, grad_accum=1, packing=False, group_by_length=False, seed=2)
    grouped = StepPlan(batch_size=8, grad_accum=1, packing=False, group_by_length=True, seed=2)

    def padded_tokens(plan):
        return sum(len(mb) * max(lengths[i] for i in mb) for step in epoch_steps(lengths, plan, 0) for mb in step)

    steps = epoch_steps(lengths, grouped, 0)
    assert sorted(i for step in steps for mb in step for i in mb) == list(range(800))
    assert padded_tokens(grouped) < 0.7 * padded_tokens(plain)
    assert epoch_steps(lengths, grouped, 1) != steps  # still shuffled per epoch
    # packing ignores grouping: a packed row has no padding to save
    assert epoch_steps(lengths, StepPlan(8, 1, packing=True, group_by_length=True, seed=2), 0) == \
        epoch_steps(lengths, plain, 0)


@pytest.mark.parametrize("window, softcap", [(None, None), (8, None), (None, 2.0), (8, 2.0)],
                         ids=["plain", "window", "softcap", "window-softcap"])
def test_length_buckets_give_each_examples_own_causal_attention(window, softcap):
    """Packed attention gathers examples into right-padded length buckets (tuneforge.model.attention): outputs and
    gradients equal causal attention run on each example alone, with grouped-query heads, a window and Gemma 2's
    softcap, on a row whose lengths make several buckets (float64: any difference is a layout bug)."""
    from tuneforge.model import attention

    torch.manual_seed(0)
    lengths = [30, 5, 13, 9, 40, 2, 1, 17]
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    heads, kv_heads, dim, total = 4, 2, 16, bounds[-1]
    q, k, v = (torch.randn(1, h, total, dim, dtype=torch.float64, requires_grad=True)
               for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor(bounds, dtype=torch.int32)
    assert len(attention.BucketLayout(bounds).buckets) > 1
    bucketed = attention._bucketed_attention(q, k, v, cu, window, softcap, 0.0, dim**-0.5)
    grad = torch.randn_like(bucketed)
    got = torch.autograd.grad(bucketed, (q, k, v), grad)
    k2, v2 = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
    alone = torch.cat([attention._example_attention(q[:, :, s:e], k2[:, :, s:e], v2[:, :, s:e], 0, window, softcap,
                                                    0.0, dim**-0.5) for s, e in zip(bounds[:-1], bounds[1:])],
                      dim=2).transpose(1, 2)
    expected = torch.autograd.grad(alone, (q, k, v), grad)
    tolerance = 1e-6 if softcap else 1e-12  # the softcap path's softmax runs in float32, as transformers' does
    assert (bucketed - alone).abs().max() < tolerance
    for mine, theirs in zip(got, expected):
        assert (mine - theirs).abs().max() < tolerance

"""One step of batch 8 equals 4 micro-batches of 2 (and 2 of 4): gradients within 1e-5."""

from __future__ import annotations

import random

import pytest
import torch

from tuneforge.data.batching import collate
from tuneforge.data.formats import normalise_row
from tuneforge.data.tokenize import tokenize_example
from tuneforge.model.attention import use_packed_attention
from tuneforge.train.forward import AnswerTokenLossSum
from tuneforge.train.loop import accumulate_gradients


def examples(tokenizer, n=8):
    rng = random.Random(0)
    rows = []
    for i in range(n):
        words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega"]) for _ in range(rng.randint(2, 25)))
        answer = " ".join(rng.choice(["yes", "no", "maybe", "later"]) for _ in range(rng.randint(1, 12)))
        rows.append(normalise_row({"instruction": words, "output": answer}, "instruction", f"f:{i}"))
    return [tokenize_example(tokenizer, r) for r in rows]


@pytest.mark.parametrize("packing", [True, False])
def test_grad_accumulation_invariance(tokenizer, tiny_model, packing):
    exs = examples(tokenizer)
    model = tiny_model.train()
    if packing:
        use_packed_attention(model)

    def grads(split):
        model.zero_grad()
        batches = [collate(exs[i : i + split], packing, tokenizer.pad_token_id) for i in range(0, len(exs), split)]
        loss = accumulate_gradients(AnswerTokenLossSum(model), batches, "cpu", None)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_8, g_8 = grads(8)
    for split in (2, 4):
        loss_s, g_s = grads(split)
        assert abs(loss_8 - loss_s) < 1e-5
        for name in g_8:
            assert torch.allclose(g_8[name], g_s[name], atol=1e-5, rtol=0), (split, name)

"""The chunked answer-only loss equals the naive full-logits computation, in value and in gradients."""

from __future__ import annotations

import pytest
import torch

from tuneforge.train.loss import answer_token_loss_sum, naive_loss_sum


@pytest.mark.parametrize("softcap", [None, 1.5])  # 1.5: Gemma's final-logit softcap, set low enough to bend
@pytest.mark.parametrize("chunk_rows", [1, 7, 64, None])
@pytest.mark.parametrize("weight_trains", [False, True])
def test_chunked_equals_naive(chunk_rows, weight_trains, softcap):
    torch.manual_seed(0)
    n, d, vocab = 50, 32, 1000
    hidden = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(vocab, d, dtype=torch.float64) * 0.2).requires_grad_(weight_trains)
    targets = torch.randint(0, vocab, (n,))
    upstream = 0.37  # an arbitrary scale, as when the step's loss is divided by its token count

    ours = answer_token_loss_sum(hidden, weight, targets, chunk_rows, softcap=softcap)
    (ours * upstream).backward()
    ours_grads = (hidden.grad.clone(), weight.grad.clone() if weight_trains else None)
    hidden.grad = None
    if weight_trains:
        weight.grad = None

    ref = naive_loss_sum(hidden, weight, targets, softcap=softcap)
    (ref * upstream).backward()
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)
    assert torch.allclose(ours_grads[0], hidden.grad, atol=1e-5, rtol=0)
    if weight_trains:
        assert torch.allclose(ours_grads[1], weight.grad, atol=1e-5, rtol=0)


def test_float32_within_tolerance_and_no_grad_path():
    torch.manual_seed(1)
    hidden = torch.randn(300, 64)
    weight = torch.randn(49152 // 8, 64) * 0.1
    targets = torch.randint(0, weight.shape[0], (300,))
    with torch.no_grad():
        ours = answer_token_loss_sum(hidden, weight, targets, 37)
    ref = naive_loss_sum(hidden, weight, targets)
    assert abs(float(ours) - float(ref)) / float(ref) < 1e-5


def test_empty_batch_gives_zero_connected_loss():
    hidden = torch.randn(0, 8, requires_grad=True)
    loss = answer_token_loss_sum(hidden, torch.randn(10, 8), torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0

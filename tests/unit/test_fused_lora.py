"""Fused LoRA projections (tuneforge/model/fused_lora.py) against plain PEFT: the same forward and the same gradient
for every parameter, per family, with dropout 0; what trains and what is saved stays PEFT's."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.families import FAMILIES, tiny_model

VOCAB = 96


def lora_pair(family: str, targets="all-linear", dropout: float = 0.0):
    """The same PEFT LoRA model twice (B random, so the update is not zero): one stays plain, one gets fused."""
    from peft import LoraConfig, get_peft_model

    from tuneforge.model.fused_lora import fuse_lora

    torch.manual_seed(1)
    plain = get_peft_model(tiny_model(family, VOCAB), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                                 target_modules=targets))
    for name, param in plain.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    fused = copy.deepcopy(plain)
    return plain, fused, fuse_lora(fused)


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_projections_equal_peft_forward_and_gradients(family):
    plain, fused, groups = lora_pair(family)
    plain.train(), fused.train()
    ids = torch.randint(3, VOCAB, (1, 24), generator=torch.Generator().manual_seed(0))
    logits, grads = loss_and_grads(plain, ids)
    fused_logits, fused_grads = loss_and_grads(fused, ids)
    assert groups, "nothing was fused"
    if family != "phi3":  # Phi-3's qkv_proj and gate_up_proj are one module each already
        assert max(len(g.members) for g in groups) == 3
    assert (fused_logits - logits).abs().max() < 1e-5 * logits.abs().max()
    assert fused_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert (fused_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max() + 1e-7, name


def test_frozen_weights_are_stored_once_and_unfuse_restores_peft():
    plain, fused, groups = lora_pair("qwen2")  # q/k/v with biases
    attention = fused.base_model.model.model.layers[0].self_attn
    q, k = attention.q_proj.base_layer.weight, attention.k_proj.base_layer.weight
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()  # views of one buffer, not copies
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
        with fused.disable_adapter():  # PEFT's switch still works on fused modules (a DPO reference pass)
            base_logits = fused(input_ids=ids).logits
        with plain.disable_adapter():
            assert torch.allclose(base_logits, plain(input_ids=ids).logits, atol=1e-6)
    from tuneforge.model.fused_lora import unfuse_lora

    unfuse_lora(groups)
    assert "forward" not in attention.q_proj.__dict__
    q, k = attention.q_proj.base_layer.weight, attention.k_proj.base_layer.weight
    assert q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
    with torch.no_grad():
        assert torch.allclose(fused(input_ids=ids).logits, expected, atol=1e-5)
    assert fused.state_dict().keys() == plain.state_dict().keys()


def test_dropout_drops_each_input_once_per_group():
    """Dropout p on: one mask per shared input, so q, k and v see the same dropped input."""
    from tuneforge.model.dropout import lora_dropout

    _, fused, groups = lora_pair("llama", dropout=0.2)
    fused.train()
    group = next(g for g in groups if len(g.members) == 3)
    seen = []
    for member in group.members:  # what each module's own A would be given (PEFT's path): nothing
        member.lora_A["default"].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    x = torch.randn(1, 10, 64)
    torch.manual_seed(0)
    outputs = [member(x) for member in group.members]
    assert not seen
    flat = x.reshape(-1, 64)
    torch.manual_seed(0)  # the same draw: one mask for the group
    dropped = lora_dropout(flat, 0.2, True)
    assert 0 < int((dropped == 0).sum()) < flat.numel()
    a = dropped @ torch.cat([m.lora_A["default"].weight for m in group.members]).t()
    for index, (member, out) in enumerate(zip(group.members, outputs)):
        update = a[:, 4 * index : 4 * index + 4] @ member.lora_B["default"].weight.t() * member.scaling["default"]
        expected = flat @ member.base_layer.weight.t() + update
        assert torch.allclose(out.reshape(expected.shape), expected, atol=1e-5)


@pytest.mark.parametrize("p", [0.05, 0.2])
def test_sparse_dropout_draws_independent_bernoulli_drops(p):
    """Drop positions from geometric gaps: the rate, the gaps' mean and variance, and no cross-talk between halves are
    those of independent Bernoulli(p) trials (each checked at 6 standard deviations, 2M trials)."""
    import math

    from tuneforge.model.dropout import dropped_positions, lora_dropout

    n = 2_000_000
    torch.manual_seed(3)
    positions = dropped_positions(n, p)
    assert bool((positions.diff() > 0).all()) and int(positions[0]) >= 0 and int(positions[-1]) < n
    assert abs(len(positions) / n - p) < 6 * math.sqrt(p * (1 - p) / n)
    gaps = positions.diff().double()
    assert abs(gaps.mean().item() - 1 / p) < 6 * math.sqrt((1 - p) / p**2 / len(gaps))
    assert abs(gaps.var().item() / ((1 - p) / p**2) - 1) < 0.05
    halves = (positions < n // 2).sum().item(), (positions >= n // 2).sum().item()
    assert abs(halves[0] - halves[1]) < 6 * math.sqrt(n * p * (1 - p))
    x = torch.full((1000, 100), 2.0)
    out = lora_dropout(x, p, True)
    kept = out[out != 0]
    assert torch.allclose(kept, torch.full_like(kept, 2.0 / (1 - p)))  # inverted dropout: kept values scaled up
    assert torch.equal(lora_dropout(x, p, False), x)


def test_only_plain_lora_is_fused():
    from peft import LoraConfig, get_peft_model

    from tuneforge.model.fused_lora import fuse_lora

    dora = get_peft_model(tiny_model("llama", VOCAB), LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    assert fuse_lora(dora) == []
    _, _, groups = lora_pair("llama", targets=["q_proj", "v_proj"])  # two of the three: still one group
    assert sorted(len(g.members) for g in groups) == [2, 2]

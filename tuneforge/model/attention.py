"""Padding-free attention for packed rows.

A packed row concatenates several examples into one sequence of shape [1, T]. Attention must stay inside each
example (block-diagonal causal). Transformers can build that as a dense [T, T] mask from restarting position ids, but
SDPA then still computes every cross-example score and throws it away: O(T^2) work for a row of many short examples.
Instead we register an attention implementation that runs causal SDPA once per example, using the cumulative
sequence lengths (`cu_seq_lens_q`, the same keyword flash-attention's varlen kernels take), so the cost is
sum(len_i^2) and no mask tensor is ever built: no mask function is registered for this implementation, which tells
transformers to skip mask creation. Generation needs padding masks, so models generate with plain "sdpa"
(`use_standard_attention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

PACKED_ATTENTION = "tuneforge_packed"


@torch.compiler.disable  # a Python loop over examples: run it eagerly between compiled graphs (train.compile)
def packed_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """[B=1, H, T, D] query/key/value -> [1, T, H, D], attention confined to each packed example."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    prefix = key.shape[2] - query.shape[2]  # prefix tuning: learned keys/values in front, seen by every example
    if cu_seqlens is None and prefix:
        cu_seqlens = torch.tensor([0, query.shape[2]])
    if cu_seqlens is None:  # one unpadded sequence: plain causal SDPA
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError("packed attention expects one packed row (batch size 1)")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: share each key/value head across its query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    bounds = cu_seqlens.tolist()
    if prefix:
        return _packed_with_prefix(query, key, value, bounds, prefix, dropout, scaling), None
    outputs = [
        F.scaled_dot_product_attention(
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            dropout_p=dropout,
            is_causal=True,
            scale=scaling,
        )
        for start, end in zip(bounds[:-1], bounds[1:])
        if end > start
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _packed_with_prefix(query, key, value, bounds, prefix, dropout, scaling):
    """Each example attends to the shared prefix keys plus its own keys, causally (offset by the prefix length)."""
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        keys = torch.cat([key[:, :, :prefix], key[:, :, prefix + start : prefix + end]], dim=2)
        values = torch.cat([value[:, :, :prefix], value[:, :, prefix + start : prefix + end]], dim=2)
        visible = torch.ones(end - start, prefix + end - start, dtype=torch.bool, device=query.device).tril(prefix)
        outputs.append(F.scaled_dot_product_attention(query[:, :, start:end], keys, values, attn_mask=visible,
                                                      dropout_p=dropout, scale=scaling))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()


AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)


def use_packed_attention(model: torch.nn.Module) -> None:
    """Switch a loaded transformers model to the packed attention implementation (training on packed rows)."""
    model.set_attn_implementation(PACKED_ATTENTION)


def use_standard_attention(model: torch.nn.Module) -> None:
    """Back to transformers' SDPA with padding masks (generation, padded batches)."""
    model.set_attn_implementation("sdpa")

"""Padding-free attention for packed rows.

A packed row concatenates several examples into one sequence of shape [1, T]. Attention must stay inside each
example (block-diagonal causal). Transformers can build that as a dense [T, T] mask from restarting position ids, but
SDPA then still computes every cross-example score and throws it away: O(T^2) work for a row of many short examples.
Instead we register an attention implementation that runs causal SDPA once per example, using the cumulative
sequence lengths (`cu_seq_lens_q`, the same keyword flash-attention's varlen kernels take), so the cost is
sum(len_i^2) and no mask tensor is ever built: no mask function is registered for this implementation, which tells
transformers to skip mask creation. Generation needs padding masks, so models generate with plain "sdpa"
(`use_standard_attention`).

Because transformers builds no mask for us, what its masks would carry is applied here, per example, from the
keywords each family's attention layer passes:
- `sliding_window` (Mistral, Qwen2/3's sliding layers, Gemma 2/3's local layers): a query sees its last W keys. An
  example no longer than the window needs nothing; a longer one runs SDPA with an explicit banded mask.
- `softcap` (Gemma 2's attention-logit softcapping): SDPA cannot tanh the scores, so those layers run the eager
  formula (scores, softcap, mask, fp32 softmax), exactly transformers' `eager_attention_forward`, per example.
`attention_paths` says which of these a model takes; the loop logs it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tuneforge.model.families import text_config

PACKED_ATTENTION = "tuneforge_packed"


@torch.compiler.disable  # a Python loop over examples: run it eagerly between compiled graphs (train.compile)
def packed_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                          softcap=None, **kwargs):
    """[B=1, H, T, D] query/key/value -> [1, T, H, D], attention confined to each packed example."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    prefix = key.shape[2] - query.shape[2]  # prefix tuning: learned keys/values in front, seen by every example
    plain = sliding_window is None and softcap is None
    if cu_seqlens is None and plain and not prefix:  # one unpadded sequence, nothing to mask: plain causal SDPA
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError("packed attention expects one packed row (batch size 1)")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: share each key/value head across its query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    pairs = kwargs.get("shared_prompt_pairs")
    if pairs is not None:
        return _shared_prompt_attention(query, key, value, pairs, sliding_window, softcap, dropout, scaling), None
    bounds = cu_seqlens.tolist() if cu_seqlens is not None else [0, query.shape[2]]
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        keys, values = key[:, :, prefix + start : prefix + end], value[:, :, prefix + start : prefix + end]
        if prefix:  # the shared learned prefix goes in front of each example's own keys
            keys = torch.cat([key[:, :, :prefix], keys], dim=2)
            values = torch.cat([value[:, :, :prefix], values], dim=2)
        outputs.append(_example_attention(query[:, :, start:end], keys, values, prefix, sliding_window, softcap,
                                          dropout, scaling))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _shared_prompt_attention(query, key, value, pairs, window, softcap, dropout, scaling):
    """Preference pairs laid out [prompt, chosen, rejected] (tuneforge.data.batching.collate_pairs): prompt and chosen
    are one causal example; the rejected tokens see the prompt's keys as a cache in front of their own (query i of
    the rejected part sits at key position len(prompt) + i), and never the chosen tokens."""
    outputs = []
    for start, prompt_end, chosen_end, end in pairs.tolist():
        outputs.append(_example_attention(query[:, :, start:chosen_end], key[:, :, start:chosen_end],
                                          value[:, :, start:chosen_end], 0, window, softcap, dropout, scaling))
        if end > chosen_end:
            keys = torch.cat([key[:, :, start:prompt_end], key[:, :, chosen_end:end]], dim=2)
            values = torch.cat([value[:, :, start:prompt_end], value[:, :, chosen_end:end]], dim=2)
            outputs.append(_example_attention(query[:, :, chosen_end:end], keys, values, prompt_end - start, window,
                                              softcap, dropout, scaling))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()


def _example_attention(query, keys, values, prefix, window, softcap, dropout, scaling):
    """One example's causal attention; query i sits at key position prefix + i (a prefix acts as a cache would)."""
    length = query.shape[2]
    if softcap is None and not prefix and (window is None or length <= window):
        return F.scaled_dot_product_attention(query, keys, values, dropout_p=dropout, is_causal=True, scale=scaling)
    at = torch.arange(length, device=query.device)[:, None] + prefix
    seen = torch.arange(keys.shape[2], device=query.device)[None, :]
    visible = seen <= at
    if window is not None:  # transformers' sliding_window_overlay: key j is seen from position i when j > i - W
        visible &= seen > at - window
    if softcap is None:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=visible, dropout_p=dropout, scale=scaling)
    scores = torch.matmul(query, keys.transpose(2, 3)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=dropout > 0)
    return torch.matmul(weights, values)


AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)


def standard_attention(config) -> str:
    """Transformers' implementation for padded batches and generation: SDPA, or eager where SDPA cannot softcap."""
    return "eager" if getattr(text_config(config), "attn_logit_softcapping", None) else "sdpa"


def attention_paths(config, packed: bool) -> str:
    """One line for the log: which attention runs, and what each family feature makes it do."""
    text = text_config(config)
    layers = text.num_hidden_layers
    types = getattr(text, "layer_types", None)
    window = getattr(text, "sliding_window", None)
    sliding = sum(t == "sliding_attention" for t in types) if types else (layers if window else 0)
    softcap = getattr(text, "attn_logit_softcapping", None)
    head_cap = getattr(text, "final_logit_softcapping", None)
    if packed:
        parts = ["packed (per-example SDPA)"]
        if sliding and window:
            parts.append(f"sliding window {window} on {sliding}/{layers} layers (banded mask on longer examples)")
        if softcap:
            parts.append(f"logit softcap {softcap:g} (eager per example: SDPA cannot softcap)")
    else:
        parts = [f"padded ({standard_attention(config)})"]
        if sliding and window:
            parts.append(f"sliding window {window} on {sliding}/{layers} layers")
    if head_cap:
        parts.append(f"final logit softcap {head_cap:g} in the chunked head")
    return "attention: " + "; ".join(parts)


def use_packed_attention(model: torch.nn.Module) -> None:
    """Switch a loaded transformers model to the packed attention implementation (training on packed rows)."""
    model.set_attn_implementation(PACKED_ATTENTION)


def use_standard_attention(model: torch.nn.Module) -> None:
    """Back to transformers' own attention with padding masks (generation, padded batches)."""
    model.set_attn_implementation(standard_attention(model.config))

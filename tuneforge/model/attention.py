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
    pairs = kwargs.get("shared_prompt_pairs")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if pairs is None and not prefix and cu_seqlens is not None:
        return _bucketed_attention(query, key, value, cu_seqlens, sliding_window, softcap, dropout, scaling), None
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: share each key/value head across its query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
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


# Examples share one padded attention call while padding adds at most this factor to their attention work.
BUCKET_WASTE = 2.0
_layout_cache: list = []  # [(cu_seqlens, BucketLayout)]: computed once per packed row, used by every layer


class BucketLayout:
    """Where each example of a packed row sits in length buckets padded on the right: bucket b is a [n_b, L_b]
    block of row positions (`index`, padding pointing at position 0) and the flat places of its real tokens in that
    block (`real`); `restore` orders the buckets' real tokens back into the row. Index tensors, never boolean
    masks: the planner runs this on the meta device, where a mask's size cannot be known."""

    def __init__(self, bounds: list[int]):
        spans = sorted(zip(bounds[:-1], bounds[1:]), key=lambda span: span[0] - span[1])  # longest first
        spans = [span for span in spans if span[1] > span[0]]
        self.buckets: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        order = []
        while spans:
            longest = spans[0][1] - spans[0][0]
            work = 0
            taken = 0
            for start, end in spans:  # longest first: add while padding to `longest` stays cheap
                work += (end - start) ** 2
                if (taken + 1) * longest**2 > BUCKET_WASTE * work:
                    break
                taken += 1
            bucket, spans = spans[:taken], spans[taken:]
            index = torch.zeros(len(bucket), longest, dtype=torch.long)
            valid = torch.zeros(len(bucket), longest, dtype=torch.bool)
            for row, (start, end) in enumerate(bucket):
                index[row, : end - start] = torch.arange(start, end)
                valid[row, : end - start] = True
                order.append(torch.arange(start, end))
            self.buckets.append((index.view(-1), valid.view(-1).nonzero().squeeze(1), longest))
        positions = torch.cat(order)  # row positions in bucket order
        self.restore = torch.empty_like(positions)
        self.restore[positions] = torch.arange(len(positions))


def _layout(cu_seqlens: torch.Tensor) -> BucketLayout:
    if not _layout_cache or _layout_cache[0][0] is not cu_seqlens:
        _layout_cache[:] = [(cu_seqlens, BucketLayout(cu_seqlens.tolist()))]
    return _layout_cache[0][1]


def _bucketed_attention(query, key, value, cu_seqlens, window, softcap, dropout, scaling):
    """[1, H, T, D] -> [1, T, H, D]: each packed example attends within itself. Examples of similar length are
    gathered into one right-padded batch and run through one SDPA call (a causal mask keeps every real query
    off the padding behind it), instead of one call, one slice and one slice-gradient per example: per layer, a
    row of 16 short examples went from 50 ms to 28 ms forward and backward."""
    layout = _layout(cu_seqlens.cpu() if cu_seqlens.device.type != "cpu" else cu_seqlens)
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[-1]
    outputs = []
    for index, real, longest in layout.buckets:
        index = index.to(query.device)
        rows = index.numel() // longest

        def gather(states):  # [1, h, T, D] -> [rows, h, longest, D]
            h = states.shape[1]
            return states[0].index_select(1, index).view(h, rows, longest, dim).transpose(0, 1)

        out = _padded_attention(gather(query), gather(key), gather(value), longest, window, softcap, dropout,
                                scaling, heads // kv_heads)
        out = out.transpose(1, 2).reshape(rows * longest, heads, dim)  # [rows * longest, H, D]
        outputs.append(out.index_select(0, real.to(query.device)))
    merged = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    return merged.index_select(0, layout.restore.to(query.device)).unsqueeze(0)  # [1, T, H, D]


def _padded_attention(query, keys, values, length, window, softcap, dropout, scaling, groups):
    """Causal attention of right-padded rows starting at position 0: [B, H, L, D]."""
    if softcap is None and window is None:
        return F.scaled_dot_product_attention(query, keys, values, dropout_p=dropout, is_causal=True, scale=scaling,
                                              enable_gqa=groups > 1)
    at = torch.arange(length, device=query.device)
    visible = at[None, :] <= at[:, None]
    if window is not None:  # transformers' sliding_window_overlay: key j is seen from position i when j > i - W
        visible &= at[None, :] > at[:, None] - window
    return _masked_attention(query, keys, values, visible, softcap, dropout, scaling, groups)


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
    return _masked_attention(query, keys, values, visible, softcap, dropout, scaling)


def _masked_attention(query, keys, values, visible, softcap, dropout, scaling, groups: int = 1):
    """Attention where `visible` [queries, keys] allows: SDPA, or the eager formula with Gemma 2's softcap (scores,
    softcap, mask, fp32 softmax: transformers' eager_attention_forward), which SDPA cannot express. `groups`:
    query heads per key/value head."""
    if softcap is None:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=visible, dropout_p=dropout,
                                              scale=scaling, enable_gqa=groups > 1)
    if groups > 1:
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
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

"""Activation memory, counted rather than guessed: run the model's own forward pass on the meta device and add up
every tensor autograd saves for backward.

Formulas for "activations per token per layer" go stale whenever a model family, PEFT or the attention code changes
(LoRA dropout keeps a copy of each adapted layer's input, grouped-query attention repeats keys and values, a frozen
linear layer saves nothing for its weight). Running the real modules under `torch.autograd.graph.saved_tensors_hooks`
on meta tensors sees exactly what this version of every library keeps, at any size, in milliseconds and no memory.
Saved tensors are counted once per storage (a view keeps its whole storage alive; q, k and v projections share one
saved input) and parameters are left out (they are counted as weights).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ActivationCount:
    """Bytes autograd keeps for backward after one micro-batch's forward pass (body only, no LM head)."""

    total: int  # everything saved, without activation checkpointing
    per_layer: tuple[int, ...]  # saved inside each decoder layer (first seen there)
    layer_inputs: tuple[int, ...]  # each decoder layer's input hidden states: what checkpointing keeps
    outside_layers: int  # embeddings, rotary tables, final norm

    @property
    def largest_layer(self) -> int:
        return max(self.per_layer, default=0)

    def scaled_to(self, depth: int) -> "ActivationCount":
        """The count of the same model `depth` layers deep: the last counted layer stands for the missing ones."""
        missing = depth - len(self.per_layer)
        if missing <= 0:
            return self
        per_layer = self.per_layer + (self.per_layer[-1],) * missing
        inputs = self.layer_inputs + (self.layer_inputs[-1],) * missing
        return ActivationCount(sum(per_layer) + self.outside_layers, per_layer, inputs, self.outside_layers)

    @property
    def with_checkpointing(self) -> int:
        """Checkpointing keeps each layer's input and recomputes one layer at a time during backward."""
        return self.outside_layers + sum(self.layer_inputs) + self.largest_layer


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The repeated transformer blocks: the longest ModuleList in the model."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no decoder layer list found")
    return max(lists, key=len)


def count_saved_activations(model: torch.nn.Module, body_call) -> ActivationCount:
    """Run `body_call()` (a forward pass over meta inputs) and count what autograd saves, per decoder layer."""
    from tuneforge.model.fused_lora import fused_weights

    params = {p.untyped_storage()._cdata for p in model.parameters()}
    params |= {b.untyped_storage()._cdata for b in model.buffers()}
    params |= {w.untyped_storage()._cdata for w in fused_weights(model)}  # fused LoRA's frozen weights
    layers = decoder_layers(model)
    saved: dict[int, tuple[int, int | None]] = {}  # storage -> (bytes, layer index or None)
    layer_inputs = [0] * len(layers)
    current: list[int | None] = [None]
    keep_alive: list[torch.Tensor] = []  # storage ids are addresses: hold every tensor so none is reused

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = tensor.untyped_storage()._cdata
        if key not in params and key not in saved:
            saved[key] = (tensor.untyped_storage().nbytes(), current[0])
        keep_alive.append(tensor)
        return tensor

    def enter(index):
        def hook(module, args, kwargs):
            current[0] = index
            hidden = args[0] if args else kwargs.get("hidden_states")
            layer_inputs[index] = hidden.untyped_storage().nbytes()

        return hook

    def leave(module, args, output):
        current[0] = None

    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(enter(index), with_kwargs=True))
        handles.append(layer.register_forward_hook(leave))
    try:
        with fused_attention_on_meta(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            body_call()
    finally:
        for handle in handles:
            handle.remove()
    per_layer = [0] * len(layers)
    outside = 0
    for nbytes, layer in saved.values():
        if layer is None:
            outside += nbytes
        else:
            per_layer[layer] += nbytes
    return ActivationCount(sum(per_layer) + outside, tuple(per_layer), tuple(layer_inputs), outside)


@contextmanager
def fused_attention_on_meta():
    """Count the attention kernel training really runs.

    On meta tensors `scaled_dot_product_attention` falls back to its math path, which keeps the [heads, T, T]
    probabilities for backward. CPUs (fp32 and bf16, with or without a mask) and GPUs run a fused flash-style kernel
    that keeps only q, k, v, the output and the log-sum-exp: linear in T. Swap that kernel in for meta tensors only.
    """
    original = F.scaled_dot_product_attention

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.device.type != "meta":
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        if key.shape[-3] != query.shape[-3]:  # grouped-query attention: the kernel takes one key/value per head
            groups = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(groups, dim=-3), value.repeat_interleave(groups, dim=-3)
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
        )
        return out

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original

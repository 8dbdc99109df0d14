"""Prompt and prefix tuning in the training forward: learned virtual tokens added to a batch, packed or padded.

The loop calls the decoder body directly (tuneforge.train.forward), past PEFT's `PeftModel.forward`, which is where
PEFT adds what prompt learning trains. This module adds it instead, exactly as PEFT does, for both batch layouts:

- prompt tuning: the soft prompt's V embeddings go in front of every example's token embeddings; its positions
  0..V-1 come first and the example's tokens follow at V.. (PEFT's layout), so every target moves V places right
  per example up to and including its own.
- prefix tuning: each layer's learned V keys/values go into the attention cache in front of the sequence, every
  token attends to them (tuneforge.model.attention handles a packed row's shared prefix), and the real tokens take
  positions V.. (PEFT's offset). The token layout and targets do not change.

The loss therefore stays on answer tokens only, and equals PEFT's own forward's loss (tests/unit/test_methods.py).
"""

from __future__ import annotations

from typing import Any

import torch

from tuneforge.data.batching import Batch
from tuneforge.model.attention import PACKED_ATTENTION
from tuneforge.model.virtual_generation import cache_argument, prompt_learning_type


def decoder_inputs(model: torch.nn.Module, lm: torch.nn.Module, batch: Batch) -> tuple[dict[str, Any], torch.Tensor]:
    """Keyword arguments for the decoder body and the flat positions of its output to predict from."""
    inputs: dict[str, Any] = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                              "position_ids": batch.position_ids}
    if batch.cu_seqlens is not None:  # packed row: per-example attention (tuneforge.model.attention)
        inputs["cu_seq_lens_q"] = inputs["cu_seq_lens_k"] = batch.cu_seqlens
    if batch.pairs is not None:  # preference pairs sharing one prompt (tuneforge.model.attention)
        # Any other attention would let the rejected answer see the chosen one, silently.
        assert lm.config._attn_implementation == PACKED_ATTENTION, "shared-prompt rows need use_packed_attention"
        inputs["shared_prompt_pairs"] = batch.pairs
    kind = prompt_learning_type(model)
    if kind == "prompt":
        return _with_soft_prompt(model, lm, batch, inputs)
    if kind == "prefix":
        return _with_prefix(model, lm, batch, inputs), batch.predict_at
    return inputs, batch.predict_at


def _with_soft_prompt(model, lm, batch: Batch, inputs: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor]:
    embeds = lm.get_input_embeddings()(batch.input_ids)  # [B, T, H]
    rows, width = batch.input_ids.shape
    prompt = model.get_prompt(batch_size=1).to(embeds.dtype)[0]  # [V, H]; the same soft prompt for every example
    v = prompt.shape[0]
    device = embeds.device
    if batch.cu_seqlens is None:  # padded rectangle: the prompt in front of each row
        inputs["inputs_embeds"] = torch.cat([prompt.expand(rows, -1, -1), embeds], dim=1)
        inputs["position_ids"] = torch.arange(v + width, device=device).expand(rows, -1)
        if batch.attention_mask is not None:
            ones = batch.attention_mask.new_ones(rows, v)
            inputs["attention_mask"] = torch.cat([ones, batch.attention_mask], dim=1)
        example = torch.div(batch.predict_at, width, rounding_mode="floor")
    else:  # packed row: the prompt in front of each example
        bounds = batch.cu_seqlens.tolist()
        pieces, positions = [], []
        for start, end in zip(bounds[:-1], bounds[1:]):
            pieces += [prompt, embeds[0, start:end]]
            positions.append(torch.arange(v + end - start, device=device))
        inputs["inputs_embeds"] = torch.cat(pieces).unsqueeze(0)
        inputs["position_ids"] = torch.cat(positions).unsqueeze(0)
        shifted = batch.cu_seqlens + v * torch.arange(len(bounds), dtype=batch.cu_seqlens.dtype)
        inputs["cu_seq_lens_q"] = inputs["cu_seq_lens_k"] = shifted
        example = torch.searchsorted(batch.cu_seqlens[1:].to(device, torch.long), batch.predict_at, right=True)
    del inputs["input_ids"]
    # Every example up to and including the target's own has grown by V positions in front of it.
    return inputs, batch.predict_at + v * (example + 1)


def _with_prefix(model, lm, batch: Batch, inputs: dict[str, Any]) -> dict[str, Any]:
    rows = batch.input_ids.shape[0]
    v = model.active_peft_config.num_virtual_tokens
    # A fresh cache each forward: attention appends this step's keys/values to it.
    inputs[cache_argument(lm.get_decoder())] = model.get_prompt(batch_size=rows)
    inputs["position_ids"] = batch.position_ids + v
    if batch.attention_mask is not None:
        inputs["attention_mask"] = torch.cat([batch.attention_mask.new_ones(rows, v), batch.attention_mask], dim=1)
    return inputs

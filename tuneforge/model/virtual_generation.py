"""Generation for prompt and prefix tuning: the learned virtual tokens as a ready-made attention cache.

PEFT 0.21 injects prefix tuning's keys/values into generation under the argument name `past_key_values`, which
transformers 5 renamed to `cache`; the injected prefix is silently dropped and a prefix-tuned model generates exactly
like its base model. Rather than depend on that handshake, tuneforge generates prompt-learning models itself, the
same way for both methods:

1. The virtual tokens become an attention cache of V positions: prefix tuning's learned keys/values as they are;
   prompt tuning's soft-prompt embeddings run once through the frozen decoder at positions 0..V-1.
2. The base model generates with that cache, behind V placeholder ids that stand for the cached positions (generate
   treats the first cache-length ids as already processed, so the placeholders are never read) and an attention mask
   of V ones in front. Real tokens therefore sit at positions V.., exactly where training put them, in padded
   batches too.
3. The placeholders are cut off the output, so callers see the sequences they asked for.

`use_virtual_token_generation` puts this `generate` on a PEFT prompt-learning model; greedy generation then equals
greedy decoding with PEFT's own (correct) forward, token for token (tests/unit/test_methods.py).
"""

from __future__ import annotations

import inspect
import types

import torch


def prompt_learning_type(model: torch.nn.Module) -> str | None:
    """'prompt', 'prefix' or None for a model whose forward PEFT changes with learned virtual tokens."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return None
    kind = {"PROMPT_TUNING": "prompt", "PREFIX_TUNING": "prefix"}.get(str(getattr(config.peft_type, "value", "")))
    if kind is None:
        raise NotImplementedError(f"PEFT {config.peft_type} is not a tuneforge method; use prompt or prefix tuning")
    return kind


def cache_argument(module: torch.nn.Module) -> str:
    """The name a transformers model takes its attention cache under: `cache` (transformers 5) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def virtual_token_cache(model: torch.nn.Module, rows: int):
    """The model's learned virtual tokens as an attention cache of num_virtual_tokens positions, for `rows` rows."""
    if prompt_learning_type(model) == "prefix":
        return model.get_prompt(batch_size=rows)
    decoder = model.get_base_model().get_decoder()
    embeds = model.get_prompt(batch_size=rows).to(decoder.get_input_embeddings().weight.dtype)
    with torch.no_grad():
        output = decoder(inputs_embeds=embeds, use_cache=True)
    return getattr(output, "cache", None) or output.past_key_values


def generate_with_virtual_tokens(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                 **kwargs):
    """`generate` for a prompt/prefix-tuned PEFT model (see the module docstring)."""
    base = model.get_base_model()
    rows, v = input_ids.shape[0], model.active_peft_config.num_virtual_tokens
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    placeholders = input_ids.new_zeros((rows, v))
    kwargs[cache_argument(base)] = virtual_token_cache(model, rows)
    output = base.generate(input_ids=torch.cat([placeholders, input_ids], dim=1),
                           attention_mask=torch.cat([attention_mask.new_ones((rows, v)), attention_mask], dim=1),
                           **kwargs)
    if isinstance(output, torch.Tensor):
        return output[:, v:]
    output.sequences = output.sequences[:, v:]
    return output


def use_virtual_token_generation(model: torch.nn.Module) -> torch.nn.Module:
    """Give a PEFT prompt-learning model tuneforge's `generate`; any other model is returned as it is."""
    if prompt_learning_type(model) is not None:
        model.generate = types.MethodType(generate_with_virtual_tokens, model)
    return model

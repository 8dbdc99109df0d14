"""Tiny random models of every family tuneforge supports, built in-process from transformers' config classes.

Each is small (2-3 layers, width 64) but has its family's features switched on, so a test that passes on it would
fail if tuneforge ignored one of them:
- a sliding window (WINDOW tokens) shorter than the test rows, on the layers the family slides on;
- Gemma 2's attention-logit and final-logit softcaps, and Gemma 3's final one, set low enough to bite;
- Llama 3's rope scaling, Qwen2's q/k/v biases, Qwen3's and Gemma 3's QK-norm (built into their layers), Gemma's
  scaled embeddings and query_pre_attn_scalar, Phi-3's fused qkv_proj and gate_up_proj;
- tied embeddings where the family's small models tie them (Qwen, Gemma), untied elsewhere.
`initializer_range` is raised from 0.02 to 0.2 so that attention scores are far from uniform and logits reach the
softcaps: with the default, softcapping and the window change the loss by less than float noise.
"""

from __future__ import annotations

import torch

WINDOW = 8  # sliding window of every tiny family that has one; the test rows are longer

_COMMON = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def _llama(vocab_size):
    from transformers import LlamaConfig, LlamaForCausalLM

    # Llama 3.1's rope scaling (the "llama3" rope type), with an original context short enough to take effect.
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    return LlamaForCausalLM, LlamaConfig(vocab_size=vocab_size, num_hidden_layers=2, tie_word_embeddings=False,
                                         rope_parameters=rope, rms_norm_eps=1e-5, **_COMMON)


def _mistral(vocab_size):
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM, MistralConfig(vocab_size=vocab_size, num_hidden_layers=2, sliding_window=WINDOW,
                                             tie_word_embeddings=False, **_COMMON)


def _qwen2(vocab_size):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # Layer 0 full attention, layer 1 sliding (max_window_layers=1); q/k/v have biases in every Qwen2 layer.
    return Qwen2ForCausalLM, Qwen2Config(vocab_size=vocab_size, num_hidden_layers=2, use_sliding_window=True,
                                         sliding_window=WINDOW, max_window_layers=1, tie_word_embeddings=True,
                                         **_COMMON)


def _qwen3(vocab_size):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM, Qwen3Config(vocab_size=vocab_size, num_hidden_layers=2, head_dim=16,
                                         use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                                         tie_word_embeddings=True, **_COMMON)


def _gemma2(vocab_size):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # Local (sliding) then global layers, both softcaps low enough that tanh bends the logits.
    common = {**_COMMON, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1}
    return Gemma2ForCausalLM, Gemma2Config(vocab_size=vocab_size, num_hidden_layers=2, head_dim=16,
                                           query_pre_attn_scalar=24, sliding_window=WINDOW,
                                           attn_logit_softcapping=2.0, final_logit_softcapping=3.0, **common)


def _gemma3(vocab_size):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    common = {**_COMMON, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1}
    return Gemma3ForCausalLM, Gemma3TextConfig(
        vocab_size=vocab_size, num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], final_logit_softcapping=3.0,
        **common)


def _phi3(vocab_size):
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM, Phi3Config(vocab_size=vocab_size, num_hidden_layers=2, sliding_window=WINDOW,
                                       tie_word_embeddings=False, **_COMMON)


BUILDERS = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3, "gemma2": _gemma2,
            "gemma3": _gemma3, "phi3": _phi3}
FAMILIES = list(BUILDERS)


def tiny_config(family: str, vocab_size: int):
    return BUILDERS[family](vocab_size)[1]


def tiny_model(family: str, vocab_size: int, seed: int = 0, **config_changes) -> torch.nn.Module:
    """A random fp32 model of `family` (same weights for the same seed); `config_changes` edit its config."""
    model_class, config = BUILDERS[family](vocab_size)
    for key, value in config_changes.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return model_class(config).eval()


# Gemma 2's chat template as google/gemma-2-2b-it ships it (tokenizer_config.json): no system role; it raises on one.
GEMMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

"""Evaluate a model that may be mid-training with tuneforge's packed attention, then put its attention back.

Packed attention ignores padding masks (it expects one padding-free row), so padded batches (generation, perplexity,
multiple choice) must run with transformers' standard SDPA.
"""

from __future__ import annotations

from contextlib import contextmanager

from tuneforge.model.attention import PACKED_ATTENTION, use_standard_attention
from tuneforge.train.forward import causal_lm_of


def attention_implementation(model) -> str | None:
    return getattr(causal_lm_of(model).config, "_attn_implementation", None)


@contextmanager
def standard_attention(model):
    """Standard SDPA inside the block; the previous implementation (e.g. packed) is restored after it."""
    previous = attention_implementation(model)
    if previous != PACKED_ATTENTION:
        yield model
        return
    use_standard_attention(model)
    try:
        yield model
    finally:
        causal_lm_of(model).set_attn_implementation(previous)

"""Evaluate a model that may be mid-training with tuneforge's packed attention, then put it back as it was.

Packed attention ignores padding masks (it expects one padding-free row), so padded batches (generation, perplexity,
multiple choice, lm-eval) must run with transformers' standard SDPA; and dropout must be off while scoring.
"""

from __future__ import annotations

from contextlib import contextmanager

from tuneforge.model.attention import PACKED_ATTENTION, use_standard_attention
from tuneforge.train.forward import causal_lm_of


def attention_implementation(model) -> str | None:
    return getattr(causal_lm_of(model).config, "_attn_implementation", None)


@contextmanager
def evaluating(model):
    """Eval mode and standard SDPA inside the block; the training mode and the previous attention implementation
    (e.g. packed) are restored after it, also when the block raises."""
    was_training = model.training
    previous = attention_implementation(model)
    model.eval()
    try:
        if previous == PACKED_ATTENTION:
            use_standard_attention(model)
        yield model
    finally:
        if previous == PACKED_ATTENTION:
            causal_lm_of(model).set_attn_implementation(previous)
        model.train(was_training)

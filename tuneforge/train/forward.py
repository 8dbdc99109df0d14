"""One micro-batch through the model: body -> hidden states at target positions -> chunked head + loss."""

from __future__ import annotations

import torch

from tuneforge.data.batching import Batch
from tuneforge.train.loss import answer_token_loss_sum


def causal_lm_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers *ForCausalLM module inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def batch_loss_sum(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Summed cross-entropy over the batch's target tokens (divide by the step's target count for the mean)."""
    lm = causal_lm_of(model)
    body = lm.get_decoder()
    extra = {}
    if batch.cu_seqlens is not None:  # packed row: per-example attention (tuneforge.model.attention)
        extra = {"cu_seq_lens_q": batch.cu_seqlens, "cu_seq_lens_k": batch.cu_seqlens}
    hidden = body(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        **extra,
    ).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.predict_at)
    return answer_token_loss_sum(hidden, lm.get_output_embeddings().weight, batch.targets)

"""One micro-batch through the model: body -> hidden states at target positions -> chunked head + loss."""

from __future__ import annotations

import torch

from tuneforge.data.batching import Batch
from tuneforge.train.loss import answer_token_loss_sum
from tuneforge.train.virtual_tokens import decoder_inputs


def causal_lm_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers *ForCausalLM module inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def target_hidden(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """The decoder body's hidden states at the positions that predict the batch's targets ([N, d]), the head's
    weight, and the head's logit softcap (Gemma 2/3) or None: what the chunked head needs."""
    lm = causal_lm_of(model)
    # Token ids, positions and attention layout; prompt/prefix tuning add their learned virtual tokens here.
    inputs, predict_at = decoder_inputs(model, lm, batch)
    hidden = lm.get_decoder()(**inputs, use_cache=False).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, predict_at)
    return hidden, lm.get_output_embeddings().weight, getattr(lm.config, "final_logit_softcapping", None)


def batch_loss_sum(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Summed cross-entropy over the batch's target tokens (divide by the step's target count for the mean)."""
    hidden, head, softcap = target_hidden(model, batch)
    return answer_token_loss_sum(hidden, head, batch.targets, softcap=softcap)


class AnswerTokenLossSum(torch.nn.Module):
    """`batch_loss_sum` as a module's forward. DDP and FSDP act when a wrapped module's forward runs (gradient
    reduction bookkeeping, all-gathering sharded weights), and our forward is this loss, not the model's logits."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> torch.Tensor:
        return batch_loss_sum(self.model, batch)

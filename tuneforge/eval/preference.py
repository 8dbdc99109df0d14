"""Preference accuracy on held-out pairs (`tuneforge eval RUN --pairs FILE`): does the model score the chosen answer
above the rejected one?

Scored exactly as training scores a pair (tuneforge.train.preference.sequence_logps: one packed row per batch with
each prompt computed once, log-probabilities of the answer tokens from the chunked head), with no reference: the
question is which answer this model prefers, so base and tuned are compared on the same footing.
- preference_accuracy: sum log p(chosen) > sum log p(rejected);
- preference_accuracy_length_normalised: the same per answer token, which a short rejected answer cannot win on
  length alone;
- preference_margin: the mean of sum log p(chosen) - sum log p(rejected), in nats.
"""

from __future__ import annotations

import torch

from tuneforge.data.batching import collate_pairs
from tuneforge.data.formats import Example
from tuneforge.data.preference_tokens import tokenize_pairs
from tuneforge.data.tokenize import ensure_chat_template
from tuneforge.errors import DataError

PAIR_MAX_LENGTH = 4096  # per side (prompt + answer); a longer prompt loses its middle, as in training


def load_pairs(path: str) -> list[Example]:
    from tuneforge.data.formats import load_examples

    examples = load_examples(path)
    if examples[0].rejected is None:
        raise DataError(f"{examples[0].source}: --pairs needs preference pairs ({{prompt, chosen, rejected}} or "
                        "{chosen, rejected} conversations)")
    return examples


@torch.no_grad()
def preference_scores(model, tokenizer, examples: list[Example], batch_size: int) -> dict[str, float]:
    from tuneforge.model.attention import use_packed_attention, use_standard_attention
    from tuneforge.train.preference import sequence_logps

    ensure_chat_template(tokenizer)
    pairs, report = tokenize_pairs(tokenizer, examples, PAIR_MAX_LENGTH, "truncate")
    if not pairs:
        raise DataError(f"{examples[0].source}: no pair is left after tokenization ({report.summary()})")
    device = next(model.parameters()).device
    sums, counts = [], []
    use_packed_attention(model)
    try:
        for start in range(0, len(pairs), batch_size):
            logps, n, _ = sequence_logps(model, collate_pairs(pairs[start : start + batch_size]).to(device))
            sums.append(logps.double().cpu())
            counts.append(n.double().cpu())
    finally:
        use_standard_attention(model)
    logps, n = torch.cat(sums), torch.cat(counts)
    per_token = logps / n.clamp(min=1)
    return {"preference_accuracy": (logps[:, 0] > logps[:, 1]).double().mean().item(),
            "preference_accuracy_length_normalised": (per_token[:, 0] > per_token[:, 1]).double().mean().item(),
            "preference_margin": (logps[:, 0] - logps[:, 1]).mean().item(),
            "preference_pairs": float(len(pairs))}

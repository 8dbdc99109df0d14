"""A generation metric on a sample of the validation rows, for the training loop's periodic evaluation.

Validation loss says whether the model predicts the reference tokens; a generation metric says whether what it
actually writes is right (the format, the exact answer). Both can disagree, e.g. loss still falling while exact
match has plateaued, so early stopping may follow either. Every value here is higher-is-better, so "improved" means
"larger" for all of them.

The sample is drawn once per seed (the same rows at every evaluation, so values along a run are comparable) and
generation is greedy, so the metric changes only when the model does. The model is put back in training mode and
keeps its attention implementation (tuneforge.eval.generation handles packed attention and virtual tokens).
"""

from __future__ import annotations

import random

from tuneforge.config import TrainSettings
from tuneforge.data.formats import Example
from tuneforge.errors import ConfigError
from tuneforge.eval.generation import generate_replies
from tuneforge.eval.metrics import bleu, exact_match, rouge

# metric name -> (function of predictions and references, key of its result)
SAMPLE_METRICS = {
    "exact_match": (exact_match, "exact_match"),
    "exact_match_normalised": (exact_match, "exact_match_normalised"),
    "rouge1": (rouge, "rouge1"),
    "rouge2": (rouge, "rouge2"),
    "rougeL": (rouge, "rougeL"),
    "bleu": (bleu, "bleu"),
}


def check_sample_metric(metric: str) -> None:
    """For config validation: a one-line error naming the allowed metrics."""
    if metric not in SAMPLE_METRICS:
        raise ConfigError(f"eval metric {metric!r}: unknown (allowed: {', '.join(SAMPLE_METRICS)})")


def sample_rows(val_rows: list[Example], sample: int, seed: int) -> list[Example]:
    """Up to `sample` chat-shaped rows (completion rows have no reference answer), the same ones for a given seed."""
    chat = [row for row in val_rows if row.messages is not None]
    if sample <= 0 or sample >= len(chat):
        return chat
    return random.Random(seed).sample(chat, sample)


_TRAIN = TrainSettings()  # the loop passes its run's values; these defaults are the run config's (one home)


def sample_metric(model, tokenizer, val_rows: list[Example], metric: str, sample: int = _TRAIN.eval_metric_sample,
                  max_new_tokens: int = _TRAIN.eval_metric_max_new_tokens, seed: int = _TRAIN.seed,
                  batch_size: int = _TRAIN.batch_size) -> float:
    """`metric` (a SAMPLE_METRICS name; higher is better) of greedy answers to `sample` validation rows."""
    check_sample_metric(metric)
    rows = sample_rows(val_rows, sample, seed)
    if not rows:
        raise ConfigError(f"eval metric {metric}: the validation set has no instruction or chat rows to answer")
    prompts = [[dict(m) for m in row.messages[:-1]] for row in rows]
    references = [row.messages[-1]["content"] for row in rows]
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    function, key = SAMPLE_METRICS[metric]
    return float(function(replies, references)[key])

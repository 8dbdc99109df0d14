"""The during-training generation metric: the sampled rows' metric equals the metric library on the same answers,
the sample is fixed by the seed, the model goes back to training mode, and bad names are one-line errors."""

from __future__ import annotations

import pytest

from tuneforge.data.formats import Example
from tuneforge.errors import ConfigError
from tuneforge.eval import during_training
from tuneforge.eval.during_training import SAMPLE_METRICS, sample_metric, sample_rows
from tuneforge.eval.generation import generate_replies
from tuneforge.eval.metrics import rouge


def row(i: int) -> Example:
    return Example(source=f"val:{i}", messages=({"role": "user", "content": f"Repeat the number {i}."},
                                                {"role": "assistant", "content": f"The number is {i} ."}))


VAL = [row(i) for i in range(10)] + [Example(source="val:text", text="a completion row has no reference")]


def test_metric_equals_the_library_on_the_sampled_rows_and_restores_training_mode(tiny_model, tokenizer):
    tiny_model.train()
    value = sample_metric(tiny_model, tokenizer, VAL, "rougeL", sample=4, max_new_tokens=6, seed=3)
    assert tiny_model.training
    rows = sample_rows(VAL, 4, 3)
    replies = generate_replies(tiny_model, tokenizer, [[dict(r.messages[0])] for r in rows], max_new_tokens=6)
    assert value == pytest.approx(rouge(replies, [r.messages[1]["content"] for r in rows])["rougeL"])


def test_sample_is_fixed_by_the_seed_and_skips_completion_rows():
    assert sample_rows(VAL, 4, 3) == sample_rows(VAL, 4, 3) != sample_rows(VAL, 4, 4)
    assert len(sample_rows(VAL, 0, 3)) == 10 and all(r.messages for r in sample_rows(VAL, 50, 3))


def test_a_perfect_model_scores_the_maximum_on_every_metric(monkeypatch, tokenizer):
    """Higher is better for every metric: answers equal to the references score 1 (BLEU: 100)."""
    answers = {r.messages[0]["content"]: r.messages[1]["content"] for r in VAL[:-1]}
    monkeypatch.setattr(during_training, "generate_replies",
                        lambda model, tok, prompts, **kw: [answers[p[0]["content"]] for p in prompts])
    for metric in SAMPLE_METRICS:
        expected = 100.0 if metric == "bleu" else 1.0
        assert sample_metric(None, tokenizer, VAL, metric, sample=5, seed=0) == pytest.approx(expected), metric


def test_unknown_metric_and_no_chat_rows_are_one_line_errors(tokenizer):
    with pytest.raises(ConfigError, match=r"eval metric 'accuracy': unknown \(allowed: exact_match, "):
        sample_metric(None, tokenizer, VAL, "accuracy", sample=2)
    with pytest.raises(ConfigError, match="no instruction or chat rows"):
        sample_metric(None, tokenizer, VAL[-1:], "bleu", sample=2)

"""Metric values equal the reference libraries (rouge-score, sacrebleu) called directly on the same strings."""

from __future__ import annotations

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from tuneforge.eval.metrics import bleu, exact_match, generation_scores, per_example_scores, rouge

PREDICTIONS = [
    "NAME=Ines Kowalski; CITY=Tampere",
    "The cat sat on the mat.",
    "the quick brown fox jumps over the lazy dog",
    "",
    "Paris is the capital of France",
]
REFERENCES = [
    "NAME=Ines Kowalski; CITY=Tampere",
    "A cat sat on a mat",
    "The quick brown fox jumped over the lazy dogs.",
    "something",
    "The capital of France is Paris.",
]


def test_rouge_is_the_mean_of_rouge_score_f_measures():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    reference = [scorer.score(r, p) for p, r in zip(PREDICTIONS, REFERENCES)]
    ours = rouge(PREDICTIONS, REFERENCES)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert ours[key] == pytest.approx(sum(s[key].fmeasure for s in reference) / len(reference), abs=1e-12)
    assert 0 < ours["rouge2"] < ours["rouge1"] < 1


def test_bleu_is_sacrebleu_corpus_bleu():
    assert bleu(PREDICTIONS, REFERENCES)["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score, abs=1e-12)
    assert bleu(REFERENCES, REFERENCES)["bleu"] == pytest.approx(100.0)


def test_exact_match_strict_and_normalised():
    scores = exact_match(PREDICTIONS, REFERENCES)
    assert scores["exact_match"] == pytest.approx(1 / 5)
    # "The cat sat on the mat." vs "A cat sat on a mat": equal once articles and punctuation go.
    assert scores["exact_match_normalised"] == pytest.approx(2 / 5)


def test_generation_scores_merges_the_requested_metrics_only():
    scores = generation_scores(["bleu", "exact_match"], PREDICTIONS, REFERENCES)
    assert set(scores) == {"bleu", "exact_match", "exact_match_normalised"}


def test_per_example_scores_match_the_libraries():
    rows = per_example_scores(["rouge", "bleu", "exact_match"], PREDICTIONS, REFERENCES)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for row, p, r in zip(rows, PREDICTIONS, REFERENCES):
        assert row["rougeL"] == pytest.approx(scorer.score(r, p)["rougeL"].fmeasure)
        assert row["sentence_bleu"] == pytest.approx(sacrebleu.sentence_bleu(p, [r]).score)
    assert [row["exact_match"] for row in rows] == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge(["a", "b"], ["a"])

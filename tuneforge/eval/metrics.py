"""Answer-level metrics: exact match (ours: a string comparison), ROUGE (`rouge-score`), corpus BLEU (`sacrebleu`).

Each function takes predictions and references in the same order and returns a dict of named scores. ROUGE and exact
match are fractions in [0, 1] averaged over examples; BLEU is sacrebleu's corpus score on its usual 0-100 scale.
"""

from __future__ import annotations

import logging
import re
import string

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
# The generation metrics `tuneforge eval --metrics` accepts (perplexity is computed from the model, not from answers).
GENERATION_METRICS = ("rouge", "bleu", "exact_match")


def normalise_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _check_lengths(predictions: list[str], references: list[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


def exact_match(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Fraction of exact matches: `strict` after stripping outer whitespace, `normalised` after normalise_answer."""
    _check_lengths(predictions, references)
    n = max(len(references), 1)
    strict = sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / n
    loose = sum(normalise_answer(p) == normalise_answer(r) for p, r in zip(predictions, references)) / n
    return {"exact_match": strict, "exact_match_normalised": loose}


def rouge_per_example(predictions: list[str], references: list[str]) -> list[dict[str, float]]:
    """ROUGE-1/2/L F-measure of each prediction against its reference (rouge-score's English tokenizer, no stemming,
    the same defaults as Hugging Face `evaluate`)."""
    from rouge_score import rouge_scorer

    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score logs "Using default tokenizer." on every call
    _check_lengths(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    return [{k: s.fmeasure for k, s in scorer.score(ref, pred).items()} for pred, ref in zip(predictions, references)]


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure over examples."""
    per_example = rouge_per_example(predictions, references)
    n = max(len(per_example), 1)
    return {k: sum(s[k] for s in per_example) / n for k in ROUGE_TYPES}


def bleu(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu defaults: 13a tokenization, exponential smoothing), one reference per example."""
    import sacrebleu

    _check_lengths(predictions, references)
    return {"bleu": sacrebleu.corpus_bleu(predictions, [references]).score}


def generation_scores(names: list[str], predictions: list[str], references: list[str]) -> dict[str, float]:
    """The requested generation metrics (names from GENERATION_METRICS), merged into one dict."""
    functions = {"rouge": rouge, "bleu": bleu, "exact_match": exact_match}
    scores: dict[str, float] = {}
    for name in names:
        scores.update(functions[name](predictions, references))
    return scores


def per_example_scores(names: list[str], predictions: list[str], references: list[str]) -> list[dict[str, float]]:
    """Scores of each answer on its own, for the per-example output file (BLEU there is sentence BLEU)."""
    import sacrebleu

    _check_lengths(predictions, references)
    rows: list[dict[str, float]] = [{} for _ in predictions]
    if "rouge" in names:
        for row, scores in zip(rows, rouge_per_example(predictions, references)):
            row.update(scores)
    for row, pred, ref in zip(rows, predictions, references):
        if "exact_match" in names:
            row.update({k: float(v) for k, v in exact_match([pred], [ref]).items()})
        if "bleu" in names:
            row["sentence_bleu"] = sacrebleu.sentence_bleu(pred, [ref]).score
    return rows

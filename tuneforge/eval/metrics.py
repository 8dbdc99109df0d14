"""Answer-level metrics."""

from __future__ import annotations

import re
import string


def normalise_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Fraction of exact matches: `strict` after stripping outer whitespace, `normalised` after normalise_answer."""
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    n = max(len(references), 1)
    strict = sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / n
    loose = sum(normalise_answer(p) == normalise_answer(r) for p, r in zip(predictions, references)) / n
    return {"exact_match": strict, "exact_match_normalised": loose}

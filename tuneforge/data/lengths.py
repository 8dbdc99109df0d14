"""Token lengths of rows as training sees them, fast enough for a million rows; their histogram and percentiles.

Training renders each row with the chat template and tokenizes it piece by piece (`tokenize.tokenize_example`):
seconds per thousand rows. Here the template's own tokens are counted once per sequence of roles (on a copy of the
row with empty turns, through the same `tokenize_example`), and each turn's text is tokenized in large batches by
the Rust tokenizer; a row's length is the sum. That is exact whenever the template inserts turn text verbatim
(as SmolLM2's, Llama's and Qwen's do; `tests/unit/test_data_check.py` checks it against `tokenize_example`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tuneforge.data.formats import Example
from tuneforge.data.tokenize import ensure_chat_template, tokenize_example
from tuneforge.errors import DataError

# Histogram bin edges in tokens (the last bin is open-ended): powers of two read well at every scale.
HIST_EDGES = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class RowTokens:
    total: int  # tokens of the whole rendered row
    answer_tail: int | None  # tokens from the start of the last answer to the end (None: completion text)
    answer: int | None  # tokens of the last answer's text alone


@dataclass(frozen=True)
class _Template:
    overhead: int  # template tokens of a row with these roles and empty turns
    answer_overhead: int  # of which belong to the last answer's tail (end-of-turn token and what follows)


class LengthCounter:
    def __init__(self, tokenizer):
        ensure_chat_template(tokenizer)
        self.tokenizer = tokenizer
        self._templates: dict[tuple[str, ...], _Template] = {}
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._encode = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)

    def count(self, examples: list[Example]) -> list[RowTokens]:
        texts: list[str] = []
        for ex in examples:
            texts.extend([m["content"] for m in ex.messages] if ex.messages is not None else [ex.text])
        counts = self._token_counts(texts)
        results, position = [], 0
        for ex in examples:
            template = self._template(ex)
            if ex.messages is None:
                results.append(RowTokens(template.overhead + counts[position], None, None))
                position += 1
                continue
            turns = counts[position : position + len(ex.messages)]
            position += len(ex.messages)
            last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
            results.append(RowTokens(template.overhead + sum(turns), template.answer_overhead + sum(turns[last:]),
                                     turns[last]))
        return results

    def _token_counts(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        if self._encode is not None:
            return [len(encoding) for encoding in self._encode(texts, add_special_tokens=False)]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _template(self, example: Example) -> _Template:
        roles = ("completion",) if example.messages is None else tuple(m["role"] for m in example.messages)
        if roles not in self._templates:
            self._templates[roles] = self._measure_template(roles)
        return self._templates[roles]

    def _measure_template(self, roles: tuple[str, ...]) -> _Template:
        if roles == ("completion",):
            empty = Example(source="template", text="")
        else:
            empty = Example(source="template", messages=tuple({"role": r, "content": ""} for r in roles))
        try:
            tokenized = tokenize_example(self.tokenizer, empty)
        except DataError:  # a template that does not render prefix by prefix: count the whole render
            text = self.tokenizer.apply_chat_template([dict(m) for m in empty.messages], tokenize=False)
            return _Template(len(self.tokenizer(text, add_special_tokens=False)["input_ids"]), 0)
        n = len(tokenized.input_ids)
        if empty.messages is None or not any(tokenized.target):
            return _Template(n, 0)
        end = max(i for i, t in enumerate(tokenized.target) if t)
        start = end
        while start > 0 and tokenized.target[start - 1]:
            start -= 1
        return _Template(n, n - start)


def would_be_dropped(row: RowTokens, max_length: int) -> bool:
    """Under `data.overlong: truncate`: a conversation whose last answer (and its end of turn) cannot fit with two
    prompt tokens is dropped (`tokenize.fit_to_length`); completion text is cut at the end, never dropped."""
    return row.answer_tail is not None and max_length - row.answer_tail < 2


def length_summary(lengths: np.ndarray) -> dict:
    if not len(lengths):
        return {"rows": 0}
    summary = {"rows": int(len(lengths)), "min": int(lengths.min()), "mean": round(float(lengths.mean()), 1)}
    for p, value in zip(PERCENTILES, np.percentile(lengths, PERCENTILES, method="lower")):
        summary[f"p{p}"] = int(value)
    summary["max"] = int(lengths.max())
    return summary


def histogram(lengths: np.ndarray) -> list[dict]:
    """Counts per power-of-two bin, from the bin of the shortest row to that of the longest."""
    if not len(lengths):
        return []
    edges = np.array(HIST_EDGES + (np.iinfo(np.int64).max,))
    counts, _ = np.histogram(lengths, bins=edges)
    used = np.flatnonzero(counts)
    bins = []
    for k in range(used[0], used[-1] + 1):
        hi = None if k + 1 == len(HIST_EDGES) else HIST_EDGES[k + 1] - 1
        bins.append({"from": HIST_EDGES[k], "to": hi, "rows": int(counts[k])})
    return bins


def plot_histogram(lengths: np.ndarray, max_length: int, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    top = max(int(lengths.max()) if len(lengths) else 1, max_length) + 1
    ax.hist(lengths, bins=np.linspace(0, top, min(100, top) + 1), color="#4C72B0")
    ax.axvline(max_length, color="#C44E52", linestyle="--", label=f"max length {max_length}")
    ax.set_xlabel("tokens per row")
    ax.set_ylabel("rows")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

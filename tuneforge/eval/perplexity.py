"""Perplexity on answer tokens (the whole text for completion rows), computed exactly as validation loss is.

Rows are tokenized by the training path (`tokenize_all`: chat template, answer-token targets, the same truncation
policy) and scored by the training forward (`batch_loss_sum`: summed answer-token cross-entropy, chunked), so the
perplexity of a run on its own validation rows is exp(its val_loss). Also reads plain .txt files (for the forgetting
check on "any text"): blank-line separated paragraphs become completion rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from tuneforge.data.batching import collate_padded
from tuneforge.data.formats import Example, load_examples
from tuneforge.data.tokenize import ensure_chat_template, tokenize_all
from tuneforge.errors import DataError
from tuneforge.eval.attention_guard import evaluating
from tuneforge.eval.settings import GENERATION
from tuneforge.train.forward import batch_loss_sum, causal_lm_of

# Paragraphs of a .txt file are joined into rows of about this many characters (a few hundred tokens).
TEXT_ROW_CHARS = 2000


@dataclass
class Perplexity:
    loss: float  # mean cross-entropy per target token, in nats
    tokens: int  # target tokens scored
    examples: int  # rows scored (after dropping rows with no target left)
    truncated: int
    dropped: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf


def load_text_or_rows(path: str) -> list[Example]:
    """Rows of any data file tuneforge reads, or paragraphs of a plain .txt file as completion rows."""
    p = Path(path)
    if p.suffix.lower() != ".txt":
        return load_examples(path)
    if not p.is_file():
        raise DataError(f"{path}: file not found")
    try:
        paragraphs = [para.strip() for para in p.read_text(encoding="utf-8").split("\n\n") if para.strip()]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: bytes that are not UTF-8 (at byte {exc.start})") from None
    rows, current, start = [], "", 1
    for index, para in enumerate(paragraphs, start=1):
        current = f"{current}\n\n{para}" if current else para
        if len(current) >= TEXT_ROW_CHARS:
            rows.append(Example(source=f"{path}:paragraphs {start}-{index}", text=current))
            current, start = "", index + 1
    if current:
        rows.append(Example(source=f"{path}:paragraphs {start}-{len(paragraphs)}", text=current))
    if not rows:
        raise DataError(f"{path}: no text")
    return rows


def model_max_length(model) -> int:
    return int(getattr(causal_lm_of(model).config, "max_position_embeddings", 2048) or 2048)


@torch.no_grad()
def answer_perplexity(model, tokenizer, examples: list[Example], batch_size: int = GENERATION.batch_size,
                      max_length: int | None = None) -> Perplexity:
    """Mean answer-token cross-entropy of `examples` under `model` (eval mode, standard attention, padded batches)."""
    ensure_chat_template(tokenizer)
    max_length = max_length or model_max_length(model)
    tokenized, report = tokenize_all(tokenizer, examples, max_length, "truncate", train_on_prompt=False)
    if not tokenized:
        raise DataError(f"{examples[0].source}: no row has an answer token left to score")
    tokenized.sort(key=lambda ex: len(ex.input_ids))  # similar lengths per batch: less padding
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with evaluating(model):
        for start in range(0, len(tokenized), batch_size):
            batch = collate_padded(tokenized[start : start + batch_size], tokenizer.pad_token_id).to(device)
            total += float(batch_loss_sum(model, batch))
            count += batch.num_targets
    return Perplexity(total / max(count, 1), count, len(tokenized), report.truncated, report.dropped)

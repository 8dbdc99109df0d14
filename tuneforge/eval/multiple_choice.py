"""Multiple choice (MMLU format) scored by log-likelihood, from local files.

A row: {"question": ..., "choices": [...], "answer": 2 | "C", "subject": ... (optional)}; the columns A, B, C, D
(MMLU's CSV layout) work in place of "choices". Two ways to score, both standard:
- `letter` (MMLU, as in its paper and lm-eval's `mmlu`): the prompt lists the lettered choices and ends "Answer:";
  the model's log-likelihood of " A", " B", ... picks the answer.
- `text` (ARC/HellaSwag style): the prompt is "Question: ...\nAnswer:" and each choice's own text is scored; `acc`
  compares summed log-likelihoods, `acc_norm` divides them by the choice's length in bytes (longer answers are not
  penalised for being long).
When several choices tie for the best score, the question earns 1/(number tied) if the right one is among them: a
model with no preference (uniform next-token distribution) then scores exactly chance, not "always A".
"""

from __future__ import annotations

import string
import typing
from dataclasses import dataclass
from typing import Callable

import torch

from tuneforge.data.formats import read_rows
from tuneforge.errors import DataError
from tuneforge.eval.attention_guard import evaluating
from tuneforge.eval.settings import PLAN, MultipleChoiceStyle
from tuneforge.data.batching import Batch
from tuneforge.train.forward import causal_lm_of
from tuneforge.train.virtual_tokens import decoder_inputs

LETTERS = string.ascii_uppercase
STYLES = typing.get_args(MultipleChoiceStyle)


@dataclass(frozen=True)
class Question:
    source: str
    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str | None = None


def load_questions(path: str) -> list[Question]:
    questions = [_question(row, where) for where, row in read_rows(path)]
    if not questions:
        raise DataError(f"{path}: no rows")
    return questions


def _question(row, where: str) -> Question:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: missing or empty 'question'")
    choices = row.get("choices")
    if choices is None:  # MMLU's CSV layout: one column per letter
        choices = [row[letter] for letter in LETTERS if letter in row]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: 'choices' must be a list of at least two texts (or columns A, B, ...)")
    answer = given = row.get("answer")
    if isinstance(answer, str) and answer.strip().isdigit():
        answer = int(answer.strip())  # CSV cells arrive as text
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS:
        answer = LETTERS.index(answer.strip().upper())
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise DataError(f"{where}: 'answer' must be a choice index 0-{len(choices) - 1} or a letter "
                        f"A-{LETTERS[len(choices) - 1]}, got {given!r}")
    subject = row.get("subject") if isinstance(row.get("subject"), str) else None
    return Question(where, question.strip(), tuple(choices), answer, subject)


def requests_for(question: Question, style: str) -> list[tuple[str, str]]:
    """(context, continuation) pairs, one per choice, whose log-likelihoods decide the answer."""
    if style == "letter":
        header = f"The following are multiple choice questions (with answers) about {question.subject.replace('_', ' ')}.\n\n" \
            if question.subject else ""
        lines = [question.question] + [f"{LETTERS[i]}. {c.strip()}" for i, c in enumerate(question.choices)]
        context = header + "\n".join(lines) + "\nAnswer:"
        return [(context, f" {LETTERS[i]}") for i in range(len(question.choices))]
    context = f"Question: {question.question}\nAnswer:"
    return [(context, f" {c.strip()}") for c in question.choices]


def _credit(scores: list[float], answer: int) -> float:
    best = max(scores)
    tied = [i for i, s in enumerate(scores) if s == best]
    return 1.0 / len(tied) if answer in tied else 0.0


LoglikFn = Callable[[list[tuple[str, str]]], list[float]]


def score_questions(questions: list[Question], loglik: LoglikFn,
                    style: str = PLAN.mc_style) -> tuple[dict[str, float], list[dict]]:
    """(summary scores, per-question records) with `loglik` giving log P(continuation | context) per request."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}")
    requests = [r for q in questions for r in requests_for(q, style)]
    values = loglik(requests)
    records, offset = [], 0
    acc = acc_norm = 0.0
    for q in questions:
        scores = values[offset : offset + len(q.choices)]
        offset += len(q.choices)
        credit = _credit(scores, q.answer)
        record = {"source": q.source, "answer": q.answer, "logliks": scores,
                  "predicted": max(range(len(scores)), key=scores.__getitem__), "credit": credit}
        acc += credit
        if style == "text":
            normalised = [s / max(len(c.strip().encode("utf-8")), 1) for s, c in zip(scores, q.choices)]
            record["credit_norm"] = _credit(normalised, q.answer)
            acc_norm += record["credit_norm"]
        records.append(record)
    n = len(questions)
    summary = {"mc_acc": acc / n}
    if style == "text":
        summary["mc_acc_norm"] = acc_norm / n
    return summary, records


@torch.no_grad()
def continuation_logliks(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 16) -> list[float]:
    """log P(continuation | context) for each pair: context and continuation tokenized apart (as a prompt and its
    answer are in training), scored in right-padded batches from the model's full next-token distribution."""
    rows = []
    for context, continuation in requests:
        ctx = tokenizer(context)["input_ids"]
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not ctx or not cont:
            raise DataError(f"multiple choice: empty context or choice in {context[:60]!r}")
        rows.append((ctx + cont, len(ctx)))
    lm = causal_lm_of(model)
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    results = [0.0] * len(rows)
    with evaluating(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(rows[i][0]) for i in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            predict_at, targets, counts = [], [], []
            for r, i in enumerate(chunk):
                tokens, ctx_len = rows[i]
                ids[r, : len(tokens)] = torch.tensor(tokens)
                mask[r, : len(tokens)] = 1
                # Positions ctx_len-1 .. len-2 predict the continuation's tokens.
                predict_at += range(r * width + ctx_len - 1, r * width + len(tokens) - 1)
                targets += tokens[ctx_len:]
                counts.append(len(tokens) - ctx_len)
            batch = Batch(ids, torch.arange(width).expand(len(chunk), width).contiguous(), mask, None,
                          torch.tensor(predict_at), torch.tensor(targets), int(mask.sum())).to(device)
            # The training forward's inputs: prompt/prefix-tuned models get their learned virtual tokens here.
            inputs, at = decoder_inputs(model, lm, batch)
            hidden = lm.get_decoder()(**inputs, use_cache=False).last_hidden_state
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, at)
            logits = lm.get_output_embeddings()(hidden).float()
            scores = torch.log_softmax(logits, -1).gather(1, batch.targets[:, None]).squeeze(1)
            for i, part in zip(chunk, scores.split(counts)):
                results[i] = float(part.sum())
    return results


def evaluate_multiple_choice(model, tokenizer, path: str, style: str = PLAN.mc_style,
                             batch_size: int = 16) -> tuple[dict[str, float], list[dict]]:
    questions = load_questions(path)
    return score_questions(questions, lambda reqs: continuation_logliks(model, tokenizer, reqs, batch_size), style)

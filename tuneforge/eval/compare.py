"""Held-out exact match of one model in one call (bench/methods.py, the e2e demo test); `tuneforge eval` itself runs
the fuller tuneforge.eval.suite."""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.data.formats import load_examples
from tuneforge.errors import DataError
from tuneforge.eval.generation import generate_replies
from tuneforge.eval.metrics import exact_match
from tuneforge.model.trained import load_for_inference


@dataclass
class EvalResult:
    name: str
    replies: list[str]
    scores: dict[str, float]


def prompts_and_references(data_path: str) -> tuple[list[list[dict[str, str]]], list[str]]:
    """Conversations up to their last assistant turn, and that turn's text as the reference answer."""
    prompts, references = [], []
    for example in load_examples(data_path):
        if example.messages is None:
            raise DataError(f"{example.source}: completion rows have no reference answer to compare against")
        prompts.append([dict(m) for m in example.messages[:-1]])
        references.append(example.messages[-1]["content"])
    return prompts, references


def evaluate_model(model_or_run: str, prompts, references, max_new_tokens: int, batch_size: int) -> EvalResult:
    model, tokenizer = load_for_inference(model_or_run)
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return EvalResult(model_or_run, replies, exact_match(replies, references))

"""`tuneforge eval`: answers of a model (and optionally a baseline) on held-out rows, scored and shown side by side."""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

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


def side_by_side(prompts, references, results: list[EvalResult], show: int) -> str:
    """A few examples with every model's answer under the reference, then the scores (and base -> tuned)."""
    labels = ["tuned", "base"] if len(results) == 2 else ["model"]
    lines = []
    for i in range(min(show, len(prompts))):
        lines.append(f"--- example {i + 1}: {textwrap.shorten(prompts[i][-1]['content'], 110)}")
        lines.append(f"    {'expected':<9} {references[i]}")
        for label, r in zip(labels, results):
            lines.append(f"    {label:<9} {textwrap.shorten(r.replies[i], 200) or '(empty)'}")
    lines += ["", f"{'metric':<26}" + "".join(f"{label:>12}" for label in labels)]
    for metric in results[0].scores:
        lines.append(f"{metric:<26}" + "".join(f"{r.scores[metric]:>12.3f}" for r in results))
    if len(results) == 2:
        lines.append("")
        for metric in results[0].scores:
            before, after = results[1].scores[metric], results[0].scores[metric]
            lines.append(f"held-out {metric}: {before:.0%} (base) -> {after:.0%} (tuned)")
    return "\n".join(lines)


def write_outputs(out_dir: Path, prompts, references, results: list[EvalResult]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for r in results:
        tag = "model" if r is results[0] else "compare"
        with (out_dir / f"{tag}_outputs.jsonl").open("w", encoding="utf-8") as fh:
            for p, ref, reply in zip(prompts, references, r.replies):
                fh.write(json.dumps({"prompt": p, "reference": ref, "output": reply}) + "\n")
    summary = {r.name: r.scores for r in results}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")

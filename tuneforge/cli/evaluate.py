"""`tuneforge eval`: argument parsing; the work is in tuneforge.eval (suite: what is measured, report: what is shown)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tuneforge.cli.options import add_option, from_args
from tuneforge.errors import UserError
from tuneforge.eval.settings import HUMANEVAL_BUILTIN, EvalPlan, GenerationSettings


def _ints(flag: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated whole numbers like 1,10, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{flag}: expected numbers of at least 1, got {text!r}")
    return values


def _question(prompt: list[dict[str, str]]) -> str:
    """The question shown to a judge: the user's turn, or the whole conversation when there is more than one."""
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def eval_plan(args: argparse.Namespace) -> EvalPlan:
    """The plan the options describe: comma lists split, each value checked against its field's range."""
    from tuneforge.eval.suite import check_metrics

    metrics = check_metrics([m.strip() for m in args.metrics.split(",") if m.strip()])
    return from_args(EvalPlan, args, metrics=metrics if args.data else (),
                     generation=from_args(GenerationSettings, args), humaneval_k=_ints("--k", args.k),
                     humaneval_samples=args.samples, humaneval_limit=args.limit,
                     lm_eval=tuple(t.strip() for t in (args.lm_eval or "").split(",") if t.strip()))


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from tuneforge.eval.report import report_text, write_outputs
    from tuneforge.eval.suite import base_of, evaluate_one, load_eval_set

    started = time.monotonic()
    plan = eval_plan(args)
    metrics = plan.metrics
    if not (args.data or args.pairs or args.general or args.mc or args.humaneval or args.lm_eval):
        raise UserError("nothing to evaluate: give --data (and/or --pairs, --general, --mc, --humaneval, --lm-eval)")
    if args.judge_url and not args.judge_model:
        raise UserError("--judge-url: also give --judge-model (the model name the endpoint serves)")
    if args.judge_url and not (args.data and set(metrics) & {"rouge", "bleu", "exact_match"}):
        raise UserError("--judge-url: the judge reads generated answers: give --data and a generation metric "
                        "(rouge, bleu or exact_match)")
    eval_set = load_eval_set(args.data, metrics) if args.data else None
    if args.pairs:  # a file that holds no pairs fails here, before any model loads
        from tuneforge.eval.preference import load_pairs

        load_pairs(args.pairs)
    torch.manual_seed(plan.generation.seed)  # sampling (--temperature > 0) repeats run to run

    compare = args.compare
    results = [evaluate_one(args.model, "tuned" if compare or args.general else "model", plan, eval_set)]
    if compare:
        results.append(evaluate_one(compare, "base", plan, eval_set))
    elif args.general:  # the forgetting check needs the base: the run's own, from its tuneforge.json
        base = base_of(args.model)
        if base is None:
            raise UserError(f"--general: {args.model} is not a run directory, so its base model is unknown; "
                            f"give it with --compare BASE")
        results.append(evaluate_one(base, "base", EvalPlan(general=args.general, metrics=(),
                                                           general_rows=plan.general_rows,
                                                           generation=plan.generation), None))

    judge_summary, judge_records = {}, []
    if args.judge_url:
        from tuneforge.eval.judge import Judge, grade, pairwise

        judge = Judge(args.judge_url, args.judge_model)
        questions = [_question(p) for p in eval_set.prompts]
        ratings = {}
        for r in results:
            if r.replies:
                r.scores["judge_score"], ratings[r.label] = grade(judge, questions, eval_set.references, r.replies)
        if compare:
            judge_summary, judge_records = pairwise(judge, questions, eval_set.references, results[0].replies,
                                                    results[1].replies)
        judge_records = [{**(judge_records[i] if judge_records else {}),
                          **{f"judge_score_{label}": values[i] for label, values in ratings.items()}}
                         for i in range(len(questions))]

    text = report_text(eval_set, results, judge_summary, args.judge_model, plan.show)
    print(text)
    print(f"\neval took {time.monotonic() - started:.0f} s")
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k != "func"}
        write_outputs(Path(args.out), eval_set, results, judge_summary, judge_records, settings, text)
        print(f"wrote {args.out}/summary.json, table.txt" + (", examples.jsonl" if eval_set and results[0].replies
                                                            else ""))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("eval", help="score a run (or model) on held-out rows, optionally against a baseline",
                       description="Did the fine-tune help, and what did it cost? Scores MODEL (a run directory, "
                                   "alias, hub id or model directory) and, with --compare, a baseline side by side.")
    p.add_argument("model", help="run directory, model alias, hub id or model directory")
    # Defaults, help and ranges: EvalPlan and GenerationSettings (eval/settings.py), the one home of eval's defaults.
    add_option(p, EvalPlan, "data")
    add_option(p, EvalPlan, "metrics")
    add_option(p, EvalPlan, "pairs")
    p.add_argument("--compare", help="a baseline evaluated on the same rows, e.g. smollm2-135m-instruct")
    p.add_argument("--out", help="directory for examples.jsonl, summary.json and table.txt")
    add_option(p, EvalPlan, "show")
    g = p.add_argument_group("generation (greedy unless --temperature > 0)")
    for name in ("max_new_tokens", "temperature", "top_p", "batch_size", "seed"):
        add_option(g, GenerationSettings, name)
    f = p.add_argument_group("forgetting check")
    add_option(f, EvalPlan, "general")
    add_option(f, EvalPlan, "general_rows")
    m = p.add_argument_group("benchmarks")
    add_option(m, EvalPlan, "mc")
    add_option(m, EvalPlan, "mc_style")
    add_option(m, EvalPlan, "humaneval", nargs="?", const=HUMANEVAL_BUILTIN)
    add_option(m, EvalPlan, "humaneval_k", "--k")
    add_option(m, EvalPlan, "humaneval_samples", "--samples")
    add_option(m, EvalPlan, "humaneval_limit", "--limit")
    add_option(m, EvalPlan, "humaneval_max_new_tokens")
    add_option(m, EvalPlan, "lm_eval")
    add_option(m, EvalPlan, "lm_eval_include")
    add_option(m, EvalPlan, "lm_eval_limit")
    j = p.add_argument_group("judge (any OpenAI-compatible endpoint; OPENAI_API_KEY is sent when set)")
    j.add_argument("--judge-url", help="e.g. http://localhost:8000/v1")
    j.add_argument("--judge-model", help="the judge's model name at that endpoint")
    p.set_defaults(func=cmd_eval)

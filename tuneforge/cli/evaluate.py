"""`tuneforge eval`."""

from __future__ import annotations

import argparse
from pathlib import Path

from tuneforge.errors import UserError


def cmd_eval(args: argparse.Namespace) -> int:
    from tuneforge.eval.compare import evaluate_model, prompts_and_references, side_by_side, write_outputs

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m != "exact_match"]
    if unknown:
        raise UserError(f"--metrics: unknown {', '.join(unknown)} (available: exact_match)")
    prompts, references = prompts_and_references(args.data)
    results = [evaluate_model(args.model, prompts, references, args.max_new_tokens, args.batch_size)]
    if args.compare:
        results.append(evaluate_model(args.compare, prompts, references, args.max_new_tokens, args.batch_size))
    print(side_by_side(prompts, references, results, show=args.show))
    if args.out:
        write_outputs(Path(args.out), prompts, references, results)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("eval", help="score a run (or model) on held-out rows, optionally against a baseline")
    p.add_argument("model", help="run directory, model alias, hub id or model directory")
    p.add_argument("--data", required=True, help="held-out rows (instruction or chat format)")
    p.add_argument("--metrics", default="exact_match", help="comma-separated metrics (exact_match)")
    p.add_argument("--compare", help="a baseline to evaluate on the same rows, e.g. smollm2-135m-instruct")
    p.add_argument("--show", type=int, default=5, help="examples to print side by side")
    p.add_argument("--out", help="directory for per-example outputs and summary.json")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_eval)

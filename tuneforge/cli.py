"""Command line: one table of subcommands -> functions. Argument parsing only; the work happens elsewhere."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tuneforge.errors import UserError


def cmd_train(args: argparse.Namespace) -> int:
    from tuneforge.config import describe_schema, load_config
    from tuneforge.train.loop import train

    if args.help_config:
        print(describe_schema())
        return 0
    if args.config is None:
        raise UserError("train: give a run file, e.g. tuneforge train configs/demo.yaml")
    cfg = load_config(args.config, args.overrides)
    result = train(cfg, show_progress=not args.quiet)
    val = f", val_loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(f"done: {result.steps} steps, train_loss {result.train_loss:.4f}{val} -> {result.run_dir}")
    return 0


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


def cmd_generate(args: argparse.Namespace) -> int:
    from tuneforge.deploy.chat import generate_once

    print(generate_once(args.model, args.prompt, args.system, args.max_new_tokens, args.temperature))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from tuneforge.deploy.chat import chat_loop

    chat_loop(args.model, args.system, args.max_new_tokens, args.temperature)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneforge", description="Fine-tune open LLMs on your own data.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a model from a YAML run file")
    p.add_argument("config", nargs="?", help="run file (YAML)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 lora.r=8")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

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

    for name, helptext, func in (("generate", "answer one prompt", cmd_generate),
                                 ("chat", "talk to a run or model in the terminal", cmd_chat)):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("model", help="run directory, model alias, hub id or model directory")
        if name == "generate":
            p.add_argument("--prompt", required=True)
        p.add_argument("--system", help="system message")
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="tuneforge: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "httpx", "huggingface_hub", "peft"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"tuneforge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("tuneforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

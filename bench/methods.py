"""Every fine-tuning method on the demo task: trainable parameters, peak memory, training time, held-out score.

    .venv/bin/python bench/methods.py                      # all seven methods (long: roughly 5-10 min each on 2 cores)
    .venv/bin/python bench/methods.py --methods lora,adapter --max-steps 20 --test-rows 10   # a quick look

For each method it trains the embedded SmolLM2-135M-Instruct with configs/demo.yaml (the `make demo` run: same data,
epochs, batch, schedule and seed; only `method` and the learning rate change), each in its own process through the
real CLI, so its peak RSS (wait4) is its own. Then it generates greedy answers on examples/demo/test.jsonl for the
untuned model and every tuned run (tuneforge.eval.compare.evaluate_model, as `tuneforge eval` does) and prints one
table, also written as JSON and Markdown next to the runs. Timings are only reported, never asserted; run it alone
(two PyTorch processes on 2 cores thrash).

Learning rates: the demo's 5e-4 suits LoRA-style methods; full fine-tuning needs a much smaller step and prompt
learning (a few thousand parameters trained from scratch) a much larger one, as in the PEFT examples.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tuneforge.method_registry import METHOD_NAMES as METHODS  # noqa: E402

LEARNING_RATE = {"full": "5e-5", "adapter": "1e-3", "prefix": "1e-2", "prompt": "3e-2"}  # others: the config's


def train_one(method: str, args, out: Path) -> dict:
    """Train one method in a child process through the CLI; its wall time, peak RSS and parameter report."""
    overrides = [f"method={method}", f"output_dir={out}", f"model={args.model}", f"data.train={args.train}"]
    if method in LEARNING_RATE:
        overrides.append(f"train.lr={LEARNING_RATE[method]}")
    if args.max_steps:
        overrides.append(f"train.max_steps={args.max_steps}")
    command = [sys.executable, "-m", "tuneforge", "train", str(args.config), *overrides, "--quiet"]
    log_path = out.parent / f"{method}.log"
    started = time.perf_counter()
    with log_path.open("w") as log:
        child = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    text = log_path.read_text(encoding="utf-8", errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        last = (text.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"{method}: training failed ({last}); full log: {log_path}")
    report = re.search(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)", text)
    memory = re.search(r"qlora: base model weights ([\d.]+) MB in float32 -> ([\d.]+) MB", text)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_time_s" in r]
    return {
        "method": method,
        "lr": LEARNING_RATE.get(method, "config"),
        "trainable_params": int(report.group(1).replace(",", "")),
        "all_params": int(report.group(2).replace(",", "")),
        "trainable_pct": float(report.group(3)),
        "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux reports KiB
        "train_s": sum(r["step_time_s"] for r in steps),  # the optimizer steps alone
        "process_s": wall,  # everything: start-up, data, model load, steps, validation, saving
        "steps": len(steps),
        "final_train_loss": steps[-1]["loss"] if steps else None,
        "final_val_loss": next((r["val_loss"] for r in reversed(records) if "val_loss" in r), None),
        "base_mb": (float(memory.group(1)), float(memory.group(2))) if memory else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, default: all seven")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base model (a tiny one for a dry run)")
    parser.add_argument("--train", default=str(ROOT / "examples" / "demo" / "train.jsonl"))
    parser.add_argument("--test", default=str(ROOT / "examples" / "demo" / "test.jsonl"))
    parser.add_argument("--test-rows", type=int, default=0, help="score only the first N held-out rows (0 = all)")
    parser.add_argument("--max-steps", type=int, default=0, help="cap the optimizer steps (0 = the config's epochs)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-methods")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)} (allowed: {', '.join(METHODS)})")
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out {args.out}: already exists and is not empty; choose another directory")
    args.out.mkdir(parents=True, exist_ok=True)

    from tuneforge.eval.compare import evaluate_model, prompts_and_references

    prompts, references = prompts_and_references(args.test)
    if args.test_rows:
        prompts, references = prompts[: args.test_rows], references[: args.test_rows]

    def held_out(model_or_run: str) -> float:
        result = evaluate_model(model_or_run, prompts, references, max_new_tokens=args.max_new_tokens, batch_size=10)
        return result.scores["exact_match"]

    untuned = held_out(args.model)
    print(f"untuned {args.model}: held-out exact match {untuned:.0%} on {len(prompts)} rows", flush=True)
    rows = []
    for method in methods:
        row = train_one(method, args, args.out / method)
        row["exact_match"] = held_out(str(args.out / method))
        rows.append(row)
        print(f"{method}: {row['trainable_params']:,} trainable, peak RSS {row['peak_rss_mb']:.0f} MB, "
              f"{row['train_s']:.0f} s training, exact match {untuned:.0%} -> {row['exact_match']:.0%}", flush=True)

    table = [f"Demo task, {args.model}, {len(prompts)} held-out rows, untuned exact match {untuned:.0%} "
             f"({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs)", "",
             "| method | lr | trainable params | trainable % | peak RSS | training (steps) | held-out exact match |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| `{r['method']}` | {r['lr']} | {r['trainable_params']:,} | {r['trainable_pct']:.3f} | "
                     f"{r['peak_rss_mb']:,.0f} MB | {r['train_s']:.0f} s ({r['steps']}) | "
                     f"{untuned:.0%} -> {r['exact_match']:.0%} |")
    text = "\n".join(table)
    print("\n" + text)
    (args.out / "methods.md").write_text(text + "\n", encoding="utf-8")
    (args.out / "methods.json").write_text(json.dumps({"untuned_exact_match": untuned, "rows": rows}, indent=2),
                                           encoding="utf-8")


if __name__ == "__main__":
    main()

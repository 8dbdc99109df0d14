"""Data mixing against forgetting on the embedded model: the demo task trained with and without general data.

    .venv/bin/python bench/mixing.py                     # two demo-sized LoRA runs + evaluations (~15 min on 2 cores)
    .venv/bin/python bench/mixing.py --max-steps 20      # a quick look

Both runs use configs/demo.yaml (LoRA on smollm2-135m-instruct, the `make demo` settings). "mixed" adds the bundled
general instruction set (builtin:general, its first 207 rows) as a second source drawn at `epochs: 0.25` per epoch;
its last 60 rows are held out as the general validation set, next to the demo's validation split. Reported: held-out
exact match on examples/demo/test.jsonl (the task score) and the answer-token loss on the held-out general rows
before (untuned base) and after each run (what the fine-tune cost in general ability). Scores only, never timings.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
GENERAL_HELD_OUT = 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=0)
    parser.add_argument("--test-rows", type=int, default=40)
    args = parser.parse_args()

    from tuneforge.cli import quiet_libraries
    from tuneforge.config import BUILTIN_DATA, load_config
    from tuneforge.data.formats import load_examples
    from tuneforge.data.tokenize import ensure_chat_template, tokenize_all
    from tuneforge.eval.compare import evaluate_model, prompts_and_references
    from tuneforge.model.trained import load_for_inference
    from tuneforge.train.loop import train
    from tuneforge.train.validate import validation_loss

    quiet_libraries()
    scratch = Path(tempfile.mkdtemp(prefix="tf-mix-"))
    general = BUILTIN_DATA["builtin:general"].read_text(encoding="utf-8").splitlines()
    (scratch / "general_train.jsonl").write_text("\n".join(general[:-GENERAL_HELD_OUT]) + "\n", encoding="utf-8")
    (scratch / "general_val.jsonl").write_text("\n".join(general[-GENERAL_HELD_OUT:]) + "\n", encoding="utf-8")
    test_file = scratch / "test.jsonl"
    test_file.write_text("\n".join((ROOT / "examples/demo/test.jsonl").read_text().splitlines()[: args.test_rows]) + "\n")
    prompts, references = prompts_and_references(str(test_file))

    def general_loss(model_or_run: str) -> float:
        model, tokenizer = load_for_inference(model_or_run)
        ensure_chat_template(tokenizer)
        rows = load_examples(str(scratch / "general_val.jsonl"))
        examples, _ = tokenize_all(tokenizer, rows, 256, "truncate", False)
        return validation_loss(model, examples, 8, False, tokenizer.pad_token_id, "cpu")

    runs = {
        "task only": [],
        "task + general (epochs 0.25)": [
            "data.train=[{path: examples/demo/train.jsonl, name: task}, "
            f"{{path: {scratch / 'general_train.jsonl'}, name: general, epochs: 0.25}}]"],
    }
    results = [{"run": "untuned base", "steps": 0, "exact_match": None, "general_loss": None}]
    base = evaluate_model("smollm2-135m-instruct", prompts, references, max_new_tokens=48, batch_size=10)
    results[0].update(exact_match=base.scores["exact_match"], general_loss=general_loss("smollm2-135m-instruct"))
    for label, overrides in runs.items():
        out = scratch / label.split()[0].replace("+", "")
        shutil.rmtree(out, ignore_errors=True)
        extra = [f"train.max_steps={args.max_steps}"] if args.max_steps else []
        result = train(load_config(ROOT / "configs" / "demo.yaml", [f"output_dir={out}", "train.save_every=0",
                                                                    *overrides, *extra]), show_progress=False)
        tuned = evaluate_model(str(out), prompts, references, max_new_tokens=48, batch_size=10)
        results.append({"run": label, "steps": result.steps, "exact_match": tuned.scores["exact_match"],
                        "general_loss": general_loss(str(out))})
        print(results[-1], flush=True)
    base_general = results[0]["general_loss"]
    lines = ["| run | steps | held-out exact match (task) | general held-out loss | change vs base |",
             "|---|---:|---:|---:|---:|"]
    for r in results:
        change = "" if r["steps"] == 0 else f"{100 * (r['general_loss'] / base_general - 1):+.1f}%"
        lines.append(f"| {r['run']} | {r['steps']} | {100 * r['exact_match']:.0f}% | {r['general_loss']:.4f} | "
                     f"{change} |")
    header = (f"Demo task with and without general data, smollm2-135m-instruct LoRA (configs/demo.yaml); measured "
              f"{time.strftime('%Y-%m-%d')} on a 2-core CPU, fp32, by bench/mixing.py ({len(prompts)} task rows, "
              f"{GENERAL_HELD_OUT} general rows held out)\n\n")
    text = header + "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mixing.md").write_text(text + "\n", encoding="utf-8")
    (RESULTS / "mixing.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

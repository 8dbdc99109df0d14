"""DPO speed, side by side: TRL's DPOTrainer with its best CPU settings and tuneforge DPO, same pairs, same model.

    .venv/bin/python bench/preference_speed.py                  # both peers, then the table (about 12 min on 2 cores)
    .venv/bin/python bench/preference_speed.py --train-pairs 8  # a quick look

One command: it generates preference pairs from bench/train_speed.py's synthetic instruction rows (long-tailed
prompts; the chosen answer is the row's correct output, the rejected one the output of another row with the same
instruction: plausible, same style, wrong), then trains the embedded SmolLM2-135M-Instruct with DPO (sigmoid, beta
0.1) and the same LoRA (r=16, alpha=32, dropout 0, all 7 projections), the same pairs in one epoch, batch 8,
learning rate 5e-5 with cosine decay (no warmup), clipping 1.0, fp32, seed 42:

  (a) trl        TRL 1.16 DPOTrainer; reference log-probabilities precomputed once (precompute_ref_log_probs: no
                 reference forward per step), bf16 and gradient checkpointing off (its defaults turn both on, many
                 times slower on a CPU without native bf16). Its padding_free is "temporarily unavailable" in 1.16 (it
                 warns and pads), so each batch is [prompt + chosen; prompt + rejected] padded to its longest row.
  (b) tuneforge  objective=dpo: packed rows with each prompt computed once for both answers, the reference pass
                 stored once, log-probabilities from the chunked head

Each peer trains in its own process (its peak RSS is its own). The training loop's time counts the reference pass
for both (TRL runs it inside train(); tuneforge logs it as reference_pass_s). Validation DPO loss and reward accuracy
are measured afterwards for both by one evaluator: tuneforge's DPO loss of each saved adapter on the same held-out
pairs, with the base (adapter off) as the reference. Timings are only reported, never asserted; run it alone.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.train_speed import (MODEL, TARGETS, checked_peers, hf_model_and_tokenizer, make_row,  # noqa: E402
                               run_peers, write_report)

LR, BATCH, EPOCHS, BETA, SEED, MAX_LEN = 5e-5, 8, 1, 0.1, 42, 512
PEERS = {"a": "(a) TRL DPOTrainer, precomputed reference", "b": "(b) tuneforge objective=dpo"}


def make_pairs(directory: Path, train_pairs: int, val_pairs: int) -> tuple[Path, Path]:
    """Pairs whose answers share the instruction: chosen = this passage's answer, rejected = another passage's."""
    from tuneforge.data.formats import normalise_row
    from tuneforge.data.tokenize import tokenize_example
    from tuneforge.model.load import load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    rng, by_task, pairs = random.Random(SEED), {}, []
    while len(pairs) < train_pairs + val_pairs:
        row = make_row(rng)
        if len(tokenize_example(tokenizer, normalise_row(row, "instruction", "bench")).input_ids) > MAX_LEN - 160:
            continue
        other = by_task.get(row["instruction"])
        by_task[row["instruction"]] = row
        if other is not None and other["output"] != row["output"]:
            pairs.append({"prompt": f"{row['instruction']}\n\n{row['input']}", "chosen": row["output"],
                          "rejected": other["output"]})
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "train.jsonl", directory / "val.jsonl"
    for path, part in zip(paths, (pairs[:train_pairs], pairs[train_pairs:])):
        path.write_text("".join(json.dumps(p) + "\n" for p in part), encoding="utf-8")
    return paths


def conversational(pair: dict) -> dict:
    return {"prompt": [{"role": "user", "content": pair["prompt"]}],
            "chosen": [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": [{"role": "assistant", "content": pair["rejected"]}]}


def run_trl(train_file: Path, run_dir: Path) -> float:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = hf_model_and_tokenizer(dropout=0.0)
    rows = [conversational(json.loads(line)) for line in train_file.read_text().splitlines()]
    args = DPOConfig(output_dir=str(run_dir / "trl"), per_device_train_batch_size=BATCH, learning_rate=LR,
                     num_train_epochs=EPOCHS, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
                     max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                     fp16=False, gradient_checkpointing=False, seed=SEED, data_seed=SEED, dataloader_num_workers=0,
                     disable_tqdm=True, beta=BETA, loss_type=["sigmoid"], max_length=MAX_LEN,
                     precompute_ref_log_probs=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    result = trainer.train()
    model.save_pretrained(run_dir / "adapter")
    return float(result.metrics["train_runtime"])


def run_tuneforge(train_file: Path, run_dir: Path) -> float:
    from tuneforge.cli import quiet_libraries
    from tuneforge.config import load_config
    from tuneforge.train.loop import train

    quiet_libraries()
    cfg = load_config(None, [f"model={MODEL}", "method=lora", "objective=dpo", f"dpo.beta={BETA}", "lora.r=16",
                             "lora.alpha=32", "lora.dropout=0", f"lora.target_modules=[{','.join(TARGETS)}]",
                             f"data.train={train_file}", "data.val_split=0", f"data.max_length={MAX_LEN}",
                             f"output_dir={run_dir / 'adapter'}", f"train.epochs={EPOCHS}",
                             f"train.batch_size={BATCH}", f"train.lr={LR}", "train.warmup_ratio=0",
                             "train.scheduler=cosine", f"train.seed={SEED}", "train.save_every=0",
                             "train.dtype=float32"])
    train(cfg, show_progress=False)
    records = [json.loads(line) for line in (run_dir / "adapter" / "metrics.jsonl").read_text().splitlines()]
    reference_s = next(r.get("reference_pass_s", 0.0) for r in records if r.get("event") == "start")
    return reference_s + sum(r["step_time_s"] for r in records if "step_time_s" in r)


def worker(peer: str, train_file: Path, run_dir: Path) -> None:
    loop_s = run_trl(train_file, run_dir) if peer == "a" else run_tuneforge(train_file, run_dir)
    (run_dir / "timing.json").write_text(json.dumps({"loop_s": loop_s}))  # run_peer times the whole process


def evaluate(val_file: Path, run_dirs: dict[str, Path]) -> dict:
    """DPO loss and reward accuracy of each adapter on the held-out pairs (reference: the base, adapter off)."""
    from peft import PeftModel

    from tuneforge.data.batching import collate_pairs
    from tuneforge.data.formats import load_examples
    from tuneforge.data.preference_tokens import tokenize_pairs
    from tuneforge.model.attention import use_packed_attention
    from tuneforge.model.load import load_model, load_tokenizer
    from tuneforge.train import distributed
    from tuneforge.train.preference import Objective, PreferenceLossSum, compute_reference, stats_record
    from tuneforge.train.validate import validation_pairs

    pairs, _ = tokenize_pairs(load_tokenizer(MODEL), load_examples(str(val_file)), MAX_LEN, "truncate")
    out = {"tokens": {"prompt": sum(len(p.prompt_ids) for p in pairs)}}
    objective = Objective("dpo", BETA)
    for peer, run_dir in run_dirs.items():
        model = PeftModel.from_pretrained(load_model(MODEL), run_dir / "adapter", is_trainable=False)
        use_packed_attention(model)
        for pair, value in zip(pairs, compute_reference(model, pairs, 8, "cpu", distributed.World("none"))):
            pair.reference = tuple(value)
        loss, sums = validation_pairs(PreferenceLossSum(model, objective), pairs, 8, collate_pairs, "cpu")
        out[peer] = {"val_loss": loss, **stats_record(sums, "val_")}
    return out


def table(results: dict, ev: dict, pairs: int, tokens: dict) -> str:
    b = results.get("b")
    lines = [f"{pairs} training pairs x {EPOCHS} epoch: {tokens['prompt']:,} prompt and {tokens['answers']:,} answer "
             f"tokens (TRL computes {tokens['padded']:,} padded token positions, tuneforge {tokens['packed']:,})", "",
             "| peer | training loop | whole process | peak RSS | val DPO loss | val reward accuracy | tuneforge "
             "speed-up (loop) | tuneforge speed-up (process) | tuneforge RSS ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for peer, r in results.items():
        speed = f"{r['loop_s'] / b['loop_s']:.2f}x" if b else "-"
        process = f"{r['process_s'] / b['process_s']:.2f}x" if b else "-"
        rss = f"{b['peak_rss_gib'] / r['peak_rss_gib']:.2f}" if b else "-"
        lines.append(f"| {PEERS[peer]} | {r['loop_s']:.0f} s | {r['process_s']:.0f} s | {r['peak_rss_gib']:.2f} GiB |"
                     f" {ev[peer]['val_loss']:.4f} | {ev[peer]['val_reward_accuracy']:.3f} | {speed} | {process} |"
                     f" {rss} |")
    return "\n".join(lines)


def token_counts(train_file: Path) -> dict:
    """What each peer's layout computes: TRL's padded [2 x batch, longest] rows, tuneforge's packed rows."""
    from tuneforge.data.formats import load_examples
    from tuneforge.data.preference_tokens import tokenize_pairs
    from tuneforge.model.load import load_tokenizer

    pairs, _ = tokenize_pairs(load_tokenizer(MODEL), load_examples(str(train_file)), MAX_LEN, "truncate")
    padded = 0
    for start in range(0, len(pairs), BATCH):  # TRL's sequential order is not ours, but a batch's cost is similar
        batch = pairs[start : start + BATCH]
        padded += 2 * len(batch) * max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))
                                       for p in batch)
    return {"prompt": sum(len(p.prompt_ids) for p in pairs),
            "answers": sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs),
            "padded": padded, "packed": sum(p.packed_length for p in pairs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-pairs", type=int, default=48)
    parser.add_argument("--val-pairs", type=int, default=16)
    parser.add_argument("--peers", default="a,b")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--train", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.train, args.run)
    peers = checked_peers(args.peers, PEERS)
    with tempfile.TemporaryDirectory(prefix="tuneforge-bench-") as tmp:
        tmp = Path(tmp)
        train_file, val_file = make_pairs(tmp / "data", args.train_pairs, args.val_pairs)
        results = run_peers(peers, PEERS, train_file, tmp, __file__)
        print("evaluating every adapter on the held-out pairs ...", flush=True)
        ev = evaluate(val_file, {p: tmp / p for p in peers})
        tokens = token_counts(train_file)
    write_report(args.out, "preference_speed", table(results, ev, args.train_pairs, tokens),
                 {"results": results, "eval": ev, "tokens": tokens})


if __name__ == "__main__":
    main()

"""Training speed, side by side: the guide's recipe, HF Trainer done well, TRL SFTTrainer and tuneforge.

    .venv/bin/python bench/train_speed.py                 # every peer, then the table (about 15 min on 2 cores)
    .venv/bin/python bench/train_speed.py --train-rows 16 --peers d,c   # a quick look

One command: it generates a synthetic instruction set with realistic, varied prompt and answer lengths (every row
under 512 tokens, so no peer truncates), then trains the embedded SmolLM2-135M-Instruct with the same LoRA (r=16,
alpha=32, dropout 0.05, all 7 projections), the same examples in the same epochs, effective batch 8, learning rate
2e-4 with cosine decay (no warmup), clipping 1.0, fp32, seed 42:

  (a) guide    HF Trainer + PEFT, text padded to max_length=512, loss on every non-pad token (the blog recipe)
  (b) hf-well  HF Trainer + PEFT, dynamic padding per batch, loss on the answer only
  (c) trl      TRL SFTTrainer, padding-free, completion-only loss, bf16 and gradient checkpointing off (its
               defaults turn both on, which is many times slower on a CPU without native bf16)
  (d) tuneforge                 packed padding-free rows, per-example attention, head + loss on answer tokens only
  (d) tuneforge +compile        the same with train.compile=true
  (d) tuneforge +grad ckpt      the same with train.gradient_checkpointing=true

Each peer trains in its own process (its peak RSS is its own, measured with wait4). Validation loss is measured
afterwards for every peer by one evaluator: the answer-token mean cross-entropy of the saved adapter on the same
held-out rows. Model FLOP utilisation of tuneforge is taken against an fp32 matmul peak measured in the same run.
Timings are only reported, never asserted; run it alone (two PyTorch processes on 2 cores thrash).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = "smollm2-135m-instruct"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# No warmup: HF starts warmup at lr 0 and tuneforge one step in, which would hand one peer an extra step.
LR, BATCH, EPOCHS, WARMUP, SEED, MAX_LEN = 2e-4, 8, 1, 0.0, 42, 512
PEERS = {
    "a": "(a) HF Trainer+PEFT, pad to 512",
    "b": "(b) HF Trainer+PEFT, dynamic pad, answer loss",
    "c": "(c) TRL SFTTrainer, padding-free",
    "d": "(d) tuneforge",
    "d-compile": "(d) tuneforge +compile",
    "d-ckpt": "(d) tuneforge +grad ckpt",
}

# ---------------------------------------------------------------------------------------------------------------
# Data: varied lengths, a learnable task per row


NOUNS = ("river harbour engine lantern orchard meadow signal archive compass ledger canvas furnace garden bridge "
         "market violin tunnel beacon glacier quarry chapel mirror saddle anchor kettle pillar thicket turbine "
         "village workshop").split()
VERBS = "carried followed measured painted repaired noticed guarded counted opened crossed sold mapped".split()
ADJS = "quiet northern broken golden narrow ancient bright hollow patient careful distant rapid".split()
NAMES = "Ada Bruno Chiara Dmitri Elif Farah Goran Hana Ivo Jonas Kaito Lena Mateo Nadia Oskar Priya".split()


def sentence(rng: random.Random) -> str:
    name, verb, adj, noun = rng.choice(NAMES), rng.choice(VERBS), rng.choice(ADJS), rng.choice(NOUNS)
    tail = " ".join(rng.choice(ADJS + NOUNS) for _ in range(rng.randint(2, 9)))
    return f"{name} {verb} the {adj} {noun} near the {tail}."


def make_row(rng: random.Random) -> dict:
    # Log-normal sentence counts give the long-tailed prompt lengths of real instruction data (median ~90 tokens).
    sentences = [sentence(rng) for _ in range(max(1, min(24, int(rng.lognormvariate(1.4, 0.7)))))]
    passage = " ".join(sentences)
    task = rng.randrange(4)
    if task == 3:  # long answers, as long as the passage: real data has many of these (rewrites, explanations)
        instruction = "Rewrite the passage in the past perfect, replacing every person's name by its initial."
        output = " ".join(s.split()[0][0] + ". had " + " ".join(s.split()[1:]) for s in sentences)
    elif task == 0:
        instruction = "List, in order and separated by commas, the people named in the passage."
        output = ", ".join(s.split()[0] for s in sentences)
    elif task == 1:
        instruction = "For each sentence of the passage, give its verb and object as 'verb: object', one per line."
        output = "\n".join(f"{s.split()[1]}: {s.split()[3]} {s.split()[4]}" for s in sentences)
    else:
        instruction = "Repeat the last sentence of the passage with its words in reverse order."
        output = " ".join(reversed(sentences[-1].rstrip(".").split())) + "."
    return {"instruction": instruction, "input": passage, "output": output}


def make_data(directory: Path, train_rows: int, val_rows: int) -> tuple[Path, Path]:
    from tuneforge.data.formats import normalise_row
    from tuneforge.data.tokenize import tokenize_example
    from tuneforge.model.load import load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    rng, rows = random.Random(SEED), []
    while len(rows) < train_rows + val_rows:
        row = make_row(rng)
        if len(tokenize_example(tokenizer, normalise_row(row, "instruction", "bench")).input_ids) <= MAX_LEN:
            rows.append(row)
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "train.jsonl", directory / "val.jsonl"
    for path, part in zip(paths, (rows[:train_rows], rows[train_rows:])):
        path.write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    return paths


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def messages(row: dict) -> list[dict]:
    return [{"role": "user", "content": f"{row['instruction']}\n\n{row['input']}"},
            {"role": "assistant", "content": row["output"]}]


# ---------------------------------------------------------------------------------------------------------------
# Peers (each runs in a worker process)


def hf_model_and_tokenizer(dropout: float = 0.05):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.model.load import load_tokenizer, resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL), dtype=torch.float32, attn_implementation="sdpa")
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, lora), load_tokenizer(MODEL)


def hf_args(cls, run_dir: Path, **extra):
    return cls(output_dir=str(run_dir / "hf"), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
               learning_rate=LR, num_train_epochs=EPOCHS, lr_scheduler_type="cosine", warmup_steps=WARMUP,
               weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
               bf16=False, fp16=False, seed=SEED, data_seed=SEED, dataloader_num_workers=0, disable_tqdm=True,
               **extra)


def run_hf(peer: str, train_file: Path, run_dir: Path) -> float:
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model, tokenizer = hf_model_and_tokenizer()
    rows = read_rows(train_file)
    if peer == "a":  # the blog recipe: whole rendered chat, padded to 512, labels = every non-pad token
        texts = [tokenizer.apply_chat_template(messages(r), tokenize=False) for r in rows]
        data = Dataset.from_dict({"text": texts}).map(
            lambda b: tokenizer(b["text"], padding="max_length", max_length=MAX_LEN, truncation=True),
            batched=True, remove_columns=["text"])
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    else:  # done well: per-batch padding, loss on the answer only
        def encode(row):
            prompt = tokenizer.apply_chat_template(messages(row)[:1], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(messages(row), tokenize=False)
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            ids = tokenizer(full, add_special_tokens=False)["input_ids"]
            return {"input_ids": ids, "attention_mask": [1] * len(ids),
                    "labels": [-100] * len(p_ids) + ids[len(p_ids):]}

        data = Dataset.from_list([encode(r) for r in rows])
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=hf_args(TrainingArguments, run_dir), train_dataset=data,
                      data_collator=collator)
    result = trainer.train()
    model.save_pretrained(run_dir / "adapter")
    return float(result.metrics["train_runtime"])


def run_trl(train_file: Path, run_dir: Path) -> float:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = hf_model_and_tokenizer()
    rows = read_rows(train_file)
    data = Dataset.from_list([{"prompt": messages(r)[:1], "completion": messages(r)[1:]} for r in rows])
    args = hf_args(SFTConfig, run_dir, padding_free=True, max_length=None, completion_only_loss=True, packing=False,
                   gradient_checkpointing=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    result = trainer.train()
    model.save_pretrained(run_dir / "adapter")
    return float(result.metrics["train_runtime"])


def run_tuneforge(peer: str, train_file: Path, run_dir: Path) -> float:
    from tuneforge.cli import quiet_libraries
    from tuneforge.config import load_config
    from tuneforge.train.loop import train

    quiet_libraries()
    extra = {"d": [], "d-compile": ["train.compile=true"], "d-ckpt": ["train.gradient_checkpointing=true"]}[peer]
    cfg = load_config(None, [f"model={MODEL}", "method=lora", "lora.r=16", "lora.alpha=32", "lora.dropout=0.05",
                             f"lora.target_modules=[{','.join(TARGETS)}]", f"data.train={train_file}",
                             "data.val_split=0", f"data.max_length={MAX_LEN}", f"output_dir={run_dir / 'adapter'}",
                             f"train.epochs={EPOCHS}", f"train.batch_size={BATCH}", f"train.lr={LR}",
                             f"train.warmup_ratio={WARMUP}", "train.scheduler=cosine", f"train.seed={SEED}",
                             "train.save_every=0", "train.dtype=float32", *extra])
    train(cfg, show_progress=False)
    records = [json.loads(line) for line in (run_dir / "adapter" / "metrics.jsonl").read_text().splitlines()]
    # The same span HF's train_runtime covers: the optimizer steps (batching, forward, backward, update).
    return sum(r["step_time_s"] for r in records if "step_time_s" in r)


def worker(peer: str, train_file: Path, run_dir: Path) -> None:
    started = time.perf_counter()
    if peer in ("a", "b"):
        loop_s = run_hf(peer, train_file, run_dir)
    elif peer == "c":
        loop_s = run_trl(train_file, run_dir)
    else:
        loop_s = run_tuneforge(peer, train_file, run_dir)
    (run_dir / "timing.json").write_text(json.dumps({"loop_s": loop_s,
                                                     "process_s": time.perf_counter() - started}))


# ---------------------------------------------------------------------------------------------------------------
# Common evaluation, FLOPs and the matmul peak


def evaluate(train_file: Path, val_file: Path, run_dirs: dict[str, Path]) -> dict:
    import torch
    from peft import PeftModel

    from tuneforge.data.formats import normalise_row
    from tuneforge.data.tokenize import tokenize_example
    from tuneforge.model.load import load_model, load_tokenizer
    from tuneforge.train.validate import validation_loss

    tokenizer = load_tokenizer(MODEL)
    encode = lambda path: [tokenize_example(tokenizer, normalise_row(r, "instruction", "bench")) for r in read_rows(path)]  # noqa: E731
    train_ex, val_ex = encode(train_file), encode(val_file)
    out = {"val_loss": {}, "answer_tokens": sum(e.num_targets for e in train_ex) * EPOCHS,
           "all_tokens": sum(len(e.input_ids) for e in train_ex) * EPOCHS}
    base = load_model(MODEL)
    out["flops"] = training_flops(base.config, [len(e.input_ids) for e in train_ex], out["answer_tokens"])
    out["val_loss"]["untuned"] = validation_loss(base, val_ex, 8, False, tokenizer.pad_token_id, "cpu")
    for peer, run_dir in run_dirs.items():
        model = PeftModel.from_pretrained(load_model(MODEL), run_dir / "adapter").eval()
        out["val_loss"][peer] = validation_loss(model, val_ex, 8, False, tokenizer.pad_token_id, "cpu")
    out["matmul_peak_gflops"] = matmul_peak(torch)
    return out


def training_flops(config, lengths: list[int], answer_tokens: int) -> float:
    """Model FLOPs of LoRA training: forward plus the backward's activation gradients (the frozen base needs no weight
    gradients; the LoRA matrices' own are under 1% and left out), i.e. 2x the forward:
      body 2 x 2 x N_body per token, attention 2 x 4 x L^2 x d / 2 (causal) per layer per example,
      head 2 x 2 x d x V per answer token (tuneforge computes the head only there; peers that compute more
      spend FLOPs this count does not credit)."""
    d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    inter, kv = config.intermediate_size, config.num_key_value_heads * (d // config.num_attention_heads)
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * inter  # q, o; k, v; gate, up, down
    body = layers * per_layer
    tokens = sum(lengths) * EPOCHS
    attention = sum(2 * 4 * n * n * d / 2 * layers for n in lengths) * EPOCHS
    return 2 * (2 * body * tokens) + attention + 2 * (2 * d * vocab * answer_tokens)


def matmul_peak(torch) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best / 1e9


# ---------------------------------------------------------------------------------------------------------------
# Orchestration and the table


def run_peer(peer: str, train_file: Path, run_dir: Path, script: str = __file__) -> dict:
    """`script --worker PEER` in its own process: its timing.json plus its peak RSS (wait4)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = (run_dir / "log.txt").open("w")
    proc = subprocess.Popen([sys.executable, script, "--worker", peer, "--train", str(train_file),
                             "--run", str(run_dir)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode != 0:
        tail = (run_dir / "log.txt").read_text()[-3000:]
        raise SystemExit(f"peer {peer} failed (exit {proc.returncode}); end of its log:\n{tail}")
    timing = json.loads((run_dir / "timing.json").read_text())
    return {**timing, "peak_rss_gib": usage.ru_maxrss / 2**20}  # ru_maxrss is in KiB on Linux


def table(results: dict, ev: dict, rows: int) -> str:
    d = results.get("d")
    lines = [f"{rows} training rows x {EPOCHS} epoch, {ev['answer_tokens']:,} answer tokens of {ev['all_tokens']:,}; "
             f"untuned val loss {ev['val_loss']['untuned']:.4f}",
             "",
             "| peer | training loop | whole process | answer tok/s | peak RSS | val loss | tuneforge speed-up "
             "(loop) | tuneforge RSS ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for peer, r in results.items():
        speed = f"{r['loop_s'] / d['loop_s']:.2f}x" if d else "-"
        rss = f"{d['peak_rss_gib'] / r['peak_rss_gib']:.2f}" if d else "-"
        lines.append(f"| {PEERS[peer]} | {r['loop_s']:.0f} s | {r['process_s']:.0f} s | "
                     f"{ev['answer_tokens'] / r['loop_s']:.1f} | {r['peak_rss_gib']:.2f} GiB | "
                     f"{ev['val_loss'][peer]:.4f} | {speed} | {rss} |")
    if d:
        achieved = ev["flops"] / d["loop_s"] / 1e9
        lines += ["", f"tuneforge model FLOP utilisation: {achieved:.1f} GFLOP/s of a measured fp32 matmul peak of "
                      f"{ev['matmul_peak_gflops']:.1f} GFLOP/s = {100 * achieved / ev['matmul_peak_gflops']:.0f}%"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-rows", type=int, default=64)
    parser.add_argument("--val-rows", type=int, default=24)
    parser.add_argument("--peers", default="a,b,c,d,d-compile,d-ckpt")
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
        train_file, val_file = make_data(tmp / "data", args.train_rows, args.val_rows)
        results = run_peers(peers, PEERS, train_file, tmp, __file__)
        print("evaluating every adapter on the held-out rows ...", flush=True)
        ev = evaluate(train_file, val_file, {p: tmp / p for p in peers})
    write_report(args.out, "train_speed", table(results, ev, args.train_rows), {"results": results, "eval": ev})


def checked_peers(text: str, known: dict[str, str]) -> list[str]:
    peers = text.split(",")
    unknown = [p for p in peers if p not in known]
    if unknown:
        raise SystemExit(f"--peers: unknown {', '.join(unknown)} (allowed: {', '.join(known)})")
    return peers


def run_peers(peers: list[str], labels: dict[str, str], train_file: Path, tmp: Path, script: str) -> dict:
    """Each peer in turn, alone, in its own process (`script --worker`)."""
    results = {}
    for peer in peers:
        print(f"training {labels[peer]} ...", flush=True)
        results[peer] = run_peer(peer, train_file, tmp / peer, script=script)
        print(f"  loop {results[peer]['loop_s']:.1f} s, peak RSS {results[peer]['peak_rss_gib']:.2f} GiB", flush=True)
    return results


def write_report(out: Path, name: str, report: str, raw: dict) -> None:
    """The table with date and machine on stdout and in out/NAME.md; the raw figures in out/NAME.json."""
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    header = f"{name} {date.today().isoformat()} on {machine}, torch fp32"
    print(f"\n{header}\n{report}")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(f"{header}\n\n{report}\n", encoding="utf-8")
    (out / f"{name}.json").write_text(json.dumps({"date": date.today().isoformat(), "machine": machine, **raw},
                                                 indent=2))


if __name__ == "__main__":
    main()

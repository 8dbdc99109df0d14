"""Training speed, side by side on two data shapes: the guide's recipe, HF Trainer done well, TRL SFTTrainer and
tuneforge with each of its speed options.

    .venv/bin/python bench/train_speed.py                 # both data sets, every peer, then both tables (~1 h)
    .venv/bin/python bench/train_speed.py --sets short --peers b,d   # a quick look

One command. It generates two synthetic instruction sets, each row a learnable task:
  long   64 rows, prompts 70-500 tokens (long-tailed), answers 5-150: padding dominates the padded peers' cost;
         batch 8, 1 epoch
  short  256 rows of 60-160 tokens (mean ~97), about two thirds prompt, like Alpaca-style data: little padding to
         waste; batch 4 x accumulation 4, 1 epoch
and trains the embedded SmolLM2-135M-Instruct on each with the same LoRA (r=16, alpha=32, dropout 0.05, all 7
projections), the same examples in the same epochs, learning rate 2e-4 with cosine decay (no warmup), clipping 1.0,
fp32, seed 42:

  (a) guide      HF Trainer + PEFT, text padded to max_length (512 long, 256 short), loss on every non-pad token
  (b) hf-well    HF Trainer + PEFT, dynamic padding per batch, loss on the answer only
  (c) trl        TRL SFTTrainer, padding-free, completion-only loss, bf16 and gradient checkpointing off (its
                 defaults turn both on, which is many times slower on a CPU without native bf16)
  (d) tuneforge  the defaults: packed padding-free rows, per-example attention, head + loss on answer tokens only,
                 a step's micro-batches laid out in rows sized by memory, fused LoRA projections
  (d) options    each default turned off, or an option turned on, one at a time (see PEERS)

Each peer trains in its own process; its peak RSS is its own (wait4), its whole-process time runs from the
interpreter's start to its exit (imports, model load and saving included). Validation loss is measured afterwards for
every peer by one evaluator: the answer-token mean cross-entropy of the saved adapter on the same held-out rows.
Model FLOP utilisation is taken for every peer against an fp32 matmul peak measured in the same run, on the model
FLOPs of the data (forward plus activation gradients, the head on answer tokens only), so a peer that computes more
(padding, the head everywhere) gets no credit for it. Timings are only reported, never asserted; run it alone (two
PyTorch processes on 2 cores thrash).
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
from dataclasses import dataclass
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = "smollm2-135m-instruct"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# No warmup: HF starts warmup at lr 0 and tuneforge one step in, which would hand one peer an extra step.
LR, EPOCHS, WARMUP, SEED = 2e-4, 1, 0.0, 42
BATCH, MAX_LEN = 8, 512  # the long set's (bench/preference_speed.py uses them too)
TUNEFORGE_OPTIONS = {  # peer -> the overrides it adds to tuneforge's defaults
    "d": [],
    "d-glibc": [],
    "d-planned": ["train.micro_batch_tokens=0"],
    "d-unfused": ["train.fuse_lora=false"],
    "d-nodropout": ["lora.dropout=0"],
    "d-compile": ["train.compile=true"],
    "d-ckpt": ["train.gradient_checkpointing=true"],
}
PEERS = {
    "a": "(a) HF Trainer+PEFT, padded to max_length",
    "b": "(b) HF Trainer+PEFT, dynamic pad, answer loss",
    "c": "(c) TRL SFTTrainer, padding-free",
    "d": "(d) tuneforge (defaults)",
    "d-planned": "(d) tuneforge, micro_batch_tokens=0 (batch_size rows)",
    "d-unfused": "(d) tuneforge, fuse_lora=false (PEFT's forward)",
    "d-nodropout": "(d) tuneforge, lora.dropout=0",
    "d-compile": "(d) tuneforge, compile=true",
    "d-ckpt": "(d) tuneforge, gradient_checkpointing=true",
    "d-glibc": "(d) tuneforge, glibc malloc (TUNEFORGE_ALLOCATOR=system)",
}


@dataclass(frozen=True)
class DataSet:
    name: str
    train_rows: int
    val_rows: int
    batch: int
    accum: int
    max_len: int  # the guide's padding length; no row is longer, so no peer truncates
    min_len: int = 1


SETS = {"long": DataSet("long", 64, 24, 8, 1, 512), "short": DataSet("short", 256, 32, 4, 4, 256, min_len=60)}


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


def make_short_row(rng: random.Random) -> dict:
    """A short instruction row (60-160 tokens with the chat template, about two thirds of it prompt)."""
    task = rng.randrange(4)
    words = [rng.choice(NOUNS) for _ in range(rng.randint(6, 22))]
    if task == 0:
        return {"instruction": "Sort these words alphabetically and join them with commas.",
                "input": " ".join(words), "output": ", ".join(sorted(words))}
    if task == 1:
        owners = [f"{rng.choice(NAMES)} owns a {rng.choice(ADJS)} {rng.choice(NOUNS)}" for _ in range(rng.randint(2, 8))]
        return {"instruction": "Who owns what? Answer as 'name: thing', one per line.",
                "input": ". ".join(owners) + ".", "output": "\n".join(f"{o.split()[0]}: {o.split()[-1]}" for o in owners)}
    if task == 2:
        return {"instruction": "Write the words in upper case, in reverse order.", "input": " ".join(words),
                "output": " ".join(w.upper() for w in reversed(words))}
    pairs = [(rng.choice(ADJS), rng.choice(NOUNS)) for _ in range(rng.randint(2, 10))]
    return {"instruction": "Give the plural of each noun, keeping its adjective.",
            "input": "; ".join(f"{a} {n}" for a, n in pairs), "output": "; ".join(f"{a} {n}s" for a, n in pairs)}


def make_data(directory: Path, train_rows: int, val_rows: int, data: DataSet = SETS["long"]) -> tuple[Path, Path]:
    from tuneforge.data.formats import normalise_row
    from tuneforge.data.tokenize import tokenize_example
    from tuneforge.model.load import load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    make = make_short_row if data.name == "short" else make_row
    rng, rows = random.Random(SEED), []
    while len(rows) < train_rows + val_rows:
        row = make(rng)
        length = len(tokenize_example(tokenizer, normalise_row(row, "instruction", "bench")).input_ids)
        if data.min_len <= length <= data.max_len:
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


def hf_args(cls, run_dir: Path, data: DataSet = SETS["long"], **extra):
    return cls(output_dir=str(run_dir / "hf"), per_device_train_batch_size=data.batch,
               gradient_accumulation_steps=data.accum, learning_rate=LR, num_train_epochs=EPOCHS,
               lr_scheduler_type="cosine", warmup_steps=WARMUP, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
               save_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False, seed=SEED, data_seed=SEED,
               dataloader_num_workers=0, disable_tqdm=True, **extra)


def run_hf(peer: str, train_file: Path, run_dir: Path, data: DataSet) -> float:
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model, tokenizer = hf_model_and_tokenizer()
    rows = read_rows(train_file)
    if peer == "a":  # the blog recipe: whole rendered chat, padded to max_length, labels = every non-pad token
        texts = [tokenizer.apply_chat_template(messages(r), tokenize=False) for r in rows]
        dataset = Dataset.from_dict({"text": texts}).map(
            lambda b: tokenizer(b["text"], padding="max_length", max_length=data.max_len, truncation=True),
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

        dataset = Dataset.from_list([encode(r) for r in rows])
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=hf_args(TrainingArguments, run_dir, data), train_dataset=dataset,
                      data_collator=collator)
    result = trainer.train()
    model.save_pretrained(run_dir / "adapter")
    return float(result.metrics["train_runtime"])


def run_trl(train_file: Path, run_dir: Path, data: DataSet) -> float:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = hf_model_and_tokenizer()
    rows = read_rows(train_file)
    dataset = Dataset.from_list([{"prompt": messages(r)[:1], "completion": messages(r)[1:]} for r in rows])
    args = hf_args(SFTConfig, run_dir, data, padding_free=True, max_length=None, completion_only_loss=True,
                   packing=False, gradient_checkpointing=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    result = trainer.train()
    model.save_pretrained(run_dir / "adapter")
    return float(result.metrics["train_runtime"])


def tuneforge_command(peer: str, train_file: Path, run_dir: Path, data: DataSet) -> list[str]:
    """`tuneforge train RUN.yaml` as a user runs it (the CLI chooses its allocator), with the peer's options."""
    import yaml

    config = {"model": MODEL, "method": "lora", "output_dir": str(run_dir / "adapter"),
              "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": TARGETS},
              "data": {"train": str(train_file), "val_split": 0, "max_length": data.max_len},
              "train": {"epochs": EPOCHS, "batch_size": data.batch, "grad_accum": data.accum, "lr": LR,
                        "warmup_ratio": WARMUP, "scheduler": "cosine", "seed": SEED, "save_every": 0,
                        "dtype": "float32"}}
    (run_dir / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return [sys.executable, "-m", "tuneforge", "train", str(run_dir / "run.yaml"), *TUNEFORGE_OPTIONS.get(peer, []),
            "--quiet"]


def tuneforge_loop_seconds(run_dir: Path) -> float:
    """The same span HF's train_runtime covers: the optimizer steps (batching, forward, backward, update)."""
    records = [json.loads(line) for line in (run_dir / "adapter" / "metrics.jsonl").read_text().splitlines()]
    return sum(r["step_time_s"] for r in records if "step_time_s" in r)


def worker(peer: str, train_file: Path, run_dir: Path, data: DataSet = SETS["long"]) -> None:
    """A Python peer (HF Trainer, TRL) in its own process; tuneforge's peers run its CLI instead."""
    loop_s = run_hf(peer, train_file, run_dir, data) if peer in ("a", "b") else run_trl(train_file, run_dir, data)
    (run_dir / "timing.json").write_text(json.dumps({"loop_s": loop_s}))


# ---------------------------------------------------------------------------------------------------------------
# Common evaluation, FLOPs and the matmul peak


def evaluate(train_file: Path, val_file: Path, run_dirs: dict[str, Path]) -> dict:
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


def matmul_peak() -> float:
    """GFLOP/s of a 2048x2048 fp32 matmul (best of 10), measured in its own process like every peer."""
    code = ("import time, torch\n"
            "a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)\n"
            "[a @ b for _ in range(3)]\n"
            "best = float('inf')\n"
            "for _ in range(10):\n"
            "    start = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - start)\n"
            "print(2 * 2048**3 / best / 1e9)\n")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


# ---------------------------------------------------------------------------------------------------------------
# Orchestration and the table


def run_peer(peer: str, train_file: Path, run_dir: Path, script: str = __file__, extra: tuple[str, ...] = (),
             command: list[str] | None = None, env_extra: dict | None = None) -> dict:
    """`script --worker PEER` (or `command`) in its own process: its training-loop time, its whole-process time
    (start to exit, imports and model load included) and its peak RSS (wait4)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    command = command or [sys.executable, script, "--worker", peer, "--train", str(train_file), "--run",
                          str(run_dir), *extra]
    log = (run_dir / "log.txt").open("w")
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    process_s = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode != 0:
        tail = (run_dir / "log.txt").read_text()[-3000:]
        raise SystemExit(f"peer {peer} failed (exit {proc.returncode}); end of its log:\n{tail}")
    timing = json.loads((run_dir / "timing.json").read_text()) if (run_dir / "timing.json").exists() else {}
    return {**timing, "process_s": process_s, "peak_rss_gib": usage.ru_maxrss / 2**20}  # ru_maxrss: KiB


BASELINES = ("a", "b", "c")  # the peers tuneforge is measured against


def table(results: dict, ev: dict, data: DataSet, peak_gflops: float) -> str:
    peers = {p: r for p, r in results.items() if p in BASELINES}
    fastest = min(peers, key=lambda p: peers[p]["process_s"]) if peers else None
    best_loss = min(ev["val_loss"][p] for p in peers) if peers else None
    lines = [f"{data.name}: {data.train_rows} training rows x {EPOCHS} epoch, batch {data.batch} x accumulation "
             f"{data.accum}, {ev['all_tokens']:,} tokens of which {ev['answer_tokens']:,} answer tokens; untuned val "
             f"loss {ev['val_loss']['untuned']:.4f}",
             "",
             "| peer | training loop | whole process | tokens/s (loop) | MFU | peak RSS | val loss | whole process vs "
             "fastest peer | RSS vs fastest peer |",
             "|---|---|---|---|---|---|---|---|---|"]
    for peer, r in results.items():
        mfu = ev["flops"] / r["loop_s"] / 1e9 / peak_gflops
        speed = rss = "-"
        if fastest and peer not in BASELINES:
            speed = f"{peers[fastest]['process_s'] / r['process_s']:.2f}x"
            rss = f"{r['peak_rss_gib'] / peers[fastest]['peak_rss_gib']:.2f}"
        lines.append(f"| {PEERS[peer]} | {r['loop_s']:.0f} s | {r['process_s']:.0f} s | "
                     f"{ev['all_tokens'] / r['loop_s']:.1f} | {100 * mfu:.0f}% | {r['peak_rss_gib']:.2f} GiB | "
                     f"{ev['val_loss'][peer]:.4f} | {speed} | {rss} |")
    lines.append("")
    if fastest:
        lines.append(f"fastest peer (whole process): {PEERS[fastest]}; best peer val loss {best_loss:.4f}. ")
    lines.append(f"MFU: model FLOPs ({ev['flops'] / 1e12:.2f} TFLOP: forward + activation gradients, head on answer "
                 f"tokens) / training-loop time / the highest fp32 matmul peak measured in this run "
                 f"({peak_gflops:.1f} GFLOP/s).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="short,long", help="data sets: short, long or both")
    parser.add_argument("--peers", default="a,b,c,d,d-planned,d-unfused,d-nodropout,d-glibc,d-compile,d-ckpt")
    parser.add_argument("--train-rows", type=int, help="override the set's row count (a quick look)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--set", help=argparse.SUPPRESS)
    parser.add_argument("--train", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.train, args.run, SETS[args.set])

    peers = checked_peers(args.peers, PEERS)
    names = checked_peers(args.sets, SETS)
    reports, raw, measured, results_by_set = [], {}, [matmul_peak()], {}
    print(f"fp32 matmul peak: {measured[0]:.1f} GFLOP/s", flush=True)
    for name in names:
        data = SETS[name]
        if args.train_rows:
            data = DataSet(data.name, args.train_rows, data.val_rows, data.batch, data.accum, data.max_len,
                           data.min_len)
        with tempfile.TemporaryDirectory(prefix="tuneforge-bench-") as tmp:
            tmp = Path(tmp)
            train_file, val_file = make_data(tmp / "data", data.train_rows, data.val_rows, data)
            results = {}
            for peer in peers:
                print(f"[{name}] training {PEERS[peer]} ...", flush=True)
                run_dir = tmp / peer
                if peer in BASELINES:
                    results[peer] = run_peer(peer, train_file, run_dir, extra=("--set", name))
                else:
                    run_dir.mkdir(parents=True, exist_ok=True)
                    glibc = {"TUNEFORGE_ALLOCATOR": "system"} if peer == "d-glibc" else {}
                    results[peer] = run_peer(peer, train_file, run_dir,
                                             command=tuneforge_command(peer, train_file, run_dir, data),
                                             env_extra=glibc)
                    results[peer]["loop_s"] = tuneforge_loop_seconds(run_dir)
                print(f"  loop {results[peer]['loop_s']:.1f} s, process {results[peer]['process_s']:.1f} s, peak "
                      f"RSS {results[peer]['peak_rss_gib']:.2f} GiB", flush=True)
            print("evaluating every adapter on the held-out rows ...", flush=True)
            ev = evaluate(train_file, val_file, {p: tmp / p for p in peers})
        results_by_set[name] = (results, ev, data)
        measured.append(matmul_peak())
    # The machine's speed drifts (turbo, neighbours): MFU is taken against the highest peak seen in the run.
    peak = max(measured)
    for name, (results, ev, data) in results_by_set.items():
        reports.append(table(results, ev, data, peak))
        raw[name] = {"results": results, "eval": ev}
    reports.append("fp32 matmul peak measured before and after each set: "
                   + ", ".join(f"{p:.0f}" for p in measured) + " GFLOP/s")
    write_report(args.out, "train_speed", "\n\n".join(reports), {"sets": raw, "matmul_peaks_gflops": measured})


def checked_peers(text: str, known: dict[str, str]) -> list[str]:
    peers = text.split(",")
    unknown = [p for p in peers if p not in known]
    if unknown:
        raise SystemExit(f"--peers: unknown {', '.join(unknown)} (allowed: {', '.join(known)})")
    return peers


def run_peers(peers: list[str], labels: dict[str, str], train_file: Path, tmp: Path, script: str,
              extra: tuple[str, ...] = ()) -> dict:
    """Each peer in turn, alone, in its own process (`script --worker`)."""
    results = {}
    for peer in peers:
        print(f"training {labels[peer]} ...", flush=True)
        results[peer] = run_peer(peer, train_file, tmp / peer, script=script, extra=extra)
        print(f"  loop {results[peer]['loop_s']:.1f} s, process {results[peer]['process_s']:.1f} s, peak RSS "
              f"{results[peer]['peak_rss_gib']:.2f} GiB", flush=True)
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

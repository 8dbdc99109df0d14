"""Per-process memory of full fine-tuning with 1 process, 2 processes under DDP and 2 under FSDP2.

    .venv/bin/python bench/distributed_memory.py                 # the embedded SmolLM2-135M-Instruct, 3 steps each
    .venv/bin/python bench/distributed_memory.py --steps 2 --nproc 2

Each configuration trains `configs/demo.yaml` with `method=full` through the real CLI (`tuneforge train --nproc N`,
which launches torchrun; gloo on this CPU). The loop logs, after its first optimizer step, every process's resident
parameters, gradients and optimizer state (its shards under FSDP) and its peak RSS so far; this script tabulates them
and the ratio to one process. Memory is not timing: the figures hold on a busy machine too, but run it alone anyway
(two PyTorch processes per core thrash, and it takes a few minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def run(label: str, nproc: int, mode: str, args, scratch: Path) -> dict:
    out = scratch / label
    command = [sys.executable, "-m", "tuneforge", "train", str(ROOT / "configs" / "demo.yaml"), "method=full",
               "train.lr=5e-5", f"train.max_steps={args.steps}", "train.batch_size=4", "train.eval_every=0",
               "data.val_split=0", f"output_dir={out}", f"train.distributed={mode}", "--quiet"]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{label}: failed\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r["memory_per_process"] for r in records if "memory_per_process" in r)
    return {"label": label, "processes": nproc, "mode": mode, "per_process": first,
            "wall_s": round(time.perf_counter() - started, 1)}


def table(results: list[dict]) -> str:
    one = results[0]["per_process"][0]
    one_state = one["params_mib"] + one["grads_mib"] + one["optimizer_mib"]
    lines = ["| run | processes | params MiB | grads MiB | optimizer MiB | params+grads+optimizer MiB (vs 1 process) "
             "| peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        worst = max(r["per_process"], key=lambda p: p["params_mib"] + p["grads_mib"] + p["optimizer_mib"])
        state = worst["params_mib"] + worst["grads_mib"] + worst["optimizer_mib"]
        rss = max(p["peak_rss_mib"] for p in r["per_process"])
        lines.append(f"| {r['label']} | {r['processes']} | {worst['params_mib']:.0f} | {worst['grads_mib']:.0f} | "
                     f"{worst['optimizer_mib']:.0f} | {state:.0f} ({state / one_state:.2f}x) | {rss:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tf-dist-mem-") as tmp:
        scratch = Path(tmp)
        results = [run("1 process", 1, "none", args, scratch),
                   run(f"DDP x{args.nproc}", args.nproc, "ddp", args, scratch),
                   run(f"FSDP2 x{args.nproc}", args.nproc, "fsdp", args, scratch)]
    text = table(results)
    machine = f"{os.cpu_count()}-core CPU, fp32, gloo"
    header = (f"Full fine-tuning of smollm2-135m-instruct, per process (the largest), after the first optimizer step; "
              f"measured {time.strftime('%Y-%m-%d')} on a {machine} by bench/distributed_memory.py\n\n")
    print(header + text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distributed_memory.md").write_text(header + text + "\n", encoding="utf-8")
    (RESULTS / "distributed_memory.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

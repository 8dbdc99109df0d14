"""A short real run that measures what the estimate predicts: training throughput and peak memory growth.

The run happens in a fresh Python process so its memory is its own: the child imports everything training needs,
resets the kernel's peak-RSS mark (`/proc/self/clear_refs`), notes its RSS, trains a few steps and reports the peak
RSS growth (on CUDA, PyTorch's peak allocation as well) and the tokens per second of the steps after the first.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from tuneforge.allocator import train_environment
from tuneforge.config import RunConfig
from tuneforge.errors import UserError

# Runs in the child. Everything the run imports is imported before the baseline, so import memory is not counted.
_CHILD = r"""
import json, re, sys
import torch, transformers, peft
from tuneforge.config import load_config
from tuneforge.train.loop import train

def status(field):
    text = open("/proc/self/status").read()
    return int(re.search(field + r":\s+(\d+) kB", text).group(1)) * 1024

cfg = load_config(sys.argv[1])
cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
if cuda:
    torch.cuda.reset_peak_memory_stats()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM (peak RSS) to the current RSS
baseline = status("VmRSS")
result = train(cfg, show_progress=False)
out = {"baseline_rss": baseline, "peak_rss": status("VmHWM"), "steps": result.steps}
if cuda:
    out["cuda_peak_allocated"] = torch.cuda.max_memory_allocated()
    out["cuda_peak_reserved"] = torch.cuda.max_memory_reserved()
print("TUNEFORGE_MEASURE " + json.dumps(out))
"""


@dataclass(frozen=True)
class Measurement:
    peak_growth: int  # bytes: peak RSS during the run minus RSS before it
    tokens_per_s: float | None  # median over the steps after the first (the first pays one-off costs)
    steps: int
    cuda_peak_allocated: int | None = None


def measure_run(cfg: RunConfig, steps: int = 3, timeout: float = 900) -> Measurement:
    """Train `cfg` for `steps` optimizer steps in a child process (output in a temporary directory) and measure it."""
    if not Path("/proc/self/clear_refs").exists():
        raise UserError("measuring peak memory needs Linux (/proc/self/clear_refs)")
    with tempfile.TemporaryDirectory(prefix="tuneforge-calibrate-") as tmp:
        raw = cfg.to_dict()
        raw["output_dir"] = str(Path(tmp) / "run")
        raw["train"].update(max_steps=steps, eval_every=0, save_every=0, early_stopping_patience=0)
        raw["data"].update(val=None, val_split=0.0)  # validation is not what is being measured
        run_file = Path(tmp) / "run.yaml"
        run_file.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        # The allocator `tuneforge train` would run with (tcmalloc where installed): its heap is what is measured.
        env = {**(train_environment() or os.environ), "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(run_file)], capture_output=True, text=True,
                              env=env, timeout=timeout)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("TUNEFORGE_MEASURE ")]
        if proc.returncode != 0 or not lines:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"calibration run failed: {last}")
        report = json.loads(lines[-1].split(" ", 1)[1])
        rates = step_rates(Path(raw["output_dir"]) / "metrics.jsonl")
    return Measurement(
        peak_growth=report["peak_rss"] - report["baseline_rss"],
        tokens_per_s=statistics.median(rates[1:] or rates) if rates else None,
        steps=report["steps"],
        cuda_peak_allocated=report.get("cuda_peak_allocated"),
    )


def step_rates(metrics_file: Path) -> list[float]:
    """tokens/s of every logged step of a run's metrics.jsonl, in order."""
    if not metrics_file.is_file():
        return []
    rates = []
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "tokens_per_s" in row:
            rates.append(float(row["tokens_per_s"]))
    return rates


def throughput_of_run(run_dir: str) -> float:
    """Median tokens/s of an earlier run (its metrics.jsonl), skipping the first step."""
    rates = step_rates(Path(run_dir) / "metrics.jsonl")
    if not rates:
        raise UserError(f"--from-run: {run_dir} has no metrics.jsonl with tokens_per_s (is it a tuneforge run?)")
    return statistics.median(rates[1:] or rates)

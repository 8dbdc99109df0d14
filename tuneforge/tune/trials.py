"""One trial: its run file, its `tuneforge train` process, its evaluations as they are written, and its end.

The trial runs in its own process (forked from a server that imported the training stack once: trial_process.py),
so a crash, a NaN or an out-of-memory fails that trial, not the study. Its
evaluations are read from the run's metrics.jsonl while it trains and handed to the pruner; a trial the pruner gives
up on, or the one running when the budget ends, gets SIGTERM, which the training loop answers with a checkpoint and
exit code 75. The trial process also gets SIGTERM when the study's own process dies (the server exits with the
study, and Linux's parent-death signal reaches the trial), so `kill -9` of the study leaves every trial
checkpointed, to be resumed by `tune --resume`.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tuneforge import run_dir as layout
from tuneforge.tune.trial_process import start_trial
from tuneforge.config import set_dotted

POLL_S = 0.5
STOP_GRACE_S = 120  # how long a stopped trial may take to finish its step and write its checkpoint


@dataclass
class TrialOutcome:
    state: str  # "complete", "pruned" or "failed"
    value: float | None  # the best evaluation's value (the weights a finished trial keeps)
    evaluations: list[tuple[int, float]] = field(default_factory=list)  # (step, value) in order
    seconds: float = 0.0
    reason: str = ""  # pruned: by whom; failed: the error's first line
    val_loss: float | None = None  # validation loss at the best evaluation (the study's tie-break)


def metric_key(metric: str) -> str:
    """The metrics.jsonl field a validation writes for the study's metric."""
    return "val_loss" if metric == "val_loss" else f"val_{metric}"


def trial_config(base: dict, values: dict[str, object], run_dir: Path, metric: str, eval_every: int,
                 patience: int) -> dict:
    """The base run file with the trial's values, its own output_dir, and the evaluations the search needs: the
    metric on every validation row at every `eval_every` steps, early stopping on it, a checkpoint at each."""
    config = run_config(base, values, run_dir)
    train = config.setdefault("train", {})
    train.update({"eval_every": eval_every, "save_every": eval_every, "early_stopping_patience": patience,
                  "resume": "auto", "max_steps": 0})
    if metric == "val_loss":
        train.update({"eval_metric": None, "early_stopping_metric": "val_loss"})
    else:
        train.update({"eval_metric": metric, "eval_metric_sample": 0, "early_stopping_metric": "eval_metric"})
    return config


def run_config(base: dict, values: dict[str, object], run_dir: Path) -> dict:
    """A deep copy of the base run file with dotted `values` set and its own output_dir (every run a study starts:
    the trials, the range test)."""
    config = json.loads(json.dumps(base))
    for key, value in values.items():
        set_dotted(config, key, value)
    config["output_dir"] = str(run_dir)
    return config


def run_trial(config: dict, run_dir: Path, metric: str, deadline: float, report, should_prune,
              on_poll=lambda: None) -> TrialOutcome:
    """Train `config` in its own process until it ends, the pruner stops it (`report(value, step)` then
    `should_prune()`), or time.monotonic() passes `deadline`. `on_poll()` runs every poll (the study's clock)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    run_file = run_dir.parent / f"{run_dir.name}.yaml"
    run_file.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    key, maximise = metric_key(metric), metric != "val_loss"
    started = time.monotonic()
    process = start_trial(run_file, run_dir.parent / f"{run_dir.name}.log")
    evaluations: list[tuple[int, float]] = []
    stopped = ""
    while process.poll() is None:
        time.sleep(POLL_S)
        on_poll()
        for step, value in new_evaluations(run_dir, key, evaluations):
            evaluations.append((step, value))
            report(value, step)
            if not stopped and should_prune():
                stopped = f"pruned at step {step} ({metric} {value:.4f})"
                _stop(process)
        if not stopped and time.monotonic() > deadline:
            stopped = "pruned: the budget ended"
            _stop(process)
    for step, value in new_evaluations(run_dir, key, evaluations):  # the last ones, written before exit
        evaluations.append((step, value))
        report(value, step)
    seconds = time.monotonic() - started
    best = _best([v for _, v in evaluations], maximise)
    loss = val_loss_at(run_dir, next(step for step, v in evaluations if v == best)) if best is not None else None
    code = process.returncode
    if stopped:  # ours to stop: checkpointed (75), or killed by the signal before its loop could catch it
        return TrialOutcome("pruned", best, evaluations, seconds, stopped, loss)
    if code == 0:
        return TrialOutcome("complete", best, evaluations, seconds, val_loss=loss)
    return TrialOutcome("failed", best, evaluations, seconds, failure_reason(run_dir, code), loss)


def val_loss_at(run_dir: Path, step: int) -> float | None:
    """The validation loss the run logged at `step`'s evaluation (the first best one: the weights the loop kept)."""
    for record in layout.read_metrics(run_dir):
        if record.get("step") == step and isinstance(record.get("val_loss"), (int, float)):
            return float(record["val_loss"])
    return None


def new_evaluations(run_dir: Path, key: str, seen: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Validation values in metrics.jsonl at steps not yet in `seen` (a resumed run rewrites its file from its
    checkpoint on, so the file is read whole each time)."""
    known = {step for step, _ in seen}
    found = []
    for record in layout.read_metrics(run_dir):
        value = record.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value) and "step" in record:
            if record["step"] not in known:
                found.append((int(record["step"]), float(value)))
                known.add(record["step"])
    return found


def _best(values: list[float], maximise: bool) -> float | None:
    return (max(values) if maximise else min(values)) if values else None


def _stop(process) -> None:
    """SIGTERM: the loop finishes its step, writes a checkpoint and exits 75. SIGKILL only if it hangs."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def failure_reason(run_dir: Path, code: int) -> str:
    """The failed trial's one line: the error its status.json records, else the last line of its log."""
    status = layout.read_status(run_dir) or {}
    if status.get("error"):
        return str(status["error"]).splitlines()[0]
    log = run_dir.parent / f"{run_dir.name}.log"
    lines = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()] \
        if log.exists() else []
    return f"exit {code}: {lines[-1].strip()[:300]}" if lines else f"exit {code}"

"""What the dashboard knows about runs, read from their directories and nothing else.

A run is any directory under the runs directory holding config.yaml (the trainer writes it first). Its state comes
from status.json when the trainer wrote one; a "running" whose process is gone is shown as failed, because a killed
trainer cannot update its own status. Older runs without status.json are judged by metrics.jsonl's end event.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import yaml

from tuneforge.config import dotted_items
from tuneforge import run_dir as layout
from tuneforge.run_dir import read_json_object, read_meta, read_metrics, read_status
from tuneforge.ui.confine import run_name

# A run on another host can't be checked by pid: without an update for this long it is presumed dead.
REMOTE_STALE_S = 300
# Deep enough for runs/<group>/<run>; run directories themselves are not searched (checkpoints, reviews live there).
MAX_DEPTH = 3
SERIES = ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s",
          # preference runs (DPO and kin): step and validation rewards, margin and reward accuracy
          "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "val_reward_accuracy",
          "val_reward_margin")
# The settings the runs table shows, as dotted config keys; a method's own keys only for that method.
KEY_SETTINGS = ("train.lr", "train.epochs", "train.max_steps", "train.batch_size", "train.grad_accum",
                "data.max_length")
METHOD_SETTINGS = {"lora": ("lora.r", "lora.alpha"), "dora": ("lora.r", "lora.alpha"),
                   "qlora": ("lora.r", "lora.alpha", "qlora.quant_type"),
                   "adapter": ("adapter.reduction_factor",), "prefix": ("prefix.num_virtual_tokens",),
                   "prompt": ("prompt.num_virtual_tokens",)}


def find_runs(runs_root: Path) -> list[Path]:
    """Every run directory under `runs_root`, newest activity first."""
    found: list[Path] = []
    root = runs_root.resolve()
    if not root.is_dir():
        return found
    for current, dirs, files in os.walk(root):
        depth = len(Path(current).relative_to(root).parts)
        if layout.CONFIG_FILE in files and depth > 0:
            found.append(Path(current))
            dirs[:] = []
        elif depth >= MAX_DEPTH:
            dirs[:] = []
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(found, key=_last_activity, reverse=True)


def _last_activity(run: Path) -> float:
    return max((p.stat().st_mtime for p in layout.status_mtime_paths(run) if p.exists()), default=0.0)


def read_config(run: Path) -> dict:
    try:
        return layout.read_config(run) or {}
    except (OSError, yaml.YAMLError):
        return {}


def run_state(run: Path, records: list[dict]) -> dict:
    """{"state": running|finished|failed|stopped|unknown, "detail": why, "step", "total_steps"}."""
    status = read_status(run)
    start = next((r for r in reversed(records) if r.get("event") in ("start", "resume")), {})
    steps = [r["step"] for r in records if "loss" in r and "step" in r]
    progress = {"step": steps[-1] if steps else 0, "total_steps": start.get("total_steps")}
    if status is not None:
        # status.json's step moves at checkpoints only; metrics.jsonl has every logged step.
        progress = {"step": max(progress["step"], status.get("step") or 0),
                    "total_steps": status.get("total_steps", progress["total_steps"])}
        state, detail = status.get("state", "unknown"), status.get("error") or ""
        if state == "running" and not _still_running(status):
            state, detail = "failed", "process ended without finishing"
        return {"state": state, "detail": detail, **progress}
    if any(r.get("event") == "end" for r in records):
        return {"state": "finished", "detail": "", **progress}
    return {"state": "unknown", "detail": "no status.json and no end event in metrics.jsonl", **progress}


def _still_running(status: dict) -> bool:
    if status.get("host") not in (None, socket.gethostname()):
        return time.time() - float(status.get("updated") or 0) < REMOTE_STALE_S
    try:
        os.kill(int(status.get("pid")), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (TypeError, ValueError):
        return False
    return True


def eval_scores(run: Path) -> dict[str, float]:
    """Scores of the run itself from `tuneforge eval RUN --out <run>/<dir>` reports kept inside the run directory."""
    scores: dict[str, float] = {}
    for summary_file in layout.eval_summaries(run):
        models = (read_json_object(summary_file) or {}).get("models", {})
        own = models.get("tuned") or models.get("model") or {}
        for metric, value in (own.get("scores") or {}).items():
            if isinstance(value, (int, float)):
                scores[metric] = value
    return scores


def base_model(run: Path, config: dict) -> str:
    meta = read_meta(run) or {}
    return str(meta.get("base_model") or config.get("model") or "")


def run_summary(runs_root: Path, run: Path) -> dict:
    """One row of the runs table."""
    config = read_config(run)
    flat = dotted_items(config)
    records = read_metrics(run)
    method = str(config.get("method") or "")
    val_losses = [r["val_loss"] for r in records if isinstance(r.get("val_loss"), (int, float))]
    train_losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
    keys = KEY_SETTINGS + METHOD_SETTINGS.get(method, ())
    return {
        "name": run_name(runs_root, run),
        "status": run_state(run, records),
        "model": base_model(run, config),
        "method": method,
        "settings": {key: flat[key] for key in keys if key in flat},
        "best_val_loss": min(val_losses) if val_losses else None,
        "last_loss": train_losses[-1] if train_losses else None,
        "eval": eval_scores(run),
        "has_weights": read_meta(run) is not None,
        "updated": _last_activity(run),
        "study": study_of(run),
    }


def study_of(run: Path) -> dict | None:
    """A `tuneforge tune` trial (STUDY/trials/NNNN): its study, the study's metric, whether it is the best trial."""
    state = read_json_object(run.parent.parent / "tune.json") if run.parent.name == "trials" else None
    if state is None:
        return None
    best = state.get("best_run")
    return {"study": run.parent.parent.name, "metric": (state.get("settings") or {}).get("metric"),
            "best": bool(best) and Path(best).resolve() == run.resolve()}


def run_curves(run: Path) -> dict[str, list[list[float]]]:
    """{"loss": [[step, value], ...], "val_loss": ..., "lr", "grad_norm", "tokens_per_s", and a preference run's
    rewards and reward accuracy}: what the charts plot."""
    curves: dict[str, list[list[float]]] = {name: [] for name in SERIES}
    for record in read_metrics(run):
        if record.get("skipped_step") or "step" not in record:
            continue
        for name in SERIES:
            value = record.get(name)
            if isinstance(value, (int, float)):
                curves[name].append([record["step"], value])
    return curves


def config_differences(configs: dict[str, dict]) -> dict[str, dict[str, object]]:
    """{dotted key: {run: value}} for the keys whose values are not the same in every run (missing counts)."""
    flat = {name: dotted_items(config) for name, config in configs.items()}
    # output_dir always differs and says nothing about how the runs were trained.
    keys = sorted({key for values in flat.values() for key in values} - {"output_dir"})
    differing = {}
    for key in keys:
        values = {name: values.get(key) for name, values in flat.items()}
        if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
            differing[key] = values
    return differing

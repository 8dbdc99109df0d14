"""The run directory: the one module that knows its layout. Train writes it; eval, deploy and the UI read it.

```
<output_dir>/
  config.yaml            the resolved run config (written first: its presence makes the folder a run)
  metrics.jsonl          one JSON line per logged step, validation and event (append-only)
  status.json            running | finished | failed | stopped, with pid and host (replaced atomically)
  loss.png               the loss curve, drawn at the end
  checkpoints/step-N/    resumable checkpoints (their inside is train/checkpoint.py's business)
  reference_logps.json   preference runs: the reference model's log-probabilities of every pair, computed once
  tuneforge.json         base model, method, steps, losses: written with the final weights
  adapter_* | model.*    the final weights (PEFT adapter, bottleneck adapter or a full HF model) and tokenizer
  <report>/summary.json  `tuneforge eval RUN --out RUN/<report>` reports (make demo: eval/)
  reviews/<id>/          blind reviews from `tuneforge ui`
```

Only plain files are here (JSON, YAML): no torch, so config, model, train, eval, deploy and the UI all import it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from tuneforge.data.atomic_write import atomic_text_writer
from tuneforge.errors import OutputWriteError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
STATUS_FILE = "status.json"
PLOT_FILE = "loss.png"
META_FILE = "tuneforge.json"
CHECKPOINTS_DIR = "checkpoints"
REVIEWS_DIR = "reviews"
EVAL_SUMMARY_FILE = "summary.json"
REFERENCE_FILE = "reference_logps.json"


# ---------------------------------------------------------------------------------------------------------------------
# Where things are.


def config_path(run: Path) -> Path:
    return Path(run) / CONFIG_FILE


def metrics_path(run: Path) -> Path:
    return Path(run) / METRICS_FILE


def plot_path(run: Path) -> Path:
    return Path(run) / PLOT_FILE


def reference_path(run: Path) -> Path:
    return Path(run) / REFERENCE_FILE


def checkpoints_dir(run: Path) -> Path:
    return Path(run) / CHECKPOINTS_DIR


def checkpoint_dir(run: Path, step: int) -> Path:
    return checkpoints_dir(run) / f"step-{step:08d}"


def reviews_dir(run: Path) -> Path:
    return Path(run) / REVIEWS_DIR


def eval_summaries(run: Path) -> list[Path]:
    """The summary files of the eval reports kept inside the run, in name order."""
    return sorted(Path(run).glob(f"*/{EVAL_SUMMARY_FILE}"))


def is_run(path: Path) -> bool:
    """A folder `tuneforge train` started (it may still be running, or have failed)."""
    return config_path(path).is_file()


# ---------------------------------------------------------------------------------------------------------------------
# The config and the run's metadata.


def write_config(run: Path, config_text: str) -> None:
    Path(run).mkdir(parents=True, exist_ok=True)
    config_path(run).write_text(config_text, encoding="utf-8")


def read_config(run: Path) -> dict[str, Any] | None:
    """The run's resolved config as a mapping, or None when there is none (or it is not a mapping)."""
    path = config_path(run)
    if not path.is_file():
        return None
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    return loaded if isinstance(loaded, dict) else None


def read_meta(run: Path) -> dict | None:
    """tuneforge.json (base model, method, ...): present once a run has saved its final weights; None otherwise,
    also for anything that is not a folder."""
    path = Path(run) / META_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def meta_text(meta: dict) -> str:
    return json.dumps(meta, indent=2) + "\n"


def write_reference(run: Path, stored: dict) -> None:
    """reference_logps.json: {"fingerprint": what they were computed for, "train"/"val": [[chosen, rejected], ...]}."""
    _write_json(reference_path(run), stored)


def _write_json(path: Path, value: dict) -> None:
    """One JSON line, replaced atomically; a failed write is a one-line OutputWriteError naming the file."""
    try:
        with atomic_text_writer(path) as fh:
            fh.write(json.dumps(value) + "\n")
    except OSError as exc:
        raise OutputWriteError(f"cannot write {path}: {exc.strerror or exc}") from None


def read_reference(run: Path) -> dict | None:
    return read_json_object(reference_path(run))


# ---------------------------------------------------------------------------------------------------------------------
# status.json


def write_status(run: Path, state: str, new_attempt: bool = False, **fields) -> None:
    """`status.json`: running / finished / failed / stopped, with the pid and host that a reader (the UI) checks to
    tell a live run from one whose process died without a word (kill -9, power loss). Replaced atomically.
    `new_attempt`: this process starts (or resumes) the run; otherwise the earlier fields are updated."""
    path = Path(run) / STATUS_FILE
    previous = {} if new_attempt else read_status(run) or {}
    now = round(time.time(), 3)
    status = {**previous, "state": state, "pid": os.getpid(), "host": socket.gethostname(),
              "started": previous.get("started", now), "updated": now, "error": None, **fields}
    _write_json(path, status)


def read_status(run: Path) -> dict | None:
    return read_json_object(Path(run) / STATUS_FILE)


def status_mtime_paths(run: Path) -> tuple[Path, ...]:
    """The files whose change means the run moved on (the UI sorts runs by it)."""
    return metrics_path(run), Path(run) / STATUS_FILE, config_path(run)


# ---------------------------------------------------------------------------------------------------------------------
# metrics.jsonl


def append_metrics(run: Path, record: dict) -> None:
    path = metrics_path(run)
    try:
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
    except OSError as exc:
        raise OutputWriteError(f"cannot append to {path}: {exc.strerror or exc}") from None


def read_metrics(run: Path) -> list[dict]:
    return read_jsonl(metrics_path(run))


def start_metrics(run: Path) -> None:
    """A fresh run starts a fresh metrics file."""
    metrics_path(run).unlink(missing_ok=True)


def truncate_metrics(run: Path, last_step: int) -> None:
    """On resume: drop lines about steps after the checkpoint (the killed attempt's), so the file reads as one run."""
    path = metrics_path(run)
    if not path.is_file():
        return
    kept = [json.dumps(r) for r in read_metrics(run) if r.get("step", 0) <= last_step and "event" not in r]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------------------------
# Readers for files another process writes.


def read_json_object(path: Path) -> dict | None:
    """A JSON object file written by another process, or None when it is missing, unreadable or not an object."""
    try:
        loaded = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def read_jsonl(path: Path) -> list[dict]:
    """Every JSON line of an append-only log, in order; [] when there is none. A line cut short by a kill is skipped:
    the lines before it were written whole."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records

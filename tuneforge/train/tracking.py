"""What a run shows and keeps: a live progress bar, metrics as JSON lines (also sent to the trackers in
`train.report_to`), the run's status for `tuneforge ui`, and a loss-curve PNG at the end."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from tqdm import tqdm

from tuneforge.data.atomic_write import atomic_text_writer
from tuneforge.errors import OutputWriteError
from tuneforge.train.trackers import numeric_fields

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
STATUS_FILE = "status.json"


class Tracker:
    """`write=False` (ranks other than 0 of a distributed run): shows and writes nothing."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0, show_progress: bool = True,
                 write: bool = True, trackers: list | None = None):
        self.path = run_dir / METRICS_FILE
        self.trackers = trackers or []
        self.run_dir = run_dir
        self.write = write
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            file=sys.stderr,
            disable=not (show_progress and write),
            dynamic_ncols=True,
        )
        self.started = time.perf_counter()

    def log(self, record: dict) -> None:
        if not self.write:
            return
        record = {"time": round(time.time(), 3), **record}
        try:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise OutputWriteError(f"cannot append to {self.path}: {exc.strerror or exc}") from None
        metrics = numeric_fields(record) if self.trackers and "event" not in record else {}
        if "step" in record and metrics:
            for tracker in self.trackers:
                tracker.log(record["step"], metrics)

    def step(self, loss: float, lr: float, tokens_per_s: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
        self.bar.update(1)

    def message(self, text: str) -> None:
        if self.write:
            self.bar.write(text, file=sys.stderr)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.bar.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def write_status(run_dir: Path, state: str, new_attempt: bool = False, **fields) -> None:
    """`status.json`: running / finished / failed / stopped, with the pid and host that a reader (the UI) checks to
    tell a live run from one whose process died without a word (kill -9, power loss). Replaced atomically.
    `new_attempt`: this process starts (or resumes) the run; otherwise the earlier fields are updated."""
    path = Path(run_dir) / STATUS_FILE
    previous = {} if new_attempt else read_status(run_dir) or {}
    now = round(time.time(), 3)
    status = {**previous, "state": state, "pid": os.getpid(), "host": socket.gethostname(),
              "started": previous.get("started", now), "updated": now, "error": None, **fields}
    try:
        with atomic_text_writer(path) as fh:
            fh.write(json.dumps(status) + "\n")
    except OSError as exc:
        raise OutputWriteError(f"cannot write {path}: {exc.strerror or exc}") from None


def read_status(run_dir: Path) -> dict | None:
    return read_json_object(Path(run_dir) / STATUS_FILE)


def read_json_object(path: Path) -> dict | None:
    """A JSON object file written by another process, or None when it is missing, unreadable or not an object."""
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """On resume: drop lines about steps after the checkpoint (the killed attempt's), so the file reads as one run."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    kept = [json.dumps(r) for r in read_metrics(run_dir) if r.get("step", 0) <= last_step and "event" not in r]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)


def read_metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / METRICS_FILE)


def read_jsonl(path: Path) -> list[dict]:
    """Every JSON line of an append-only log, in order; [] when there is none. A line cut short by a kill is skipped:
    the lines before it were written whole."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_losses(run_dir: Path) -> Path | None:
    """Train and validation loss against the optimizer step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), marker="o", label="validation loss", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("answer-token cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / PLOT_FILE
    fig.savefig(out)
    plt.close(fig)
    return out

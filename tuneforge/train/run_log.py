"""What a running training shows and keeps: a live progress bar, metrics as JSON lines in the run directory (also
sent to the experiment trackers of `train.report_to`, train/experiment_trackers.py), and a loss-curve PNG at the end.
Where those files live is tuneforge/run_dir.py's business."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tqdm import tqdm

from tuneforge import run_dir as layout
from tuneforge.train.experiment_trackers import numeric_fields


class RunLog:
    """`write=False` (ranks other than 0 of a distributed run): shows and writes nothing."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0, show_progress: bool = True,
                 write: bool = True, trackers: list | None = None):
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
        layout.append_metrics(self.run_dir, record)
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

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.bar.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def plot_losses(run_dir: Path) -> Path | None:
    """Train and validation loss against the optimizer step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = layout.read_metrics(run_dir)
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
    out = layout.plot_path(run_dir)
    fig.savefig(out)
    plt.close(fig)
    return out

"""The learning-rate range test (`tune --lr-range-test`): before the trials, one short run whose learning rate rises
geometrically over four decades around recommend's rate (train.scheduler: exponential), its training loss read per
step, and the search's lr range moved under the rate where that loss stopped falling.

Why: the table's rate can be off by more than the default range's factor of 4 either way for a given model and
data; one run of RANGE_STEPS steps shows where learning starts and where it breaks down, at the cost of RANGE_STEPS
optimizer steps of the run's batch (with recommend's batch of 32 on the demo: about one trial, 2.5 minutes). The
loss is smoothed (an exponential moving average, bias-corrected) because a step's loss depends on its few examples
as much as on the rate. Past the lowest smoothed loss the rate is already too high
for the run (later steps also saw more data, which favours high rates, so the minimum sits above the best rate):
the narrowed range tops out at a third of it and spans NARROWED_SPAN.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from tuneforge import run_dir as layout

RANGE_STEPS = 40  # optimizer steps of the test run
SMOOTHING = 0.9  # the moving average's weight on the past
DIVERGED = 4.0  # a smoothed loss this many times its lowest so far ends the curve
BELOW_MINIMUM = 3.0  # the narrowed range's top: the lowest-loss rate / this
NARROWED_SPAN = 8.0  # the narrowed range's high / low (the default range spans 16)
SWEEP_ABOVE = 100.0  # the sweep's top: recommend's rate x this (its bottom: x SWEEP_ABOVE x RANGE_START)
TEST_DIR = "lr-range"


@dataclass(frozen=True)
class LrRange:
    low: float
    high: float
    why: str  # one line: what the test found, or why the default range was kept

    def to_dict(self) -> dict:
        return {"low": self.low, "high": self.high, "why": self.why}


def range_test_config(base: dict, run_dir: Path, centre_lr: float) -> dict:
    """The run file with the test's schedule: RANGE_STEPS steps, lr rising from centre/100 to centre x 100, no
    evaluation before the end, no checkpoint before the end."""
    from tuneforge.tune.trials import run_config

    return run_config(base, {f"train.{key}": value for key, value in {
        "lr": centre_lr * SWEEP_ABOVE, "scheduler": "exponential", "warmup_ratio": 0.0, "max_steps": RANGE_STEPS,
        "eval_every": 0, "save_every": 0, "eval_metric": None, "early_stopping_patience": 0,
        "resume": "never"}.items()}, run_dir)


def smoothed(losses: list[float]) -> list[float]:
    average, out = 0.0, []
    for i, loss in enumerate(losses, start=1):
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        out.append(average / (1 - SMOOTHING ** i))
    return out


def narrowed_range(curve: list[tuple[float, float]], default_low: float, default_high: float) -> LrRange:
    """From (lr, training loss) per step, in order: the range under the lowest smoothed loss, or the default range
    with the reason the curve could not place it."""
    curve = [(lr, loss) for lr, loss in curve if math.isfinite(loss)]
    if len(curve) < RANGE_STEPS // 4:
        return LrRange(default_low, default_high, f"range test: only {len(curve)} steps with a finite loss; kept "
                                                  "recommend's range")
    lrs = [lr for lr, _ in curve]
    losses = smoothed([loss for _, loss in curve])
    lowest = 0
    for i, loss in enumerate(losses):
        if loss > DIVERGED * losses[lowest]:
            break
        if loss < losses[lowest]:
            lowest = i
    if lowest == 0:
        return LrRange(default_low, default_high, f"range test: the loss never fell between {lrs[0]:.3g} and "
                                                  f"{lrs[-1]:.3g}; kept recommend's range")
    high = lrs[lowest] / BELOW_MINIMUM
    where = "bottomed out" if lowest < len(losses) - 1 else "was still falling"
    return LrRange(high / NARROWED_SPAN, high,
                   f"range test: the smoothed loss fell from {losses[0]:.3g} to {losses[lowest]:.3g} and {where} at "
                   f"lr {lrs[lowest]:.3g}; searched from {high / NARROWED_SPAN:.3g} to a third of it")


def loss_curve(run_dir: Path) -> list[tuple[float, float]]:
    """(lr, loss) of each optimizer step the run logged."""
    return [(float(r["lr"]), float(r["loss"])) for r in layout.read_metrics(run_dir)
            if isinstance(r.get("loss"), (int, float)) and isinstance(r.get("lr"), (int, float)) and "step" in r]


def run_range_test(base: dict, study_dir: Path, centre_lr: float, default_low: float, default_high: float,
                   deadline: float, on_poll) -> LrRange:
    """Runs the test as a trial process would run (its own process; stopped at `deadline`) and narrows the range.
    A test that fails keeps the default range: the search does not depend on it."""
    from tuneforge.tune.trials import run_trial

    run_dir = study_dir / TEST_DIR
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted test runs again from the start: it is short
    config = range_test_config(base, run_dir, centre_lr)
    outcome = run_trial(config, run_dir, "val_loss", deadline, lambda value, step: None, lambda: False,
                        on_poll=on_poll)
    if outcome.state == "pruned":  # stopped by the budget: a partial curve never reached the high rates
        steps = len(loss_curve(run_dir))
        return LrRange(default_low, default_high, f"range test stopped by the budget after {steps} of {RANGE_STEPS} "
                                                  "steps; kept recommend's range")
    found = narrowed_range(loss_curve(run_dir), default_low, default_high)
    if outcome.state == "failed" and found.low == default_low and found.high == default_high:
        return LrRange(default_low, default_high, f"range test failed ({outcome.reason}); kept recommend's range")
    return found

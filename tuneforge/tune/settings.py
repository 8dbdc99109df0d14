"""`tuneforge tune`'s settings: the one home of their defaults, help and ranges (the command line's options are made
from these fields). Imports no torch or Optuna, so `tuneforge tune --help` stays fast."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tuneforge.config import setting

TUNE_METRICS = ("exact_match", "exact_match_normalised", "rougeL", "bleu", "val_loss")


@dataclass
class TuneSettings:
    budget: str = setting("30m", "Wall-clock budget for the whole study, model loads included: 90s, 30m, 2h. The "
                                 "trial running when it ends is stopped and counted as pruned.")
    trials: int | None = setting(None, "Stop after this many trials, even with budget left (default: no limit).",
                                 min=1)
    metric: Literal[TUNE_METRICS] = setting(
        "exact_match", "What the search maximises (val_loss: minimises), measured on the validation rows at every "
                       "evaluation of every trial.")
    space: str | None = setting(None, "YAML file of dotted config keys to search, each a list of choices or "
                                      "{low, high, log}; replaces the default space from recommend.")
    test: str | None = setting(None, "Held-out test rows, scored once at the end on the best trial only.")
    by: str | None = setting(None, "Field to stratify the validation split by (with data.val_split).")
    unseen_answers: bool = setting(
        False, "Make the validation split by answer word (with data.val_split): no training answer holds the "
               "held-out words, so the search rewards configurations that answer for names and values training "
               "never showed, as a test set of new ones asks (a random split shares them and rewards memorising).")
    study_dir: str | None = setting(None, "Where the study lives (default: the run file's output_dir + '-tune').")
    output: str | None = setting(None, "Write the best run file here (default: STUDY_DIR/best.yaml).")
    evaluations_per_epoch: int = setting(2, "Evaluations a trial makes per epoch: what the pruner compares.", min=1)
    patience: int = setting(2, "Evaluations without a new best before a trial stops early (keeping its best).",
                            min=1)
    lr_range_test: bool = setting(
        False, "Before the trials, one short run with the learning rate rising over four decades; the search's lr "
               "range is moved under the rate where its loss stopped falling (off by default: see the README's "
               "tune benchmark for what it gave).")
    seed: int = setting(42, "Seed of the sampler (each trial keeps the run file's train.seed).")


def budget_seconds(text: str) -> float:
    """'90s' / '30m' / '2h' / '1.5h' / a bare number of seconds -> seconds; one-line error otherwise."""
    from tuneforge.errors import UserError

    units = {"s": 1, "m": 60, "h": 3600}
    value = text.strip().lower()
    scale = units.get(value[-1:], None)
    number = value[:-1] if scale else value
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        raise UserError(f"--budget: got {text!r}, expected a duration such as 90s, 30m or 2h") from None
    if seconds <= 0:
        raise UserError(f"--budget: got {text!r}, must be more than 0")
    return seconds

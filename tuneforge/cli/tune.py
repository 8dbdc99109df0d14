"""`tuneforge tune`: a hyperparameter search around recommend's choices, inside a time budget (logic in
tuneforge/tune/)."""

from __future__ import annotations

import argparse

from tuneforge.cli.options import add_option, from_args


def cmd_tune(args: argparse.Namespace) -> int:
    from tuneforge.tune.settings import TuneSettings, budget_seconds
    from tuneforge.tune.study import run_study

    settings = from_args(TuneSettings, args)
    budget_seconds(settings.budget)  # a bad --budget fails before anything loads
    result = run_study(args.config, list(args.overrides), settings, resume=args.resume)
    return 0 if result.best_run is not None else 3


def add_parsers(sub) -> None:
    from tuneforge.tune.settings import TuneSettings

    p = sub.add_parser("tune", help="search learning rate, rank, epochs and warmup on your data within a time budget")
    p.add_argument("config", help="run file (YAML): the model, method and data to tune")
    p.add_argument("overrides", nargs="*", help="dotted overrides for the run file, e.g. data.val_split=0.2")
    for name in ("budget", "trials", "metric", "space", "test", "by", "study_dir", "evaluations_per_epoch",
                 "patience", "seed"):
        add_option(p, TuneSettings, name)
    add_option(p, TuneSettings, "output", "-o", "--output")
    add_option(p, TuneSettings, "lr_range_test", action=argparse.BooleanOptionalAction)
    add_option(p, TuneSettings, "unseen_answers", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue the study in --study-dir after an interruption")
    p.set_defaults(func=cmd_tune)

"""The study: a held-out split, a search space, trials until the budget ends, the best trial, the test set once.

Held-out discipline: the trials train on the training rows and are scored on the validation rows only (the run
file's data.val, or a split tune makes once with data.val_split, stratified by --by or held out by answer word
with --unseen-answers); --test rows are read once, at the end, to score the best trial. The study directory holds
everything: tune.json (what was asked and the time spent), study.db (Optuna's SQLite storage), data/ (the split),
trials/NNNN (each trial's run directory, run file and log), report.md, study.png and best.yaml. `--resume`
continues it after any interruption: finished trials stay finished; a trial that was running is resumed from its
checkpoint (its process was stopped, and checkpointed, when the study's process died).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tuneforge.config import RANGE_START, RunConfig, load_config, validate_for_training
from tuneforge.errors import ConfigError, UserError
from tuneforge.tune.settings import TuneSettings, budget_seconds
from tuneforge.tune.space import SearchSpace, default_space, load_space
from tuneforge.tune.trials import TrialOutcome, run_trial, trial_config

STATE_FILE = "tune.json"
STORAGE_FILE = "study.db"
DEFAULT_VAL_SPLIT = 0.2  # when the run file names no validation data
CLOCK_WRITE_S = 5.0  # how often the time spent is written down (what a kill -9 can lose of the budget)


@dataclass
class StudyResult:
    study_dir: Path
    best_run: Path | None
    best_value: float | None
    best_values: dict[str, object]
    trials: list[dict]  # one row per trial, in order (report.py's table)
    test_score: float | None
    best_file: Path | None


def study_dir_of(cfg: RunConfig, settings: TuneSettings) -> Path:
    return Path(settings.study_dir) if settings.study_dir else Path(f"{cfg.output_dir}-tune")


def run_study(config_path: str, overrides: list[str], settings: TuneSettings, resume: bool = False) -> StudyResult:
    import optuna

    cfg = load_config(config_path, overrides)
    validate_for_training(cfg)
    budget = budget_seconds(settings.budget)
    study_dir = study_dir_of(cfg, settings)
    asked = {"config": cfg.to_dict(), "settings": asdict(settings)}
    state = _start_or_resume(study_dir, asked, resume)
    held_out = validation_source(cfg, settings)
    cfg, train_rows = _held_out_split(cfg, settings, study_dir)
    space = (load_space(settings.space, config_path, overrides, _method_fits(cfg)) if settings.space
             else default_space(cfg, train_rows))
    clock = _Clock(study_dir, state, budget)
    base = cfg.to_dict()
    if settings.lr_range_test:
        space = _range_tested(space, base, study_dir, clock)
    steps_per_epoch = max(1, math.ceil(train_rows / (cfg.train.batch_size * cfg.train.grad_accum)))
    eval_every = max(1, steps_per_epoch // settings.evaluations_per_epoch)
    maximise = settings.metric != "val_loss"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=f"sqlite:///{(study_dir / STORAGE_FILE).resolve()}", study_name="tune",
        direction="maximize" if maximise else "minimize", load_if_exists=resume,
        sampler=optuna.samplers.TPESampler(seed=settings.seed),
        pruner=pruner(first_epoch_step=eval_every * settings.evaluations_per_epoch))
    _requeue_interrupted(study)
    _say(f"study {study_dir}: {settings.metric} on {held_out}; budget {settings.budget}"
         f"{f', at most {settings.trials} trials' if settings.trials else ''}; space ({space.source}): "
         + "; ".join(d.describe() for d in space.dimensions))

    while clock.left() > 0 and (settings.trials is None or _finished(study) < settings.trials):
        trial = study.ask()
        values = space.overrides({d.key: d.suggest(trial) for d in space.dimensions})
        run_dir = Path(trial.user_attrs.get("resume_dir") or study_dir / "trials" / f"{trial.number:04d}")
        trial.set_user_attr("run_dir", str(run_dir))
        config = trial_config(base, values, run_dir, settings.metric, eval_every, settings.patience)
        outcome = run_trial(config, run_dir, settings.metric, clock.deadline(), trial.report, trial.should_prune,
                            on_poll=clock.tick)
        _tell(study, trial, outcome)
        clock.write()
        _say(live_line(trial.number, values, outcome, settings.metric, _best_value(study)))
    clock.write()
    return _finish(study, study_dir, cfg, config_path, overrides, space, settings, held_out)


def _range_tested(space: SearchSpace, base: dict, study_dir: Path, clock: "_Clock") -> SearchSpace:
    """The space with train.lr's range narrowed by the learning-rate range test (run once per study: a resumed
    study reads its result back from tune.json, so every trial of a study samples the same range)."""
    import dataclasses

    from tuneforge.tune.lr_range import SWEEP_ABOVE, LrRange, run_range_test

    dim = next((d for d in space.dimensions if d.key == "train.lr"), None)
    if dim is None or dim.choices or not dim.log:
        _say("lr range test skipped: the space has no log range for train.lr")
        return space
    if clock.state.get("lr_range"):
        found = LrRange(**clock.state["lr_range"])
    else:
        centre = math.sqrt(dim.low * dim.high)
        _say(f"lr range test: lr rising from {centre * SWEEP_ABOVE * RANGE_START:.3g} to {centre * SWEEP_ABOVE:.3g}")
        found = run_range_test(base, study_dir, centre, dim.low, dim.high, clock.deadline(), clock.tick)
        clock.state["lr_range"] = found.to_dict()
        clock.write()
    _say(found.why)
    narrowed = dataclasses.replace(dim, low=found.low, high=found.high, why=found.why)
    return dataclasses.replace(space, dimensions=[narrowed if d is dim else d for d in space.dimensions])


def pruner(first_epoch_step: int):
    """Median pruning: a trial whose value at an evaluation is worse than the median of the earlier trials at that
    evaluation stops; the first two trials always run to the end, to have a median to compare with. No trial is
    pruned before its first epoch's last evaluation: a generated-answer metric stays at 0 until a run has learned
    the answer's format, which a lower (often better) learning rate does later (measured on the demo: pruning from
    the first evaluation stopped 12 of 19 trials at their first, every one at 0)."""
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=first_epoch_step)


class _Clock:
    """The budget's wall clock, kept across --resume in tune.json."""

    def __init__(self, study_dir: Path, state: dict, budget: float):
        self.file, self.state, self.budget = study_dir / STATE_FILE, state, budget
        self.started = time.monotonic() - state.get("spent_s", 0.0)
        self.written = time.monotonic()

    def spent(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.budget - self.spent()

    def deadline(self) -> float:
        return self.started + self.budget

    def tick(self) -> None:
        if time.monotonic() - self.written > CLOCK_WRITE_S:
            self.write()

    def write(self) -> None:
        self.state["spent_s"] = self.spent()
        _write_json(self.file, self.state)
        self.written = time.monotonic()


def _start_or_resume(study_dir: Path, asked: dict, resume: bool) -> dict:
    state_file = study_dir / STATE_FILE
    if resume:
        if not state_file.is_file():
            raise UserError(f"tune --resume: {study_dir} holds no study ({STATE_FILE} is missing); start it without "
                            "--resume")
        state = json.loads(state_file.read_text(encoding="utf-8"))
        for part in ("config", "settings"):
            if state.get(part) != json.loads(json.dumps(asked[part])):
                changed = _first_difference(state.get(part) or {}, asked[part])
                raise ConfigError(f"tune --resume: {changed} differs from the study in {study_dir}; resume with the "
                                  "same run file, overrides and options, or start another --study-dir")
        return state
    if state_file.exists():
        raise UserError(f"tune: {study_dir} already holds a study; continue it with --resume, or choose another "
                        "--study-dir")
    study_dir.mkdir(parents=True, exist_ok=True)
    state = {**json.loads(json.dumps(asked)), "spent_s": 0.0}
    _write_json(state_file, state)
    return state


def _first_difference(before: dict, now: dict, prefix: str = "") -> str:
    for key in sorted(set(before) | set(now)):
        a, b = before.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key} ({a!r} then, {b!r} now)"
    return ""


def validation_source(cfg: RunConfig, settings: TuneSettings) -> str:
    """Where the study's validation rows come from, in words (the live lines and the report say it)."""
    if cfg.data.val is not None:
        return f"the validation rows of data.val ({cfg.data.val})"
    share = f"{100 * (cfg.data.val_split or DEFAULT_VAL_SPLIT):.0f}%"
    if settings.unseen_answers:
        return f"{share} of data.train held out by answer word (no training answer holds their held-out words)"
    return f"a random {share} of data.train" + (f", stratified by {settings.by}" if settings.by else "")


def _held_out_split(cfg: RunConfig, settings: TuneSettings, study_dir: Path) -> tuple[RunConfig, int]:
    """The run file with the study's validation rows: data.val as given, or a split of data.train made once into
    STUDY_DIR/data (stratified by --by, or held out by answer word with --unseen-answers). Returns it and the
    number of training rows."""
    import dataclasses

    from tuneforge.data.formats import read_rows
    from tuneforge.data.split import split_file

    data = cfg.data
    if not isinstance(data.train, str) or (data.val is not None and not isinstance(data.val, str)):
        raise ConfigError("tune: data.train and data.val must be single files (a mix of sources is not searched yet)")
    if data.val is not None:
        if settings.by or settings.unseen_answers:
            option = "--by" if settings.by else "--unseen-answers"
            raise ConfigError(f"tune: {option} shapes the split tune makes; this run file names data.val already")
        return cfg, sum(1 for _ in read_rows(data.train))
    split_dir = study_dir / "data"
    stem = Path(data.train).stem  # data split's names: STEM.train.jsonl, STEM.val.jsonl
    train_file, val_file = split_dir / f"{stem}.train.jsonl", split_dir / f"{stem}.val.jsonl"
    if not (train_file.is_file() and val_file.is_file()):  # made once: a resumed study keeps its split
        split_file(data.train, val=data.val_split or DEFAULT_VAL_SPLIT, by=settings.by, seed=cfg.train.seed,
                   out_dir=str(split_dir), unseen_answers=settings.unseen_answers)
    if settings.test and Path(settings.test).resolve() in (Path(data.train).resolve(), train_file.resolve()):
        raise ConfigError(f"tune: --test {settings.test} is the training data; give rows the search never sees")
    held = dataclasses.replace(data, train=str(train_file), val=str(val_file), val_split=0.0)
    return dataclasses.replace(cfg, data=held), sum(1 for _ in read_rows(str(train_file)))


def _method_fits(cfg: RunConfig):
    """For --space's method choices: the reason a method does not fit in memory, or None."""
    def check(method: str) -> str | None:
        import dataclasses

        from tuneforge.errors import UserError as PlanError
        from tuneforge.plan.estimate import GIB, available_memory, spec_from_config
        from tuneforge.plan.memory import estimate_memory

        try:
            estimate = estimate_memory(spec_from_config(dataclasses.replace(cfg, method=method)))
        except PlanError:
            return None  # not modelled: let the trial find out
        available, what = available_memory(estimate.spec.device)
        if available is not None and estimate.peak > available:
            return f"estimated peak {estimate.peak / GIB:.1f} GiB, {available / GIB:.1f} GiB {what}"
        return None

    return check


def _requeue_interrupted(study) -> None:
    """Trials left running by a killed study: closed as failed ("interrupted") and queued again with their values and
    run directory, so the next `ask` resumes each from its checkpoint instead of starting it over."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        run_dir = trial.user_attrs.get("run_dir")
        study._storage.set_trial_user_attr(trial._trial_id, "error", "interrupted: resumed as a new trial")
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"resume_dir": run_dir} if run_dir else None)


def _tell(study, trial, outcome: TrialOutcome) -> None:
    from optuna.trial import TrialState

    trial.set_user_attr("seconds", round(outcome.seconds, 1))
    if outcome.reason:
        trial.set_user_attr("error" if outcome.state == "failed" else "pruned_by", outcome.reason)
    if outcome.value is not None:
        trial.set_user_attr("best_value", outcome.value)
    if outcome.val_loss is not None:
        trial.set_user_attr("val_loss", outcome.val_loss)
    if outcome.state == "complete" and outcome.value is not None:
        study.tell(trial, outcome.value)
    elif outcome.state == "complete":  # finished without a single evaluation: nothing to compare
        trial.set_user_attr("error", "no evaluation was written")
        study.tell(trial, state=TrialState.FAIL)
    else:
        study.tell(trial, state=TrialState.PRUNED if outcome.state == "pruned" else TrialState.FAIL)


def best_of(trials, maximise: bool):
    """The finished trial with the best metric; among equal ones, the lowest validation loss (then the earliest).
    Why: an exact-match metric saturates (several trials at 1.0 on a small validation set); Optuna's best_trial
    then takes the earliest, while the lower loss is the one more sure of the same answers."""
    finished = [t for t in trials if t.state.name == "COMPLETE" and t.value is not None]
    if not finished:
        return None
    sign = -1.0 if maximise else 1.0
    return min(finished, key=lambda t: (sign * t.value, t.user_attrs.get("val_loss", math.inf), t.number))


def _finished(study) -> int:
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state != TrialState.RUNNING and t.state != TrialState.WAITING
               and not str(t.user_attrs.get("error", "")).startswith("interrupted"))


def _best_value(study) -> float | None:
    try:
        return study.best_value
    except ValueError:  # no trial has completed yet
        return None


def live_line(number: int, values: dict, outcome: TrialOutcome, metric: str, best: float | None) -> str:
    shown = ", ".join(f"{key.split('.')[-1]} {_fmt(value)}" for key, value in values.items())
    value = "-" if outcome.value is None else f"{outcome.value:.4f}"
    end = {"complete": "", "pruned": f" ({outcome.reason})", "failed": f" (failed: {outcome.reason})"}[outcome.state]
    best_text = "" if best is None else f"; best so far {best:.4f}"
    return f"trial {number}: {shown} -> {metric} {value}{end}, {outcome.seconds:.0f} s{best_text}"


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _say(line: str) -> None:
    print(f"tuneforge: tune: {line}", flush=True)


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(value, indent=2), encoding="utf-8")
    tmp.replace(path)


def _finish(study, study_dir: Path, cfg: RunConfig, config_path: str, overrides: list[str], space: SearchSpace,
            settings: TuneSettings, held_out: str) -> StudyResult:
    from tuneforge.tune.report import trial_rows, write_best_file, write_plot, write_report

    rows = trial_rows(study, space)
    best_trial = best_of(study.get_trials(deepcopy=False), settings.metric != "val_loss")
    best_run = Path(best_trial.user_attrs["run_dir"]) if best_trial is not None else None
    best_values = space.overrides(best_trial.params) if best_trial is not None else {}
    test_score = None
    if best_run is not None and settings.test:
        test_score = _score_test(best_run, settings.test, settings.metric)
    best_file = None
    if best_trial is not None:
        best_file = write_best_file(Path(settings.output) if settings.output else study_dir / "best.yaml",
                                    config_path, overrides, best_values, space, best_trial, settings.metric, rows)
    state = json.loads((study_dir / STATE_FILE).read_text(encoding="utf-8"))
    state.update({"best_run": str(best_run) if best_run else None,
                  "best_value": best_trial.value if best_trial else None, "test_score": test_score})
    _write_json(study_dir / STATE_FILE, state)
    write_plot(study_dir / "study.png", rows, space, settings.metric)
    report = write_report(study_dir / "report.md", rows, space, settings, best_trial, test_score, best_file, held_out)
    print(report, flush=True)
    return StudyResult(study_dir, best_run, best_trial.value if best_trial else None, best_values, rows, test_score,
                       best_file)


def _score_test(run: Path, test_file: str, metric: str) -> float:
    """The held-out test rows, once, on the best trial: the one number the search never looked at."""
    from tuneforge.eval.settings import EvalPlan
    from tuneforge.eval.suite import evaluate_one, load_eval_set

    name = "perplexity" if metric == "val_loss" else metric
    result = evaluate_one(str(run), "tuned", EvalPlan(data=test_file, metrics=(name,)),
                          load_eval_set(test_file, (name,)))
    return float(result.scores[name])

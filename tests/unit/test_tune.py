"""`tuneforge tune` on the tiny model: the default space from recommend, --space checked like a config, held-out
discipline (the split, the test rows scored once), a failing trial recorded while the study goes on, and kill -9 in
the middle of a study followed by --resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, run_cli, write_jsonl
from tuneforge.config import load_config

LABELS = ("red", "green", "blue")


def rows(n: int, offset: int = 0) -> list[dict]:
    return [{"instruction": f"Colour number {i}?", "output": LABELS[i % 3], "kind": LABELS[i % 3]}
            for i in range(offset, offset + n)]


def run_file(tmp_path: Path, tiny_model_dir: Path, train_rows: int = 24, **train) -> Path:
    data = write_jsonl(tmp_path / "train.jsonl", rows(train_rows))
    config = {"model": str(tiny_model_dir), "method": "lora", "output_dir": str(tmp_path / "run"),
              "lora": {"dropout": 0.0},
              "data": {"train": str(data), "val_split": 0.25, "max_length": 64},
              "train": {"batch_size": 4, "grad_accum": 1, "epochs": 1, **train}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_default_space_is_centred_on_recommend(tiny_model_dir, tmp_path):
    from tuneforge.plan.recommend import EPOCHS_BY_SIZE, LR_BY_METHOD, _lookup
    from tuneforge.tune.space import default_space

    cfg = load_config(run_file(tmp_path, tiny_model_dir))
    space = default_space(cfg, 500)
    dims = {d.key: d for d in space.dimensions}
    lr = LR_BY_METHOD["lora"][0]
    assert dims["train.lr"].log and math.isclose(dims["train.lr"].low * dims["train.lr"].high, lr * lr)
    assert dims["train.lr"].low < lr < dims["train.lr"].high
    assert dims["lora.r"].choices == (8, 16, 32, 64)
    assert dims["train.epochs"].high == _lookup(EPOCHS_BY_SIZE, 500)[0] and dims["train.epochs"].integer
    assert 0 <= dims["train.warmup_ratio"].low < dims["train.warmup_ratio"].high <= 0.1
    assert space.overrides({"lora.r": 32, "train.lr": 1e-4}) == {"lora.r": 32, "train.lr": 1e-4, "lora.alpha": 64.0}
    full = default_space(load_config(run_file(tmp_path, tiny_model_dir), ["method=full"]), 50_000)
    assert "lora.r" not in full.keys() and full.dimensions[0].low < LR_BY_METHOD["full"][0]


@pytest.mark.parametrize("space, error", [
    ({"train.learning_rate": {"low": 1e-5, "high": 1e-3}}, "unknown key"),
    ({"train.lr": {"low": -1, "high": 1e-3}}, "must be > 0"),
    ({"train.warmup_ratio": {"low": 0.0, "high": 0.5, "log": True}}, "log range needs low > 0"),
    ({"lora.r": []}, "empty list"),
    ({"train.epochs": {"low": 3, "high": 2}}, "low < high"),
], ids=["unknown-key", "bad-bound", "log-from-zero", "no-choices", "empty-range"])
def test_space_file_is_checked_like_a_config(tiny_model_dir, tmp_path, space, error):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(space), encoding="utf-8")
    done = run_cli("tune", str(run_file(tmp_path, tiny_model_dir)), "--space", str(space_file), "--budget", "1m")
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("tuneforge: error")]
    assert len(lines) == 1 and error in lines[0] and str(space_file) in lines[0], done.stderr
    assert not (tmp_path / "run-tune" / "study.db").exists()  # refused before any study starts


def test_method_choices_keep_only_what_fits(tiny_model_dir, tmp_path, capsys):
    from tuneforge.tune.space import load_space

    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump({"method": ["lora", "dora", "full"]}), encoding="utf-8")
    too_big = {"full": "estimated peak 40.0 GiB, 20.0 GiB RAM available"}
    space = load_space(str(space_file), str(run_file(tmp_path, tiny_model_dir)), [], too_big.get)
    assert space.dimensions[0].choices == ("lora", "dora")
    assert "method full left out of the search: estimated peak 40.0 GiB" in capsys.readouterr().out


def test_a_study_searches_on_validation_rows_scores_test_once_and_survives_a_failing_trial(tiny_model_dir,
                                                                                          tmp_path):
    """Two trials, the first of which cannot train (a LoRA target the model lacks: the seeded sampler draws it first);
    --by stratifies the split; the test rows appear in no trial's run file and are scored once, on the best trial."""
    config = run_file(tmp_path, tiny_model_dir, train_rows=30)
    test_file = write_jsonl(tmp_path / "test.jsonl", rows(6, offset=100))
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump({"train.lr": {"low": 1e-3, "high": 3e-3, "log": True},
                                          "lora.target_modules": [["q_proj", "v_proj"], ["no_such_proj"]]}))
    done = run_cli("tune", str(config), "--space", str(space_file), "--trials", "2", "--budget", "10m",
                   "--metric", "exact_match", "--by", "kind", "--test", str(test_file), "--seed", "1")
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    study = tmp_path / "run-tune"
    # The split: stratified by the field, made once, and the only data the trials train and validate on.
    split_val = [json.loads(line)["kind"] for line in (study / "data" / "train.val.jsonl").read_text().splitlines()]
    assert sorted(split_val) == sorted(LABELS * (len(split_val) // 3))  # each class kept in proportion
    trial_files = sorted((study / "trials").glob("*.yaml"))
    assert len(trial_files) == 2
    for path in trial_files:
        trial = yaml.safe_load(path.read_text())
        assert trial["data"]["val"].endswith("train.val.jsonl") and trial["data"]["train"].endswith("train.train.jsonl")
        assert str(test_file) not in path.read_text()
        assert trial["train"]["eval_metric"] == "exact_match"
    report = (study / "report.md").read_text()
    assert "failed" in report and "no_such_proj" in report  # the failing trial, with its one-line reason
    assert "scored once, on the best trial only" in report
    state = json.loads((study / "tune.json").read_text())
    assert state["test_score"] is not None and 0 <= state["test_score"] <= 1
    best = yaml.safe_load((study / "best.yaml").read_text())
    assert best["lora"]["target_modules"] == ["q_proj", "v_proj"]  # the failing value never wins
    assert "# searched train.lr in [0.001, 0.003] (log)" in (study / "best.yaml").read_text()
    assert best["data"]["train"] == str(tmp_path / "train.jsonl")  # the user's data, for the final run
    load_config(study / "best.yaml")  # a run file `tuneforge train` accepts
    assert (study / "study.png").stat().st_size > 1000
    assert "trial 0:" in done.stdout and "trial 1:" in done.stdout  # the live table


def test_kill_9_in_the_middle_of_a_study_then_resume(tiny_model_dir, tmp_path):
    """kill -9 of the study while its second trial trains: that trial checkpoints (it is SIGTERMed when the study
    dies); --resume keeps the finished trial as it was, resumes the interrupted one from its checkpoint and
    finishes the study."""
    config = run_file(tmp_path, tiny_model_dir, train_rows=48, epochs=2)
    study = tmp_path / "run-tune"
    command = [sys.executable, "-m", "tuneforge", "tune", str(config), "--trials", "2", "--budget", "10m",
               "--metric", "val_loss", "--evaluations-per-epoch", "4", "--lr-range-test"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with (tmp_path / "tune.log").open("w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        second = study / "trials" / "0001"
        trial_pid = _pause_after_first_checkpoint(second, process, tmp_path / "tune.log")
        server = _parent_of(trial_pid)  # the study's trial server (tuneforge.tune.trial_process)
        os.kill(process.pid, signal.SIGKILL)  # the study dies while its trial is mid-run
        process.wait()
        _wait_until_exited(server)  # the server exits with the study, and the kernel SIGTERMs the trial then
        os.kill(trial_pid, signal.SIGCONT)
    first_metrics = (study / "trials" / "0000" / "metrics.jsonl").read_bytes()
    range_metrics = (study / "lr-range" / "metrics.jsonl").read_bytes()
    _wait_for_exit(second)  # the orphaned trial got SIGTERM: it checkpoints and stops
    assert json.loads((second / "status.json").read_text())["state"] == "stopped"

    done = run_cli("tune", str(config), "--trials", "2", "--budget", "10m", "--metric", "val_loss",
                   "--evaluations-per-epoch", "4", "--lr-range-test", "--resume")
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    # The range test ran once, before the trials, rising geometrically around recommend's lr; the resumed study
    # reused its range (not rerun), and every trial sampled its lr inside it.
    assert (study / "lr-range" / "metrics.jsonl").read_bytes() == range_metrics
    found = json.loads((study / "tune.json").read_text())["lr_range"]
    from tuneforge.plan.recommend import LR_BY_METHOD
    from tuneforge.tune.lr_range import RANGE_STEPS, loss_curve

    lrs = [lr for lr, _ in loss_curve(study / "lr-range")]
    table_lr = LR_BY_METHOD["lora"][0]
    assert len(lrs) == RANGE_STEPS and all(b > a for a, b in zip(lrs, lrs[1:]))
    assert (lrs[0], lrs[-1]) == (pytest.approx(table_lr / 100, rel=1e-6), pytest.approx(table_lr * 100, rel=1e-6))
    for trial_file in sorted((study / "trials").glob("*.yaml")):
        assert found["low"] <= yaml.safe_load(trial_file.read_text())["train"]["lr"] <= found["high"]
    assert (study / "trials" / "0000" / "metrics.jsonl").read_bytes() == first_metrics  # not rerun
    events = [r.get("event") for r in map(json.loads, (second / "metrics.jsonl").read_text().splitlines())]
    assert "resume" in events  # continued from its checkpoint, not started over
    # Trials fork from a server started with the allocator `tuneforge train` re-executes itself with (make test-tools
    # installs tcmalloc): a trial has the heap a run of its own would have.
    assert "allocator: tcmalloc" in (study / "trials" / "0000.log").read_text()
    assert json.loads((second / "status.json").read_text())["state"] == "finished"
    report = (study / "report.md").read_text()
    assert "interrupted: resumed as a new trial" in report
    assert (study / "best.yaml").is_file()


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _wait_until_exited(pid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return  # exited, not yet reaped
        except FileNotFoundError:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} did not exit after the study was killed")


def _pause_after_first_checkpoint(run: Path, study: subprocess.Popen, log: Path, timeout: float = 240) -> int:
    """The pid of the trial training in `run`, SIGSTOPped just after its first checkpoint. A tiny-model step takes
    ~10 ms and early stopping may end a trial a few steps after its first evaluation, so once the trial trains it
    runs in 2 ms slices (SIGCONT, SIGSTOP): it cannot finish between the checkpoint and the study's kill, however
    fast or slow the machine."""
    from tuneforge.train.checkpoint import latest_checkpoint

    deadline, pid = time.monotonic() + timeout, None
    while True:
        assert study.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the second trial wrote no checkpoint in time"
        if pid is None:
            status = json.loads((run / "status.json").read_text()) if (run / "status.json").exists() else {}
            pid = status.get("pid") if status.get("state") == "running" else None
            if pid is None:
                time.sleep(0.05)
                continue
            os.kill(pid, signal.SIGSTOP)
        if latest_checkpoint(run) is not None:
            return pid
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.002)
        os.kill(pid, signal.SIGSTOP)


def _wait_for_exit(run: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = json.loads((run / "status.json").read_text()) if (run / "status.json").exists() else {}
        pid = status.get("pid")
        if status.get("state") != "running" or pid is None or not _alive(pid):
            return
        time.sleep(0.2)
    raise AssertionError(f"the trial in {run} did not stop after the study was killed")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_dashboard_shows_trials_as_runs_with_the_best_highlighted(tmp_path):
    from tuneforge.ui.runs import find_runs, run_summary

    study = tmp_path / "runs" / "demo-tune"
    for number in ("0000", "0001"):
        trial = study / "trials" / number
        trial.mkdir(parents=True)
        (trial / "config.yaml").write_text("method: lora\n")
    (study / "tune.json").write_text(json.dumps({"settings": {"metric": "exact_match"},
                                                 "best_run": str(study / "trials" / "0001")}))
    rows = {run.name: run_summary(tmp_path / "runs", run) for run in find_runs(tmp_path / "runs")}
    assert rows["0001"]["study"] == {"study": "demo-tune", "metric": "exact_match", "best": True}
    assert rows["0000"]["study"]["best"] is False


def test_the_exponential_schedule_sweeps_four_decades_geometrically():
    from tuneforge.config import TrainSettings
    from tuneforge.train.optim import lr_at

    train = TrainSettings(lr=1e-2, scheduler="exponential", warmup_ratio=0.1)  # no warmup: the sweep starts low
    rates = [lr_at(step, 9, train) for step in range(9)]
    assert rates[0] == pytest.approx(1e-6) and rates[-1] == pytest.approx(1e-2)
    assert all(b / a == pytest.approx(10 ** 0.5) for a, b in zip(rates, rates[1:]))


def _curve(losses: list[float]) -> list[tuple[float, float]]:
    return [(1e-6 * 10 ** (4 * i / (len(losses) - 1)), loss) for i, loss in enumerate(losses)]


def test_the_range_test_moves_the_lr_range_under_the_lowest_smoothed_loss():
    from tuneforge.tune.lr_range import NARROWED_SPAN, narrowed_range

    # Flat, then falling, lowest at step 30 of 40 (lr 1e-3), then diverging to NaN: the range tops out at a third of
    # 1e-3 (a single noisy low step does not move it: the loss is smoothed).
    losses = [2.0] * 10 + [2.0 - 0.06 * i for i in range(1, 21)] + [0.8 + 0.5 * i ** 2 for i in range(8)] + \
        [float("nan")] * 2
    losses[12] = 0.1
    found = narrowed_range(_curve(losses), 5e-5, 8e-4)
    lowest_lr = 1e-6 * 10 ** (4 * 30 / 39)
    assert found.high == pytest.approx(lowest_lr / 3) and found.low == pytest.approx(found.high / NARROWED_SPAN)
    assert "bottomed out" in found.why

    still_falling = narrowed_range(_curve([3.0 - 0.05 * i for i in range(40)]), 5e-5, 8e-4)
    assert still_falling.high == pytest.approx(1e-2 / 3) and "still falling" in still_falling.why

    # A curve that never falls, or one too short to read, keeps recommend's range and says why.
    for losses, reason in (([2.0 + 0.01 * i for i in range(40)], "never fell"), ([2.0, 1.0, float("nan")] * 2,
                                                                                  "only 4 steps")):
        kept = narrowed_range(_curve(losses), 5e-5, 8e-4)
        assert (kept.low, kept.high) == (5e-5, 8e-4) and reason in kept.why


def test_unseen_answers_makes_the_validation_split_by_answer_word(tiny_model_dir, tmp_path):
    """tune --unseen-answers: the trials validate on rows whose answers hold words no training row's answer holds
    (the split itself is tested in test_data_convert_split.py); with data.val given it is refused in one line."""
    from tests.unit.test_data_convert_split import answer_words_of, named_rows
    from tuneforge.errors import ConfigError
    from tuneforge.tune.settings import TuneSettings
    from tuneforge.tune.study import _held_out_split, validation_source

    named = write_jsonl(tmp_path / "named.jsonl", named_rows())
    cfg = load_config(run_file(tmp_path, tiny_model_dir), [f"data.train={named}"])
    settings = TuneSettings(unseen_answers=True)
    held, train_rows = _held_out_split(cfg, settings, tmp_path / "study")
    train = [json.loads(line) for line in Path(held.data.train).read_text().splitlines()]
    val = [json.loads(line) for line in Path(held.data.val).read_text().splitlines()]
    seen = set().union(*map(answer_words_of, train))
    assert train_rows == len(train) and len(val) in range(45, 56)  # data.val_split 0.25 of 200
    assert all(answer_words_of(row) - seen for row in val)
    assert "held out by answer word" in validation_source(cfg, settings)
    with pytest.raises(ConfigError, match="--unseen-answers shapes the split tune makes; this run file names data.val"):
        _held_out_split(load_config(overrides=[f"model={tiny_model_dir}", f"data.train={held.data.train}",
                                               f"data.val={held.data.val}"]), settings, tmp_path / "other")


def _trial(number: int, value: float, val_loss: float | None, state: str = "COMPLETE"):
    from types import SimpleNamespace

    return SimpleNamespace(number=number, value=value, state=SimpleNamespace(name=state),
                           user_attrs={} if val_loss is None else {"val_loss": val_loss})


def test_a_saturated_metric_picks_the_tied_trial_with_the_lowest_validation_loss():
    from tuneforge.tune.study import best_of

    trials = [_trial(0, 0.5, 0.9), _trial(1, 1.0, 0.40), _trial(2, 1.0, 0.25), _trial(3, 1.0, 0.30),
              _trial(4, 2.0, 0.1, state="PRUNED")]
    assert best_of(trials, maximise=True).number == 2  # Optuna's own best_trial: 1, the earliest of the tie
    assert best_of(trials[:1] + [_trial(1, 1.0, None), _trial(2, 1.0, 0.3)], maximise=True).number == 2
    assert best_of(trials, maximise=False).number == 0
    assert best_of([_trial(0, 1.0, 0.1, state="FAIL")], maximise=True) is None


def test_no_trial_is_pruned_before_the_end_of_its_first_epoch():
    """An exact-match trial still at 0 at its first evaluation (the format not yet learned) runs on; at the end of
    its first epoch, worse than the median of the earlier trials, it is pruned."""
    import optuna

    from tuneforge.tune.study import pruner

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=pruner(first_epoch_step=8))
    for _ in range(2):  # the two startup trials, which learn by step 4
        trial = study.ask()
        for step, value in ((4, 0.5), (8, 0.8), (12, 0.9)):
            trial.report(value, step)
        study.tell(trial, 0.9)
    slow = study.ask()
    slow.report(0.0, 4)
    assert not slow.should_prune()
    slow.report(0.1, 8)
    assert slow.should_prune()


def test_a_range_test_stopped_by_the_budget_keeps_recommends_range(tmp_path, monkeypatch):
    """A test cut short saw only the low rates: narrowing from its partial curve would move the range far below the
    best rate (seen on the demo: 7e-6..6e-5 from a test that reached 1.8e-4), so the default range is kept."""
    from tuneforge import run_dir as layout
    from tuneforge.tune import lr_range, trials

    def stopped_early(config, run_dir, *args, **kwargs):
        run_dir.mkdir(parents=True)
        for step, (lr, loss) in enumerate(_curve([3.0 - 0.05 * i for i in range(40)])[:15], start=1):
            layout.append_metrics(run_dir, {"step": step, "lr": lr, "loss": loss})
        return trials.TrialOutcome("pruned", None, reason="pruned: the budget ended")

    monkeypatch.setattr(trials, "run_trial", stopped_early)
    found = lr_range.run_range_test({"train": {}}, tmp_path, 2e-4, 5e-5, 8e-4, deadline=0.0, on_poll=lambda: None)
    assert (found.low, found.high) == (5e-5, 8e-4) and "stopped by the budget after 15 of 40 steps" in found.why
    assert narrow_without_the_guard(tmp_path) != (5e-5, 8e-4)  # what the partial curve alone would have given


def narrow_without_the_guard(study: Path) -> tuple[float, float]:
    from tuneforge.tune.lr_range import TEST_DIR, loss_curve, narrowed_range

    found = narrowed_range(loss_curve(study / TEST_DIR), 5e-5, 8e-4)
    return found.low, found.high

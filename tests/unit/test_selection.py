"""judge(): the best-so-far bookkeeping, early stopping and the forgetting guard, on hand-made evaluations."""

from __future__ import annotations

from tuneforge.config import load_config
from tuneforge.train.loop import TrainerState
from tuneforge.train.selection import Evaluation, judge


def _train_settings(*overrides):
    return load_config(None, list(overrides)).train


def _eval(step, loss, score=None, **by_source):
    return Evaluation(step, loss, by_source or {"task": loss}, loss if score is None else score)


def test_best_and_patience():
    t = _train_settings("train.early_stopping_patience=2")
    state = TrainerState()
    assert judge(state, _eval(1, 2.0), t).improved and state.best_val == 2.0
    assert judge(state, _eval(2, 1.5), t).improved and (state.best_val, state.evals_without_gain) == (1.5, 0)
    first = judge(state, _eval(3, 1.6), t)
    assert not first.improved and first.stop_message is None and state.evals_without_gain == 1
    second = judge(state, _eval(4, 1.5), t)  # equal is not better
    assert second.stop_message.startswith("early stopping at step 4: no val_loss improvement in 2 evaluations")
    assert state.best_val == 1.5


def test_without_patience_the_run_never_stops():
    t = _train_settings()
    state = TrainerState()
    judge(state, _eval(1, 1.0), t)
    assert all(judge(state, _eval(s, 2.0), t).stop_message is None for s in range(2, 10))


def test_best_follows_the_score_not_the_loss():
    # early_stopping_metric=eval_metric: the score is -metric, so a higher loss with a better metric is the new best
    t = _train_settings("train.eval_metric=exact_match", "train.early_stopping_metric=eval_metric")
    state = TrainerState()
    judge(state, _eval(1, 1.0, score=-0.2), t)
    assert judge(state, _eval(2, 1.3, score=-0.5), t).improved and state.best_val == 1.3


def test_guard_stops_above_its_limit_and_such_a_model_is_never_best():
    t = _train_settings("train.guard.source=general", "train.guard.max_increase=0.1")
    state = TrainerState(guard_baseline=2.0, best_val=3.0, best_score=3.0)
    within = judge(state, _eval(5, 1.0, task=0.5, general=2.2), t)  # exactly at the limit: still allowed
    assert within.improved and within.stop_message is None
    over = judge(state, _eval(10, 0.5, task=0.1, general=2.21), t)
    assert not over.improved and state.best_val == 1.0
    assert over.record == {"step": 10, "guard_stop": "general", "guard_loss": 2.21, "guard_limit": 2.2}
    assert over.stop_message.startswith("forgetting guard at step 10: general validation loss 2.2100 is more than 10%")

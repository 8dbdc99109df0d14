"""What follows from a validation: is this the best model so far, and should the run stop (early stopping, the
forgetting guard)? Pure bookkeeping on the trainer state, so the loop only acts on the verdict."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Evaluation:
    step: int
    val_loss: float  # overall answer-token mean
    by_source: dict[str, float]  # per validation source
    score: float  # what "best" follows, lower is better: val_loss, or -eval_metric


@dataclass(frozen=True)
class Verdict:
    improved: bool  # a new best: the loop keeps these weights
    stop_message: str | None = None  # set when the run stops here, keeping the best weights
    record: dict | None = None  # a metrics line saying why, when the guard stopped it


def judge(state, evaluation: Evaluation, train) -> Verdict:
    """Updates `state`'s best-so-far bookkeeping (best_val, best_score, evals_without_gain) from `evaluation`, under
    the settings `train` (early_stopping_patience, early_stopping_metric, guard)."""
    guard = train.guard.source
    if guard:
        # The guard compares with the guarded source's loss before any update (state.guard_baseline); a model past
        # the limit never becomes "best", whatever its other scores.
        limit = state.guard_baseline * (1 + train.guard.max_increase)
        loss = evaluation.by_source[guard]
        if loss > limit:
            return Verdict(False, f"forgetting guard at step {evaluation.step}: {guard} validation loss {loss:.4f} is "
                                  f"more than {train.guard.max_increase:.0%} above its step-0 value "
                                  f"{state.guard_baseline:.4f}; stopping with the best weights that stayed within it",
                           {"step": evaluation.step, "guard_stop": guard, "guard_loss": loss, "guard_limit": limit})
    if state.best_score is None or evaluation.score < state.best_score:
        state.best_val, state.best_score, state.evals_without_gain = evaluation.val_loss, evaluation.score, 0
        return Verdict(True)
    state.evals_without_gain += 1
    patience = train.early_stopping_patience
    if patience and state.evals_without_gain >= patience:
        return Verdict(False, f"early stopping at step {evaluation.step}: no {train.early_stopping_metric} improvement "
                              f"in {state.evals_without_gain} evaluations; keeping the best weights")
    return Verdict(False)

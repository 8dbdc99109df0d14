"""The review summary equals a direct computation on the saved ratings: numpy means, scipy's t-interval, counted
preferences; later lines for a prompt supersede earlier ones."""

from __future__ import annotations

import random

import numpy as np
import pytest
from scipy import stats

from tuneforge.ui.review_stats import CRITERIA, mean_interval, summarize
from tuneforge.ui.review_store import append_ratings, read_ratings


def random_line(rng: random.Random, prompt: int) -> dict:
    return {"prompt": prompt, "preferred": rng.choice(["A", "B", "tie"]),
            "ratings": {s: {c: rng.randint(1, 5) for c in CRITERIA} for s in ("A", "B")}}


def test_summary_equals_direct_computation_on_the_saved_file(tmp_path):
    rng = random.Random(7)
    lines = [random_line(rng, p) for p in range(12)]
    lines += [random_line(rng, p) for p in (3, 5, 3)]  # re-rated: the last line of each prompt counts
    append_ratings(tmp_path, lines[:6])
    append_ratings(tmp_path, lines[6:])

    summary = summarize(read_ratings(tmp_path))

    latest = {}
    for line in lines:
        latest[line["prompt"]] = line
    assert summary["prompts_rated"] == 12
    for criterion in CRITERIA:
        for system in ("A", "B"):
            values = np.array([latest[p]["ratings"][system][criterion] for p in range(12)], dtype=float)
            low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
            got = summary["criteria"][criterion][system]
            assert got["n"] == 12
            assert got["mean"] == pytest.approx(values.mean(), abs=1e-12)
            assert (got["low"], got["high"]) == pytest.approx((low, high), abs=1e-9)
    preferred = [latest[p]["preferred"] for p in range(12)]
    wins_a, wins_b, ties = preferred.count("A"), preferred.count("B"), preferred.count("tie")
    assert summary["preferred"] == {"A": wins_a, "B": wins_b, "tie": ties}
    assert summary["win_rate"]["A"] == pytest.approx((wins_a + ties / 2) / 12)
    assert summary["win_rate"]["A"] + summary["win_rate"]["B"] == pytest.approx(1)


def test_small_samples_have_no_interval_rather_than_a_made_up_one():
    assert mean_interval([]) == {"n": 0, "mean": None, "low": None, "high": None}
    assert mean_interval([4.0]) == {"n": 1, "mean": 4.0, "low": None, "high": None}
    same = mean_interval([3.0, 3.0, 3.0])
    assert same["low"] == same["high"] == 3.0
    assert summarize([])["win_rate"] == {"A": None, "B": None}

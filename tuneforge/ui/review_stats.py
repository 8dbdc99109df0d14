"""The review summary, from the ratings that count (the latest per prompt): pure functions, no files.

Per criterion and system: the mean 1-5 score with a two-sided 95% Student t confidence interval,
mean ± t(0.975, n-1) · s / sqrt(n) with s the sample standard deviation (n-1 in the denominator). The t interval
rather than a bootstrap because reviews are small (a bootstrap of 10 ratings understates its own uncertainty) and
because it is the same number anyone can recompute from the sheet. With one rating there is no interval (None).

Win rate of each system: (wins + ties / 2) / prompts — a tie counts half to each side, so the two rates add to 1;
wins, losses and ties are reported too.
"""

from __future__ import annotations

import math

CRITERIA = ("relevance", "correctness", "helpfulness", "safety", "format")
SYSTEMS = ("A", "B")
PREFERENCES = ("A", "B", "tie")
CONFIDENCE = 0.95


def latest_per_prompt(lines: list[dict]) -> dict[int, dict]:
    """{prompt index: its last rating line}: a later line for the same prompt supersedes earlier ones."""
    latest: dict[int, dict] = {}
    for line in lines:
        latest[line["prompt"]] = line
    return dict(sorted(latest.items()))


def mean_interval(values: list[float]) -> dict:
    """{"n", "mean", "low", "high"}: the mean and its 95% t-interval (low/high None below two values)."""
    from scipy.stats import t

    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "low": None, "high": None}
    mean = sum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "low": None, "high": None}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half}


def summarize(lines: list[dict]) -> dict:
    """The summary of a review's rating lines (ratings.jsonl rows, in file order)."""
    latest = list(latest_per_prompt(lines).values())
    criteria = {criterion: {system: mean_interval([float(r["ratings"][system][criterion]) for r in latest])
                            for system in SYSTEMS}
                for criterion in CRITERIA}
    counts = {choice: sum(r["preferred"] == choice for r in latest) for choice in PREFERENCES}
    rated = len(latest)
    win_rate = {system: (counts[system] + counts["tie"] / 2) / rated if rated else None for system in SYSTEMS}
    return {"prompts_rated": rated, "criteria": criteria, "preferred": counts, "win_rate": win_rate,
            "interval": f"two-sided {CONFIDENCE:.0%} Student t interval of the mean",
            "win_rate_rule": "(wins + ties/2) / prompts rated"}

"""What `tuneforge eval` shows and writes: examples side by side, a score table with deltas, and files in --out.

--out holds `examples.jsonl` (every held-out prompt, reference, each model's answer and its per-example scores, the
judge's verdicts), `summary.json` (all scores, deltas, settings), `table.txt` (what was printed), and
`humaneval_<label>.jsonl` / `mc_<label>.jsonl` (per problem / question) when those ran.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

from tuneforge.eval.suite import EvalSet, ModelEval

# Scores where lower is better; everything else (accuracies, ROUGE, BLEU, pass@k, ratings) is higher-is-better.
LOWER_IS_BETTER = ("perplexity", "answer_loss", "general_perplexity")
# Counts and sizes: shown, but no model is "better" on them.
NEUTRAL = ("humaneval_problems", "preference_pairs")


def better(metric: str, tuned: float, base: float) -> str:
    if metric in NEUTRAL or any(math.isnan(v) for v in (tuned, base)) or tuned == base:
        return ""
    tuned_wins = tuned < base if metric in LOWER_IS_BETTER else tuned > base
    return "tuned" if tuned_wins else "base"


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"


def score_table(results: list[ModelEval]) -> str:
    """One line per metric: each model's score and, with a baseline, tuned - base and which is better."""
    metrics = list(dict.fromkeys(m for r in results for m in r.scores))
    width = max([28] + [len(m) + 2 for m in metrics])
    header = f"{'metric':<{width}}" + "".join(f"{r.label:>14}" for r in results)
    if len(results) == 2:
        header += f"{'delta':>14}  better"
    lines = [header, "-" * len(header)]
    for metric in metrics:
        values = [r.scores.get(metric) for r in results]
        line = f"{metric:<{width}}" + "".join(f"{_fmt(v):>14}" for v in values)
        if len(results) == 2 and None not in values:
            line += f"{_fmt(values[0] - values[1]):>14}  {better(metric, values[0], values[1])}"
        lines.append(line)
    return "\n".join(lines)


def examples_text(eval_set: EvalSet, results: list[ModelEval], show: int) -> str:
    lines = []
    for i in range(min(show, len(eval_set.prompts)) if results and results[0].replies else 0):
        lines.append(f"--- example {i + 1}: {textwrap.shorten(eval_set.prompts[i][-1]['content'], 110)}")
        lines.append(f"    {'expected':<9} {eval_set.references[i]}")
        for r in results:
            lines.append(f"    {r.label:<9} {textwrap.shorten(r.replies[i], 200) or '(empty)'}")
    return "\n".join(lines)


def judge_text(judge_summary: dict[str, float], judge_model: str) -> str:
    if "judge_win_rate" not in judge_summary:
        return ""
    s = judge_summary
    return (f"judge {judge_model} (pairwise, both orders): tuned wins {s['judge_wins']:.0f}, ties {s['judge_ties']:.0f},"
            f" loses {s['judge_losses']:.0f} ({s['judge_unparsed']:.0f} unreadable verdicts); "
            f"win rate {s['judge_win_rate']:.1%}")


def forgetting_text(results: list[ModelEval]) -> str:
    if len(results) != 2 or "general_perplexity" not in results[0].scores:
        return ""
    tuned, base = results[0].scores["general_perplexity"], results[1].scores["general_perplexity"]
    return (f"forgetting check: general-text perplexity {base:.3f} (base) -> {tuned:.3f} (tuned), "
            f"{tuned / base - 1:+.1%}")


def report_text(eval_set: EvalSet | None, results: list[ModelEval], judge_summary: dict[str, float],
                judge_model: str | None, show: int) -> str:
    parts = [examples_text(eval_set, results, show) if eval_set else "", score_table(results),
             forgetting_text(results), judge_text(judge_summary, judge_model or "")]
    return "\n\n".join(p for p in parts if p)


def write_outputs(out_dir: Path, eval_set: EvalSet | None, results: list[ModelEval], judge_summary: dict[str, float],
                  judge_records: list[dict], settings: dict, table: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if eval_set is not None and results and results[0].replies:
        with (out_dir / "examples.jsonl").open("w", encoding="utf-8") as fh:
            for i, (prompt, reference) in enumerate(zip(eval_set.prompts, eval_set.references)):
                row = {"index": i, "prompt": prompt, "reference": reference,
                       "outputs": {r.label: r.replies[i] for r in results},
                       "scores": {r.label: r.per_example[i] for r in results}}
                if judge_records:
                    row["judge"] = judge_records[i]
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    for r in results:
        for kind, records in r.records.items():
            with (out_dir / f"{kind}_{r.label}.jsonl").open("w", encoding="utf-8") as fh:
                for record in records:
                    fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    summary = {"models": {r.label: {"name": r.name, "scores": r.scores} for r in results}, "settings": settings}
    if len(results) == 2:
        tuned, base = results
        summary["deltas"] = {m: tuned.scores[m] - base.scores[m] for m in tuned.scores if m in base.scores}
    if judge_summary:
        summary["judge"] = judge_summary
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out_dir / "table.txt").write_text(table + "\n", encoding="utf-8")

"""What a study shows: the table of trials, the plot of the metric against each searched value, best.yaml."""

from __future__ import annotations

from pathlib import Path

import yaml

from tuneforge.config import apply_overrides, set_dotted
from tuneforge.tune.space import SearchSpace


STATE_NAMES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
               "WAITING": "waiting"}


def trial_rows(study, space: SearchSpace) -> list[dict]:
    """One row per trial, in order: number, searched values, metric, state, seconds, why it ended early."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        value = trial.value if trial.value is not None else trial.user_attrs.get("best_value")
        rows.append({"number": trial.number, "values": space.overrides(trial.params), "value": value,
                     "state": STATE_NAMES.get(trial.state.name, trial.state.name.lower()),
                     "seconds": trial.user_attrs.get("seconds"),
                     "note": trial.user_attrs.get("pruned_by") or trial.user_attrs.get("error") or "",
                     "run_dir": trial.user_attrs.get("run_dir")})
    return rows


def table(rows: list[dict], metric: str, best_number: int | None) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row["values"]))
    lines = ["| trial | " + " | ".join(keys) + f" | {metric} | state | time | note |",
             "|---|" + "---|" * (len(keys) + 4)]
    for row in rows:
        mark = " (best)" if row["number"] == best_number else ""
        cells = [_fmt(row["values"].get(k, "")) for k in keys]
        value = "-" if row["value"] is None else f"{row['value']:.4f}"
        seconds = "-" if row["seconds"] is None else f"{row['seconds']:.0f} s"
        lines.append(f"| {row['number']}{mark} | " + " | ".join(cells) + f" | {value} | {row['state']} | {seconds} | "
                     f"{row['note']} |")
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def write_report(path: Path, rows: list[dict], space: SearchSpace, settings, best_trial, test_score,
                 best_file, held_out: str) -> str:
    best_number = best_trial.number if best_trial is not None else None
    lines = [f"# tune: {len(rows)} trials, {settings.metric} on the validation rows (budget {settings.budget})", "",
             f"Validation rows: {held_out}; the trials train on the rest.", "",
             f"Space ({space.source}): " + "; ".join(d.describe() for d in space.dimensions), "",
             table(rows, settings.metric, best_number), ""]
    if best_trial is None:
        lines.append("No trial finished inside the budget: give it more time (--budget) or fewer epochs.")
    else:
        loss = best_trial.user_attrs.get("val_loss")
        ties = sum(1 for r in rows if r["state"] == "complete" and r["value"] == best_trial.value) - 1
        tie_note = (f" ({ties} other finished trial{'s' if ties > 1 else ''} reached it too: the lowest validation "
                    f"loss, {loss:.4f}, breaks the tie)" if ties > 0 and loss is not None else "")
        lines.append(f"Best: trial {best_number}, {settings.metric} {best_trial.value:.4f} on the validation rows"
                     f"{tie_note}; run file {best_file}.")
    if test_score is not None:
        lines.append(f"Test ({settings.test}): {settings.metric if settings.metric != 'val_loss' else 'perplexity'} "
                     f"{test_score:.4f}, scored once, on the best trial only; the search never saw these rows.")
    elif settings.test:
        lines.append(f"Test ({settings.test}): not scored, no trial finished.")
    else:
        lines.append("No --test rows were given: the validation figure above is what the search optimised, so it "
                     "reads a little high; score a held-out set once to know.")
    text = "\n".join(lines) + "\n"
    path.write_text(text, encoding="utf-8")
    return text


def write_plot(path: Path, rows: list[dict], space: SearchSpace, metric: str) -> None:
    """The metric against each searched value; pruned and failed trials hollow (their best evaluation so far)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = space.keys()
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
    for ax, dim in zip(axes[0], space.dimensions):
        for state, style in (("complete", {"color": "C0"}), ("pruned", {"facecolors": "none", "edgecolors": "C1"}),
                             ("failed", {"facecolors": "none", "edgecolors": "C3"})):
            points = [(r["values"][dim.key], r["value"]) for r in rows
                      if r["state"] == state and r["value"] is not None and dim.key in r["values"]]
            if points:
                ax.scatter([str(x) if dim.choices else x for x, _ in points], [y for _, y in points], label=state,
                           **style)
        if dim.log:
            ax.set_xscale("log")
        ax.set_xlabel(dim.key)
        ax.set_ylabel(metric)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_best_file(path: Path, config_path: str, overrides: list[str], values: dict, space: SearchSpace,
                    best_trial, metric: str, rows: list[dict]) -> Path:
    """The user's run file with the best trial's values, each with a comment saying what was searched and found."""
    raw = (yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}) if config_path else {}
    apply_overrides(raw, overrides)  # as load_config read them for the trials
    for key, value in values.items():
        set_dotted(raw, key, value)
    text = yaml.safe_dump(raw, sort_keys=False)
    finished = sum(1 for r in rows if r["state"] == "complete")
    comments = {key: (f"searched {space.why(key)}" if space.why(key) else "follows lora.r (alpha = 2 x r)")
                for key in values}
    header = (f"# tuneforge tune: trial {best_trial.number} of {len(rows)} ({finished} finished), {metric} "
              f"{best_trial.value:.4f} on the validation rows\n")
    path.write_text(header + _comment_lines(text, comments), encoding="utf-8")
    return path


def _comment_lines(text: str, comments: dict[str, str]) -> str:
    """A comment after each line of `text` (block YAML) whose dotted key is in `comments`."""
    out, path = [], []
    for line in text.splitlines():
        stripped = line.lstrip(" ")
        depth = (len(line) - len(stripped)) // 2
        if ":" in stripped and not stripped.startswith("- "):
            key = stripped.split(":", 1)[0]
            path = path[:depth] + [key]
            dotted = ".".join(path)
            if dotted in comments and stripped.split(":", 1)[1].strip():
                line = f"{line}  # {comments[dotted]}"
        out.append(line)
    return "\n".join(out) + "\n"

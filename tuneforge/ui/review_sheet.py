"""A review as a CSV sheet, for reviewers without the UI: `tuneforge review export` and `tuneforge review import`.

The sheet is as blind as the page: answers by position (answer_1, answer_2) in the review's stored order, one
column per criterion and position (relevance_1 ... format_2) and `preferred` (1, 2 or tie). Saved ratings are filled
in. On import every row is checked before anything is written: one bad cell stops the import with its row and
column named, and appends nothing. Rows left blank are not rated yet and are skipped; rows equal to the rating
already saved are skipped too, so importing the same sheet twice adds nothing.
"""

from __future__ import annotations

import csv
from pathlib import Path

from tuneforge.errors import UserError
from tuneforge.run_dir import REVIEWS_DIR, reviews_dir
from tuneforge.ui.review_stats import CRITERIA
from tuneforge.ui.review_store import (REVIEW_FILE, append_ratings, blind_items, latest_ratings,
                                       load_review, positions_to_line, score_problem)

SCORE_COLUMNS = [f"{criterion}_{position}" for position in (1, 2) for criterion in CRITERIA]
COLUMNS = ["review", "prompt", "question", "answer_1", "answer_2", *SCORE_COLUMNS, "preferred"]


def find_review(run_or_review: Path) -> Path:
    """The review folder: `run_or_review` itself, or the newest review of the run directory it names."""
    if (run_or_review / REVIEW_FILE).is_file():
        return run_or_review.resolve()
    reviews = sorted(reviews_dir(run_or_review).glob(f"*/{REVIEW_FILE}"))
    if not reviews:
        raise UserError(f"{run_or_review}: neither a review folder (with {REVIEW_FILE}) nor a run with reviews "
                        f"under {REVIEWS_DIR}/ (start one in `tuneforge ui`)")
    return reviews[-1].parent.resolve()


def _review_of(folder: Path) -> dict:
    return load_review(folder.parent.parent, folder.name)


def export_sheet(folder: Path, out: Path) -> int:
    """Write the sheet; the number of prompts in it."""
    review = _review_of(folder)
    if review["state"] != "ready":
        raise UserError(f"review {folder}: answers are not ready yet (state {review['state']})")
    items = blind_items(review, latest_ratings(folder))
    with out.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for item in items:
            row = {"review": str(folder), "prompt": item["index"], "question": _question_text(item["prompt"]),
                   "answer_1": item["answers"][0], "answer_2": item["answers"][1]}
            saved = item["saved"]
            if saved:
                row |= {f"{c}_{p}": saved["ratings"][str(p)][c] for p in (1, 2) for c in CRITERIA}
                row["preferred"] = saved["preferred"]
            writer.writerow(row)
    return len(items)


def _question_text(prompt: list[dict]) -> str:
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def import_sheet(sheet: Path, into: Path | None = None) -> tuple[Path, int]:
    """Append the sheet's new ratings to its review (or to `into`); (review folder, lines appended)."""
    with sheet.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ["prompt", *SCORE_COLUMNS, "preferred"] if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{sheet}: missing column {missing[0]} (a sheet from `tuneforge review export` has "
                            f"{', '.join(COLUMNS)})")
        rows = list(reader)
    folder = into.resolve() if into else _one_review_folder(sheet, rows)
    review = _review_of(folder)
    latest = latest_ratings(folder)
    lines = []
    for row_number, row in enumerate(rows, start=2):  # row 1 is the header
        line = _row_line(sheet, row_number, row, review)
        if line is None:
            continue
        saved = latest.get(line["prompt"])
        if saved and saved["ratings"] == line["ratings"] and saved["preferred"] == line["preferred"]:
            continue
        lines.append(line)
    if lines:
        append_ratings(folder, lines)
    return folder, len(lines)


def _one_review_folder(sheet: Path, rows: list[dict]) -> Path:
    named = {row.get("review", "") for row in rows}
    if len(named) != 1 or not next(iter(named)):
        raise UserError(f"{sheet}: the review column must name one review folder in every row (or give --into)")
    folder = Path(next(iter(named)))
    if not (folder / REVIEW_FILE).is_file():
        raise UserError(f"{sheet}: review folder {folder} not found here (give its new place with --into)")
    return folder


def _row_line(sheet: Path, row_number: int, row: dict, review: dict) -> dict | None:
    """The rating line of one sheet row; None for a row not rated yet; UserError naming row and column otherwise."""
    cells = {column: (row.get(column) or "").strip() for column in [*SCORE_COLUMNS, "preferred"]}
    if not any(cells.values()):
        return None

    def refuse(column: str, why: str) -> UserError:
        return UserError(f"{sheet} row {row_number}, column {column}: {why}")

    prompt_text = (row.get("prompt") or "").strip()
    if not prompt_text.isdigit() or int(prompt_text) >= len(review["items"]):
        raise refuse("prompt", f"expected a prompt index from 0 to {len(review['items']) - 1}, got {prompt_text!r}")
    scores: dict[str, int] = {}
    for column in SCORE_COLUMNS:
        text = cells[column]
        value = int(text) if text.isdigit() else text
        if score_problem(value):  # quoted as typed in the sheet
            raise refuse(column, f"expected a whole number from 1 to 5, got {text!r}")
        scores[column] = value
    if cells["preferred"] not in ("1", "2", "tie"):
        raise refuse("preferred", f"expected 1, 2 or tie, got {cells['preferred']!r}")
    by_position = {str(p): {c: scores[f"{c}_{p}"] for c in CRITERIA} for p in (1, 2)}
    return positions_to_line(review, int(prompt_text), by_position, cells["preferred"], "csv")

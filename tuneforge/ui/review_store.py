"""A review on disk: `<run>/reviews/<id>/review.json` (prompts, both systems' answers, the blind order) and
`ratings.jsonl` beside it (append-only, one fsync'd line per saved rating; a later line for the same prompt
supersedes earlier ones, so nothing is ever rewritten and a crash loses at most the line being written).

The two systems are "A" and "B" in the files. The reviewer sees positions 1 and 2: each prompt's order is drawn once,
when the review is created, and stored, so a reload shows the same answer in the same place.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path

from tuneforge.data.atomic_write import atomic_text_writer
from tuneforge.errors import UserError
from tuneforge.run_dir import REVIEWS_DIR, read_jsonl, reviews_dir
from tuneforge.ui.confine import child_name
from tuneforge.ui.review_stats import CRITERIA, SYSTEMS, latest_per_prompt

REVIEW_FILE = "review.json"
RATINGS_FILE = "ratings.jsonl"

_append_lock = threading.Lock()  # one writer at a time per process: lines never interleave


def review_dir(run: Path, review_id: str) -> Path:
    return reviews_dir(run) / child_name(review_id, "review")


def list_reviews(run: Path) -> list[dict]:
    reviews = []
    for path in sorted(reviews_dir(run).glob(f"*/{REVIEW_FILE}"), reverse=True):
        review = json.loads(path.read_text(encoding="utf-8"))
        reviews.append({key: review[key] for key in ("id", "created", "state", "systems", "source")} |
                       {"prompts": len(review["items"]), "rated": len(latest_ratings(path.parent))})
    return reviews


def create_review(run: Path, prompts: list[list[dict]], references: list[str], systems: dict[str, dict],
                  source: str, settings: dict) -> dict:
    """A new review (state "generating", no answers yet) with each prompt's blind order drawn and stored."""
    draw = random.SystemRandom()
    review_id = time.strftime("%Y%m%d-%H%M%S") + f"-{draw.randrange(16 ** 4):04x}"
    items = [{"index": i, "prompt": prompt, "reference": reference, "answers": {},
              "order": draw.sample(SYSTEMS, 2)}  # order[0] is shown as answer 1
             for i, (prompt, reference) in enumerate(zip(prompts, references))]
    review = {"id": review_id, "created": time.time(), "state": "generating", "progress": "", "error": None,
              "systems": systems, "source": source, "settings": settings, "items": items}
    review_dir(run, review_id).mkdir(parents=True)
    save_review(run, review)
    return review


def save_review(run: Path, review: dict) -> None:
    with atomic_text_writer(review_dir(run, review["id"]) / REVIEW_FILE) as fh:
        json.dump(review, fh, ensure_ascii=False, indent=1)


def load_review(run: Path, review_id: str) -> dict:
    path = review_dir(run, review_id) / REVIEW_FILE
    if not path.is_file():
        raise UserError(f"review {review_id!r}: not found in {run.name}/{REVIEWS_DIR}")
    return json.loads(path.read_text(encoding="utf-8"))


def score_problem(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 5:
        return f"expected a whole number from 1 to 5, got {value!r}"
    return None


def append_ratings(folder: Path, lines: list[dict]) -> None:
    """Append rating lines and fsync them: once this returns they survive a crash or power cut."""
    path = folder / RATINGS_FILE
    text = "".join(json.dumps({"time": round(time.time(), 3), **line}, ensure_ascii=False) + "\n" for line in lines)
    with _append_lock, path.open("a+", encoding="utf-8") as fh:
        if fh.tell() > 0:  # a line cut short by a crash must not swallow the next one
            fh.seek(fh.tell() - 1)
            if fh.read(1) != "\n":
                text = "\n" + text
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def read_ratings(folder: Path) -> list[dict]:
    """All rating lines in file order; a line cut short by a crash is skipped."""
    return read_jsonl(folder / RATINGS_FILE)


def latest_ratings(folder: Path) -> dict[int, dict]:
    return latest_per_prompt(read_ratings(folder))


def from_positions(review: dict, body: dict) -> dict:
    """A rating sent by the page (answers "1" and "2", preferred "1"/"2"/"tie") as a stored line (systems A/B)."""
    index = body.get("prompt")
    if not isinstance(index, int) or not 0 <= index < len(review["items"]):
        raise UserError(f"prompt: expected an index from 0 to {len(review['items']) - 1}, got {index!r}")
    ratings, preferred = body.get("ratings"), body.get("preferred")
    if not isinstance(ratings, dict) or not all(isinstance(ratings.get(p), dict) for p in ("1", "2")):
        raise UserError(f"prompt {index}: ratings must hold answers 1 and 2, each with {', '.join(CRITERIA)}")
    for position in ("1", "2"):  # problems are named by position: the reviewer must not learn which system it is
        for criterion in CRITERIA:
            problem = score_problem(ratings[position].get(criterion))
            if problem:
                raise UserError(f"prompt {index}, answer {position}, {criterion}: {problem}")
    if preferred not in ("1", "2", "tie"):
        raise UserError(f"prompt {index}, preferred: expected 1, 2 or tie, got {preferred!r}")
    return positions_to_line(review, index, ratings, preferred, "ui")


def positions_to_line(review: dict, index: int, ratings: dict, preferred: str, source: str) -> dict:
    """Checked scores by position ({"1": {criterion: score}, "2": ...}, preferred "1"/"2"/"tie") as a stored line."""
    order = review["items"][index]["order"]
    return {"prompt": index, "ratings": {order[p]: {c: ratings[str(p + 1)][c] for c in CRITERIA} for p in range(2)},
            "preferred": "tie" if preferred == "tie" else order[int(preferred) - 1], "source": source}


def blind_items(review: dict, latest: dict[int, dict]) -> list[dict]:
    """The prompts as the reviewer sees them: answers by position only, with any saved rating mapped back."""
    shown = []
    for item in review["items"]:
        order = item["order"]
        saved = latest.get(item["index"])
        rating = None
        if saved:
            preferred = saved["preferred"]
            rating = {"ratings": {str(p + 1): saved["ratings"][order[p]] for p in range(2)},
                      "preferred": "tie" if preferred == "tie" else str(order.index(preferred) + 1)}
        shown.append({"index": item["index"], "prompt": item["prompt"],
                      "answers": [item["answers"].get(order[p], "") for p in range(2)], "saved": rating})
    return shown

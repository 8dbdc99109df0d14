"""Generating a review's answers in the background, one review at a time, with its progress in review.json.

Answers come from tuneforge.eval.compare.evaluate_model — the same loading and greedy batched generation as
`tuneforge eval` — so what is reviewed is what eval scored.
"""

from __future__ import annotations

import logging
import threading
import traceback
from pathlib import Path

from tuneforge.errors import UserError
from tuneforge.ui.review_store import save_review

log = logging.getLogger("tuneforge")

# Two reviews generating at once would only halve each one's speed and double the memory.
_one_at_a_time = threading.Lock()
# Reviews whose answers this process is generating: one left "generating" by a UI that stopped is not among them.
_generating: set[str] = set()


def is_generating(review_id: str) -> bool:
    return review_id in _generating


def start_generation(run: Path, review: dict, max_new_tokens: int, batch_size: int) -> threading.Thread:
    _generating.add(review["id"])
    thread = threading.Thread(target=_generate, args=(run, review, max_new_tokens, batch_size),
                              name=f"review-{review['id']}", daemon=True)
    thread.start()
    return thread


def _generate(run: Path, review: dict, max_new_tokens: int, batch_size: int) -> None:
    from tuneforge.eval.compare import evaluate_model

    prompts = [item["prompt"] for item in review["items"]]
    references = [item["reference"] for item in review["items"]]
    with _one_at_a_time:
        try:
            for number, (system, spec) in enumerate(sorted(review["systems"].items()), start=1):
                review["progress"] = f"answering with {spec['label']} ({number} of 2)"
                save_review(run, review)
                replies = evaluate_model(spec["model"], prompts, references, max_new_tokens, batch_size).replies
                for item, reply in zip(review["items"], replies):
                    item["answers"][system] = reply
            review["state"], review["progress"] = "ready", "answers ready"
        except UserError as exc:
            review["state"], review["error"] = "failed", str(exc)
        except Exception as exc:  # a bug: keep the traceback in the log, show one line on the page
            log.error("review %s: generation failed:\n%s", review["id"], traceback.format_exc())
            review["state"], review["error"] = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0]
        save_review(run, review)
        _generating.discard(review["id"])

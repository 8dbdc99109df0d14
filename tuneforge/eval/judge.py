"""LLM-as-judge against any OpenAI-compatible endpoint: pairwise win rate (AlpacaEval-style) and 1-10 grading
(MT-Bench-style).

Judges prefer whichever answer they read first (or second) more often than chance, so every pair is judged twice,
once in each order (MT-Bench's position swap): the tuned answer wins a question only when it wins in both orders, or
wins in one and ties in the other; verdicts that flip with the order count as a tie. The win rate is
(wins + ties / 2) / judged questions, so a judge that only ever looks at position scores exactly 0.5.

The judge is reached with plain HTTP (`POST {url}/chat/completions`, temperature 0); `OPENAI_API_KEY`, when set, is
sent as the bearer token. A reply without a readable verdict is counted as `unparsed` and left out of the rates.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tuneforge.errors import UserError

PAIRWISE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the "
    "user question displayed below. Choose the assistant that follows the user's instructions and answers the "
    "question better, considering helpfulness, relevance, accuracy, depth and format. Do not let the order in which "
    "the responses were presented, their length or the assistants' names influence you. After a short explanation, "
    'output your final verdict strictly in this format: "[[A]]" if assistant A is better, "[[B]]" if assistant B is '
    'better, and "[[C]]" for a tie.'
)
PAIRWISE_USER = (
    "[User Question]\n{question}\n\n[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]\n\n"
    "[The Start of Assistant A's Answer]\n{a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{b}\n[The End of Assistant B's Answer]"
)
SINGLE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the "
    "user question displayed below. Consider helpfulness, relevance, accuracy, depth and format, and compare it with "
    "the reference answer. After a short explanation, rate the response on a scale of 1 to 10 by strictly following "
    'this format: "[[rating]]", for example: "Rating: [[5]]".'
)
SINGLE_USER = (
    "[Question]\n{question}\n\n[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]\n\n"
    "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
)
VERDICT = re.compile(r"\[\[([ABC])\]\]")
RATING = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")


@dataclass
class Judge:
    url: str
    model: str
    timeout_s: float = 120.0
    workers: int = 4

    def endpoint(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith("/chat/completions") else f"{base}/chat/completions"

    def ask(self, system: str, user: str) -> str:
        """The judge's reply text to one system + user message (temperature 0)."""
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": 512,
                           "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]})
        headers = {"Content-Type": "application/json"}
        if os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
        request = urllib.request.Request(self.endpoint(), data=body.encode("utf-8"), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                reply = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:200].replace("\n", " ")
            raise UserError(f"--judge-url {self.url}: HTTP {exc.code} from {self.endpoint()} ({detail})") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(f"--judge-url {self.url}: no OpenAI-compatible answer from {self.endpoint()} "
                            f"({reason})") from None
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise UserError(f"--judge-url {self.url}: the reply is not an OpenAI chat completion") from None

    def ask_all(self, prompts: list[tuple[str, str]]) -> list[str]:
        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            return list(pool.map(lambda p: self.ask(*p), prompts))


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'C' (tie) from the last [[X]] in the judge's reply; None when there is none."""
    found = VERDICT.findall(text)
    return found[-1] if found else None


def parse_rating(text: str) -> float | None:
    found = [float(x) for x in RATING.findall(text)]
    return found[-1] if found and 1 <= found[-1] <= 10 else None


def combine(tuned_first: str | None, tuned_second: str | None) -> str | None:
    """'win', 'tie' or 'loss' of the tuned answer from both orders' verdicts (tuned was A, then B)."""
    if tuned_first is None or tuned_second is None:
        return None
    points = {"A": 1, "B": -1, "C": 0}
    total = points[tuned_first] - points[tuned_second]  # in the second order the tuned answer is B
    return "win" if total > 0 else "loss" if total < 0 else "tie"


def pairwise(judge: Judge, questions: list[str], references: list[str], tuned: list[str],
             base: list[str]) -> tuple[dict[str, float], list[dict]]:
    """(win rate of `tuned` over `base` and counts, one record per question) with position swap."""
    prompts = []
    for q, ref, t, b in zip(questions, references, tuned, base):
        prompts.append((PAIRWISE_SYSTEM, PAIRWISE_USER.format(question=q, reference=ref, a=t, b=b)))
        prompts.append((PAIRWISE_SYSTEM, PAIRWISE_USER.format(question=q, reference=ref, a=b, b=t)))
    replies = judge.ask_all(prompts)
    records, counts = [], {"win": 0, "tie": 0, "loss": 0}
    for i in range(len(questions)):
        first, second = parse_verdict(replies[2 * i]), parse_verdict(replies[2 * i + 1])
        outcome = combine(first, second)
        if outcome:
            counts[outcome] += 1
        records.append({"judge_verdict_tuned_first": first, "judge_verdict_tuned_second": second,
                        "judge_outcome": outcome})
    judged = sum(counts.values())
    summary = {"judge_win_rate": (counts["win"] + counts["tie"] / 2) / judged if judged else float("nan"),
               "judge_wins": float(counts["win"]), "judge_ties": float(counts["tie"]),
               "judge_losses": float(counts["loss"]), "judge_unparsed": float(len(questions) - judged)}
    return summary, records


def grade(judge: Judge, questions: list[str], references: list[str], answers: list[str]) -> tuple[float, list]:
    """(mean 1-10 rating over the answers the judge rated, each answer's rating or None)."""
    prompts = [(SINGLE_SYSTEM, SINGLE_USER.format(question=q, reference=r, answer=a))
               for q, r, a in zip(questions, references, answers)]
    ratings = [parse_rating(text) for text in judge.ask_all(prompts)]
    rated = [r for r in ratings if r is not None]
    return (sum(rated) / len(rated) if rated else float("nan")), ratings

"""The judge against a local OpenAI-compatible stub server: position swap cancels order bias, verdicts and ratings
are read from the judge's replies, and an unreachable judge is a one-line error."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tuneforge.errors import UserError
from tuneforge.eval.judge import Judge, combine, grade, pairwise, parse_rating, parse_verdict

QUESTIONS = ["Name a fruit.", "Capital of France?", "2+2?", "Say hi."]
REFERENCES = ["apple", "Paris", "4", "hi"]
TUNED = ["apple GOOD", "Paris GOOD", "4", "hi GOOD"]
BASE = ["banana", "Lyon", "4", "hello"]


def stub_reply(messages: list[dict], mode: str) -> str:
    """A deterministic judge: `fair` prefers the answer containing GOOD (tie if both or neither), `first` always
    prefers whatever it reads first (pure position bias); grading counts GOOD as 9, otherwise 3."""
    user = messages[-1]["content"]
    if "[The Start of Assistant's Answer]" in user:
        answer = user.split("[The Start of Assistant's Answer]\n")[1]
        return f"Fine. Rating: [[{9 if 'GOOD' in answer.split('[The End')[0] else 3}]]"
    a = re.search(r"Assistant A's Answer\]\n(.*?)\n\[The End", user, re.S).group(1)
    b = re.search(r"Assistant B's Answer\]\n(.*?)\n\[The End", user, re.S).group(1)
    if mode == "first":
        return "A reads better. [[A]]"
    if mode == "garbled":
        return "I cannot decide."
    if ("GOOD" in a) == ("GOOD" in b):
        return "Equal. [[C]]"
    return "[[A]]" if "GOOD" in a else "[[B]]"


@pytest.fixture()
def judge_server():
    """An OpenAI-compatible /v1/chat/completions on a free local port; the judge's mode is chosen by model name."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            if self.path != "/v1/chat/completions":
                self.send_response(404)
                self.end_headers()
                return
            content = stub_reply(body["messages"], body["model"])
            data = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"], "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    server.shutdown()
    server.server_close()


def test_a_fair_judge_gives_the_better_model_the_win_in_both_orders(judge_server):
    url, seen = judge_server
    summary, records = pairwise(Judge(url, "fair"), QUESTIONS, REFERENCES, TUNED, BASE)
    assert summary == {"judge_win_rate": (3 + 0.5) / 4, "judge_wins": 3.0, "judge_ties": 1.0, "judge_losses": 0.0,
                       "judge_unparsed": 0.0}
    assert [r["judge_outcome"] for r in records] == ["win", "win", "tie", "win"]
    assert len(seen) == 8 and all(body["temperature"] == 0 for body in seen)  # each pair asked in both orders


def test_position_swap_cancels_a_judge_that_always_picks_the_first_answer(judge_server):
    url, _ = judge_server
    summary, records = pairwise(Judge(url, "first"), QUESTIONS, REFERENCES, TUNED, BASE)
    # Without the swap this judge would give the tuned model (shown first) a 100% win rate.
    assert summary["judge_win_rate"] == 0.5 and summary["judge_ties"] == 4
    assert {(r["judge_verdict_tuned_first"], r["judge_verdict_tuned_second"]) for r in records} == {("A", "A")}


def test_unreadable_verdicts_are_counted_not_scored(judge_server):
    url, _ = judge_server
    summary, _ = pairwise(Judge(url, "garbled"), QUESTIONS, REFERENCES, TUNED, BASE)
    assert summary["judge_unparsed"] == 4 and summary["judge_wins"] == 0


def test_single_answer_grading_reads_the_ratings(judge_server):
    url, _ = judge_server
    mean, ratings = grade(Judge(url, "fair"), QUESTIONS, REFERENCES, TUNED)
    assert ratings == [9.0, 9.0, 3.0, 9.0] and mean == pytest.approx(7.5)


def test_parsing_and_combining():
    assert parse_verdict("first [[B]] then on reflection [[A]]") == "A"
    assert parse_verdict("no verdict") is None
    assert parse_rating("Rating: [[7.5]]") == 7.5 and parse_rating("[[11]]") is None
    assert combine("A", "B") == "win" and combine("B", "A") == "loss" and combine("A", "A") == "tie"
    assert combine("C", "B") == "win" and combine("C", None) is None


def test_unreachable_judge_is_one_line_error(judge_server):
    url, _ = judge_server
    with pytest.raises(UserError, match="HTTP 404"):
        Judge(url.replace("/v1", "/nope"), "fair").ask("s", "u")
    with pytest.raises(UserError, match=r"--judge-url http://127.0.0.1:9/v1: no OpenAI-compatible answer"):
        Judge("http://127.0.0.1:9/v1", "fair", timeout_s=5).ask("s", "u")

"""Multiple choice: an oracle scores 100%, a uniform model exactly chance, and log-likelihoods match transformers."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import ROOT, write_jsonl
from tuneforge.errors import DataError
from tuneforge.eval.multiple_choice import (
    continuation_logliks,
    evaluate_multiple_choice,
    load_questions,
    requests_for,
    score_questions,
)

FIXTURE = str(ROOT / "tests" / "fixtures" / "eval" / "mmlu_sample.jsonl")


def oracle_for(questions, style):
    """Knows every answer: log-likelihood 0 for the right continuation, -5 for the others."""
    right = {requests_for(q, style)[q.answer] for q in questions}
    return lambda requests: [0.0 if r in right else -5.0 for r in requests]


@pytest.mark.parametrize("style", ["letter", "text"])
def test_oracle_scores_every_question(style):
    questions = load_questions(FIXTURE)
    summary, records = score_questions(questions, oracle_for(questions, style), style)
    assert summary["mc_acc"] == 1.0
    assert [r["predicted"] for r in records] == [q.answer for q in questions]
    if style == "text":
        assert summary["mc_acc_norm"] == 1.0


def test_an_anti_oracle_scores_zero():
    questions = load_questions(FIXTURE)
    oracle = oracle_for(questions, "letter")
    summary, _ = score_questions(questions, lambda reqs: [-v for v in oracle(reqs)], "letter")
    assert summary["mc_acc"] == 0.0


def test_uniform_model_scores_exactly_chance(tiny_model, tokenizer):
    with torch.no_grad():
        tiny_model.get_output_embeddings().weight.zero_()  # every next token equally likely
    summary, records = evaluate_multiple_choice(tiny_model, tokenizer, FIXTURE, style="letter")
    assert summary["mc_acc"] == pytest.approx(0.25)
    assert all(r["credit"] == 0.25 for r in records)


def test_continuation_logliks_match_transformers_log_softmax(tiny_model, tokenizer):
    requests = [("Question: what is 2+2?\nAnswer:", " four"), ("Hi", " there, friend"), ("A", " B")]
    ours = continuation_logliks(tiny_model, tokenizer, requests, batch_size=2)
    for (context, continuation), value in zip(requests, ours):
        ctx = tokenizer(context)["input_ids"]
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(tiny_model(input_ids=torch.tensor([ctx + cont])).logits[0].float(), -1)
        expected = sum(float(logprobs[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
        assert value == pytest.approx(expected, abs=1e-4)


def test_letter_prompt_lists_the_choices_and_asks_for_the_letter():
    question = load_questions(FIXTURE)[0]
    (context, first), *_ = requests_for(question, "letter")
    assert context.startswith("The following are multiple choice questions (with answers) about geography.")
    assert "\nA. Berlin\nB. Madrid\nC. Paris\nD. Rome\nAnswer:" in context and first == " A"


def test_csv_layout_and_letter_answers(tmp_path):
    path = tmp_path / "mc.csv"
    path.write_text("question,A,B,C,answer\nPick b,a,b,c,B\nPick c,a,b,c,2\n", encoding="utf-8")
    assert [q.answer for q in load_questions(str(path))] == [1, 2]


@pytest.mark.parametrize("row, message", [
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, r"rows.jsonl:1: 'answer' must be a choice index 0-1"),
    ({"question": "q", "choices": ["a", "b"], "answer": "E"}, "or a letter A-B, got 'E'"),
    ({"question": "q", "choices": ["only"], "answer": 0}, "'choices' must be a list of at least two"),
    ({"choices": ["a", "b"], "answer": 0}, "missing or empty 'question'"),
])
def test_bad_rows_name_file_line_and_reason(tmp_path, row, message):
    path = write_jsonl(tmp_path / "rows.jsonl", [row])
    with pytest.raises(DataError, match=message):
        load_questions(str(path))

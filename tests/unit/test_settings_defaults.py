"""One home per default: serve's, eval's and the dashboard's defaults live in their settings dataclasses, and the
command line and the pages take theirs from there.

A default written into an `add_argument` (or a page) again, or a dataclass default changed on one side only, fails
here: parsing a command line with no options must give exactly the dataclass's defaults.
"""

from __future__ import annotations

import dataclasses

import pytest
from fastapi.testclient import TestClient

from tuneforge.cli import build_parser, main
from tuneforge.cli.deploy import serve_settings
from tuneforge.cli.evaluate import eval_plan
from tuneforge.deploy.serve_settings import ServeSettings
from tuneforge.eval.settings import EvalPlan, GenerationSettings
from tuneforge.ui.settings import AnswerSettings


def test_serve_command_line_defaults_are_serve_settings(monkeypatch):
    monkeypatch.delenv("TUNEFORGE_API_KEY", raising=False)
    args = build_parser().parse_args(["serve", "--model", "m"])
    assert serve_settings(args) == ServeSettings()
    assert all(hasattr(args, f.name) for f in dataclasses.fields(ServeSettings))  # every setting is an option


def test_eval_command_line_defaults_are_the_eval_plan():
    args = build_parser().parse_args(["eval", "m", "--data", "rows.jsonl"])
    assert eval_plan(args) == EvalPlan(data="rows.jsonl")
    assert eval_plan(args).generation == GenerationSettings()
    on_the_command_line = {"humaneval_k": "k", "humaneval_samples": "samples", "humaneval_limit": "limit"}
    for f in dataclasses.fields(EvalPlan):  # every field is an option (generation's are its own options)
        assert f.name == "generation" or hasattr(args, on_the_command_line.get(f.name, f.name)), f.name
    assert all(hasattr(args, f.name) for f in dataclasses.fields(GenerationSettings))


def test_option_help_comes_from_the_dataclass(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "Requests answered at once; more get HTTP 429. (default: 32)" in shown


@pytest.mark.parametrize("args, message", [
    (["serve", "--model", "m", "--max-batch", "0"], "--max-batch: got 0, must be >= 1"),
    (["eval", "m", "--data", "x.jsonl", "--top-p", "0"], "--top-p: got 0.0, must be > 0 and <= 1"),
    (["eval", "m", "--data", "x.jsonl", "--batch-size", "0"], "--batch-size: got 0, must be >= 1"),
])
def test_out_of_range_options_are_one_line_errors_from_the_dataclass_ranges(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tuneforge: error: {message}"]


def test_dashboard_pages_show_the_answer_settings(tmp_path):
    from tuneforge.ui.app import create_app

    client = TestClient(create_app(tmp_path), base_url="http://127.0.0.1")
    defaults = AnswerSettings()
    pages = {page: client.get(page) for page in ("/", "/run", "/compare", "/review", "/playground")}
    for page, reply in pages.items():
        assert reply.status_code == 200 and "{{" not in reply.text, page  # every placeholder filled
    assert f'id="max-new-tokens" value="{defaults.max_new_tokens}" min="1" max="1024"' in pages["/playground"].text
    assert f'name="limit" value="{defaults.limit}" min="1" max="1000"' in pages["/review"].text

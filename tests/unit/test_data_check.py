"""`tuneforge data check`: every problem of the fixture at its line, duplicates, lengths as training counts them,
balance, verdict and exit codes."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, run_cli, write_jsonl
from tuneforge.data.formats import normalise_row
from tuneforge.data.lengths import LengthCounter, would_be_dropped
from tuneforge.data.quality import check_files
from tuneforge.data.tokenize import fit_to_length, tokenize_example

FIXTURES = ROOT / "tests" / "fixtures" / "data_quality"
FIXTURE = FIXTURES / "every_problem.jsonl"  # chat rows
INSTRUCTION_FIXTURE = FIXTURES / "every_problem_instruction.jsonl"
SHAREGPT_FIXTURE = FIXTURES / "every_problem_sharegpt.jsonl"

# line -> every reason `data check` must give for it, word for word. Together the three fixtures hold each problem
# the issue lists: malformed JSON, missing or empty required field, wrong type, unknown role, roles out of order (two
# assistant turns in a row, not ending on an assistant turn, assistant before user, system not first), empty
# assistant turn, bytes that are not UTF-8, a row that mixes formats, a file that mixes formats.
EXPECTED_PROBLEMS = {
    2: ["malformed JSON: Expecting ',' delimiter (column 97)"],
    3: ["messages[1]: missing required field 'content'"],
    4: ["field 'messages' is an empty list of turns"],
    5: ["messages[1].content must be text, got int"],
    6: ["messages[0]: unknown role 'robot' (allowed: system, user, assistant)"],
    7: ["turn 2: two assistant turns in a row"],
    8: ["conversation does not end on an assistant turn"],
    9: ["turn 2: empty assistant turn"],
    10: ["bytes that are not UTF-8 (at byte 46)"],
    11: ["row mixes formats: chat and instruction keys in one row (messages, instruction, output); "
         "keep one format per row"],
    12: ["row is instruction but the file is chat (from line 1); one format per file"],
    17: ["turn 0: assistant turn before any user turn"],
    18: ["turn 1: a system turn may only come first"],
    19: ["unknown row format (keys: category, completion, prompt); expected instruction/input/output, messages, "
         "conversations or text (or, for preference data, prompt/chosen/rejected or prompt/completion/label)"],
    20: ["a row must be a JSON object, got list"],
}
EXPECTED_INSTRUCTION_PROBLEMS = {
    2: ["field 'instruction' is empty"],
    3: ["field 'output' is empty"],
    4: ["missing required field 'output'"],
    5: ["field 'output' must be text, got int"],
    6: ["field 'instruction' must be text, got list"],
    7: ["field 'input' must be text, got int"],
    8: ["row mixes formats: sharegpt and instruction keys in one row (conversations, instruction, output); "
        "keep one format per row"],
    9: ["row is completion but the file is instruction (from line 1); one format per file"],
    10: ["malformed JSON: Unterminated string starting at (column 51)"],
    11: ["bytes that are not UTF-8 (at byte 26)"],
}
EXPECTED_SHAREGPT_PROBLEMS = {
    2: ["conversations[0]: unknown role 'bot' (allowed: system, human, user, gpt, assistant)"],
    3: ["turn 2: two assistant turns in a row"],
    4: ["conversation does not end on an assistant turn"],
    5: ["turn 1: empty assistant turn"],
    6: ["conversations[1]: missing required field 'value'"],
    7: ["conversations[1].value must be text, got list"],
    8: ["field 'conversations' must be a non-empty list of turns, got str"],
    9: ["row mixes formats: chat and sharegpt keys in one row (messages, conversations); keep one format per row"],
}
ALL_FIXTURES = {FIXTURE: EXPECTED_PROBLEMS, INSTRUCTION_FIXTURE: EXPECTED_INSTRUCTION_PROBLEMS,
                SHAREGPT_FIXTURE: EXPECTED_SHAREGPT_PROBLEMS}


@pytest.fixture(scope="module")
def fixture_report(tokenizer):
    return check_files([str(FIXTURE)], tokenizer, "smollm2-135m-instruct", max_length=40, by="category")


def line(where: str) -> int:
    return int(where.rsplit(":", 1)[1])


def problems_by_line(problems) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for p in problems:
        out.setdefault(line(p.where), []).append(p.reason)
    return out


@pytest.mark.parametrize("path", list(ALL_FIXTURES), ids=lambda p: p.name)
def test_every_problem_is_reported_at_its_line_with_its_reason(path):
    report = check_files([str(path)])
    assert problems_by_line(report.problems) == ALL_FIXTURES[path]
    assert all(p.where == f"{path}:{line(p.where)}" for p in report.problems)
    assert {line(report.rows.where(i)) for i in report.bad_rows} == set(ALL_FIXTURES[path])
    assert report.exit_code == 1


def test_train_time_validation_finds_the_same_first_problem_per_row():
    """`tuneforge train` (load_examples_and_problems) and `data check` agree on which rows are bad and why."""
    from tuneforge.data.formats import load_examples_and_problems

    for path, expected in ALL_FIXTURES.items():
        _, problems = load_examples_and_problems(str(path))
        assert {line(p.where): p.reason for p in problems} == {n: reasons[0] for n, reasons in expected.items()}


def test_fixture_duplicates_short_answers_and_verdict(fixture_report):
    where = fixture_report.rows.where
    assert [[line(where(i)) for i in g] for g in fixture_report.duplicates.exact] == [[1, 13]]
    assert [[line(where(i)) for i in g] for g in fixture_report.duplicates.near] == [[14, 15]]
    assert [line(where(i)) for i in fixture_report.short_answers] == [16]
    assert fixture_report.exit_code == 1
    assert fixture_report.verdict().startswith("verdict: problems found in 20 rows - 15 bad rows, 1 exact duplicates")


def test_cli_json_report_plot_and_exit_code(tmp_path):
    plot = tmp_path / "lengths.png"
    result = run_cli("data", "check", str(FIXTURE), "--json", "--plot", str(plot), "--max-length", "40")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    by_line: dict[int, list[str]] = {}
    for problem in report["problems"]:
        by_line.setdefault(line(problem["where"]), []).append(problem["reason"])
    assert by_line == EXPECTED_PROBLEMS
    assert [[line(w) for w in g] for g in report["exact_duplicates"]] == [[1, 13]]
    assert [[line(w) for w in g["rows"]] for g in report["near_duplicates"]["groups"]] == [[14, 15]]
    assert report["lengths"]["rows"] == 5 and report["lengths"]["over_max_length"] == 5
    assert report["exit_code"] == 1
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_human_report_lists_file_line_reason_for_every_fixture():
    """The readable report: one `file:line: reason` line per problem, then the verdict (no tokenizer is needed
    for that part, but the default run loads the embedded one for the length table)."""
    paths = [str(p) for p in ALL_FIXTURES]
    result = run_cli("data", "check", *paths, "--by", "category")
    assert result.returncode == 1, result.stderr
    listed = [x.strip() for x in result.stdout.splitlines() if x.startswith("  ")]
    for path, expected in ALL_FIXTURES.items():
        for number, reasons in expected.items():
            for reason in reasons:
                assert f"{path}:{number}: {reason}" in listed
    assert "problems: 33 problems in 33 rows" in result.stdout
    assert f"{FIXTURE}:1, {FIXTURE}:13" in result.stdout  # the exact-duplicate group
    assert "balance by category:" in result.stdout
    assert result.stdout.rstrip().splitlines()[-1].startswith("verdict: problems found in 42 rows - 33 bad rows")


def test_clean_file_exits_0_and_unreadable_file_exits_2(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"instruction": f"Add {i} and {i + 1}.", "output": str(2 * i + 1)}
                                                 for i in range(5)])
    report = check_files([str(good)])
    assert report.exit_code == 0 and not report.problems and report.verdict().startswith("verdict: clean")
    missing = check_files([str(good), str(tmp_path / "nope.jsonl")])
    assert missing.exit_code == 2 and "file not found" in missing.files[1].error
    (tmp_path / "notes.txt").write_text("hello")
    assert check_files([str(tmp_path / "notes.txt")]).exit_code == 2


def test_cli_exit_code_2_for_an_unreadable_file(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "fine"}])
    (tmp_path / "bad.json").write_text('[{"text": "a"},')
    result = run_cli("data", "check", str(good), str(tmp_path / "bad.json"))
    assert result.returncode == 2, result.stderr
    assert f"{tmp_path / 'bad.json'}: unreadable: {tmp_path / 'bad.json'}:1: malformed JSON" in result.stdout
    assert "verdict: unreadable" in result.stdout


def test_duplicates_across_files_name_both_files(tmp_path):
    rows = [{"instruction": "Name the largest planet.", "output": "Jupiter is the largest planet."}]
    a = write_jsonl(tmp_path / "train.jsonl", rows + [{"instruction": "Name a moon.", "output": "Titan."}])
    b = write_jsonl(tmp_path / "val.jsonl", rows)
    report = check_files([str(a), str(b)])
    assert [[report.rows.where(i) for i in g] for g in report.duplicates.exact] == [[f"{a}:1", f"{b}:1"]]


def test_balance_warning_over_the_ratio(tmp_path):
    rows = [{"text": f"maths row {i} " * 3, "category": "maths"} for i in range(12)]
    rows += [{"text": f"poetry row {i} " * 3, "category": "poetry"} for i in range(2)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    report = check_files([str(path)], by="category", balance_ratio=5)
    assert report.balance == {"maths": 12, "poetry": 2}
    assert "largest class 'maths' (12 rows) is 6.0x the smallest 'poetry' (2)" in report.balance_warning()
    assert check_files([str(path)], by="category", balance_ratio=6).balance_warning() is None


def test_lengths_match_training_tokenization_and_truncation_policy(tokenizer):
    """The fast length count equals `tokenize_example`, and 'would be dropped' matches `fit_to_length`."""
    rows = [
        ({"instruction": "Say hi", "output": "hi"}, "instruction"),
        ({"instruction": "Summarise: " + "words and more words " * 20, "input": "  extra  ", "output": "Short."},
         "instruction"),
        ({"instruction": "q", "output": "a long answer " * 30}, "instruction"),
        ({"messages": [{"role": "system", "content": " lead space "}, {"role": "user", "content": "a\n\n b  "},
                       {"role": "assistant", "content": "\nx\n"}, {"role": "user", "content": "é😀 next?"},
                       {"role": "assistant", "content": "  yes"}]}, "chat"),
        ({"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi there"}]}, "sharegpt"),
        ({"text": "plain completion text, trailing space "}, "completion"),
    ]
    examples = [normalise_row(row, fmt, f"f:{i}") for i, (row, fmt) in enumerate(rows)]
    counted = LengthCounter(tokenizer).count(examples)
    for example, row_tokens in zip(examples, counted):
        tokenized = tokenize_example(tokenizer, example)
        assert row_tokens.total == len(tokenized.input_ids), example.source
        for max_length in (16, 24, 32, 48):
            if len(tokenized.input_ids) > max_length:
                dropped = fit_to_length(tokenized, max_length, "truncate") is None
                assert would_be_dropped(row_tokens, max_length) == dropped, (example.source, max_length)

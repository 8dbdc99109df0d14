"""`tuneforge data clean`: the kept rows, the report of every dropped row, an untouched input, atomic output."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.conftest import run_cli, write_jsonl
from tests.unit.test_data_check import EXPECTED_PROBLEMS, FIXTURE
from tuneforge.data import quality
from tuneforge.data.quality import check_files, clean_file
from tuneforge.errors import UserError


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_clean_keeps_valid_first_of_group_rows_and_reports_every_dropped_row(tmp_path):
    before = digest(FIXTURE)
    out = tmp_path / "clean.jsonl"
    result = run_cli("data", "clean", str(FIXTURE), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert digest(FIXTURE) == before  # never modifies its input
    source = FIXTURE.read_bytes().splitlines()
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    assert kept == [json.loads(source[n - 1]) for n in (1, 14, 16)]
    report = (tmp_path / "clean.dropped.txt").read_text().splitlines()
    dropped = {int(x.split(":", 2)[1]): x.split(": ", 1)[1] for x in report}
    assert set(dropped) == set(EXPECTED_PROBLEMS) | {13, 15}
    for number, reasons in EXPECTED_PROBLEMS.items():
        assert dropped[number] == reasons[0]
    assert dropped[13] == f"exact duplicate of {FIXTURE}:1"
    assert dropped[15] == f"near duplicate of {FIXTURE}:14 (word Jaccard 1.00)"
    assert "kept 3 of 20 rows" in result.stdout
    assert "1 exact, 15 invalid, 1 near" in result.stdout
    assert not list(tmp_path.glob(".*.tmp"))


def test_drop_overlong_uses_the_token_budget(tmp_path, tokenizer):
    rows = [{"instruction": "Short question?", "output": "Short answer."},
            {"instruction": "Long question " * 40, "output": "Another answer."}]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    report = check_files([str(path)], tokenizer, "embedded", max_length=64)
    kept_all = clean_file(str(path), str(tmp_path / "a.jsonl"), report, drop_overlong=False)
    kept_short = clean_file(str(path), str(tmp_path / "b.jsonl"), report, drop_overlong=True)
    assert (kept_all.kept, kept_short.kept) == (2, 1)
    assert (tmp_path / "b.dropped.txt").read_text() == f"{path}:2: over max length: more than 64 tokens\n"


def test_a_failed_write_leaves_the_previous_output_and_no_temp_file(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": f"row {i}"} for i in range(5)])
    out = tmp_path / "out.jsonl"
    out.write_text("previous output\n")
    report = check_files([str(path)])
    calls = {"n": 0}
    real_dumps = json.dumps

    def failing_dumps(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real_dumps(*args, **kwargs)

    monkeypatch.setattr(quality.json, "dumps", failing_dumps)
    with pytest.raises(OSError):
        clean_file(str(path), str(out), report, drop_overlong=False)
    assert out.read_text() == "previous output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_clean_refuses_to_overwrite_its_input_or_write_other_formats(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}])
    report = check_files([str(path)])
    with pytest.raises(UserError, match="that is the input file"):
        clean_file(str(path), str(path), report, drop_overlong=False)
    with pytest.raises(UserError, match="ending in .jsonl"):
        clean_file(str(path), str(tmp_path / "out.csv"), report, drop_overlong=False)

"""The `tuneforge data` command line: help for every subcommand, argument checks and write failures as one line."""

from __future__ import annotations

import pytest

from tests.unit.test_data_check import FIXTURE, SHAREGPT_FIXTURE
from tuneforge.cli import main


@pytest.mark.parametrize("verb", ["check", "clean", "convert", "split"])
def test_every_data_subcommand_has_help(verb, capsys):
    with pytest.raises(SystemExit) as info:
        main(["data", verb, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: tuneforge data {verb}")
    if verb == "check":
        assert "0 clean, 1 problems found (bad rows or duplicates), 2 a file could not be read" in " ".join(out.split())
        assert "--json" in out and "--plot OUT.png" in out and "--near-dup-threshold" in out


@pytest.mark.parametrize("argv, message", [
    (["--max-length", "0"], "argument --max-length: must be a whole number >= 1, got 0"),
    (["--near-dup-threshold", "1.5"], "argument --near-dup-threshold: must be in (0, 1], got 1.5"),
    (["--near-dup-threshold", "high"], "argument --near-dup-threshold: not a number: 'high'"),
    (["--balance-ratio", "0.5"], "argument --balance-ratio: must be a number >= 1 (largest class / smallest), got 0.5"),
])
def test_bad_arguments_are_one_line_errors_with_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["data", "check", str(FIXTURE), *argv])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"tuneforge data check: error: {message}"


def test_an_output_the_os_refuses_is_one_line_and_exit_4(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    code = main(["data", "clean", str(SHAREGPT_FIXTURE), "-o", str(blocker / "clean.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4
    assert err[-1].startswith(f"tuneforge: error: -o {blocker / 'clean.jsonl'}: cannot write {blocker}")
    assert blocker.read_text() == "not a folder\n" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]

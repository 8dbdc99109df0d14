"""Preference rows: the three forms are detected per file and normalised to prompt + chosen / prompt + rejected;
`data check` names file:line for each problem the issue lists and counts duplicates and lengths; `data convert`
moves between the paired forms without losing a turn; `data split` keeps rows whole; supervised training refuses
them in one line instead of learning the rejected answers."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli, write_jsonl
from tuneforge.data.formats import load_examples, scan_rows

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "Name a prime."}
GOOD, BAD = {"role": "assistant", "content": "7"}, {"role": "assistant", "content": "8"}

# line -> the reasons `data check` must give for it, word for word.
PAIRED_ROWS = [
    {"prompt": "Name a prime.", "chosen": "7", "rejected": "8"},                                      # 1 ok
    {"prompt": [SYSTEM, USER], "chosen": [GOOD], "rejected": [BAD]},                                   # 2 ok
    {"prompt": "Name a prime.", "chosen": "", "rejected": "8"},                                       # 3
    {"prompt": "Name a prime.", "rejected": "8"},                                                      # 4
    {"prompt": "Name a prime.", "chosen": "7", "rejected": "7"},                                      # 5
    {"prompt": [USER, GOOD], "chosen": [GOOD], "rejected": [BAD]},                                     # 6
    {"prompt": [USER], "chosen": [USER], "rejected": [BAD]},                                           # 7
    {"prompt": "Name a prime.", "chosen": "7", "rejected": "8"},                                      # 8 = line 1
    {"prompt": [USER], "chosen": [GOOD, GOOD], "rejected": [BAD]},                                     # 9
]
PAIRED_PROBLEMS = {
    3: ["field 'chosen' is empty"],
    4: ["missing required field 'chosen'"],
    5: ["chosen and rejected are identical: the pair says nothing about which answer is better"],
    6: ["field 'prompt' must end on a user turn"],
    7: ["chosen[0]: a user turn in an answer (only assistant turns)"],
    9: ["chosen: turn 2: two assistant turns in a row"],
}
CONVERSATION_ROWS = [
    {"chosen": [USER, GOOD], "rejected": [USER, BAD]},                                                 # 1 ok
    {"chosen": [USER, GOOD, USER, GOOD], "rejected": [USER, GOOD, USER, BAD]},                         # 2 ok
    {"chosen": [USER, GOOD, USER, GOOD], "rejected": [USER, BAD, USER, BAD]},                          # 3
    {"chosen": [USER, GOOD], "rejected": [USER, GOOD]},                                                # 4
    {"chosen": "Human: hi Assistant: 7", "rejected": [USER, BAD]},                                     # 5
    {"chosen": [GOOD], "rejected": [BAD]},                                                             # 6
]
CONVERSATION_PROBLEMS = {
    3: ["chosen and rejected have different prompts: they differ from turn 1, and chosen turn 2 is a user turn "
        "after that"],
    4: ["chosen and rejected are identical: the pair says nothing about which answer is better"],
    5: ["field 'chosen' is text: give a 'prompt' field too, or 'chosen' as a message list"],
    6: ["chosen and rejected share no user turn: no prompt to answer"],
}
UNPAIRED_ROWS = [
    {"prompt": "Name a prime.", "completion": "7", "label": True},                                    # 1 ok
    {"prompt": "Name a prime.", "completion": "8", "label": False},                                   # 2 ok
    {"prompt": "Name a prime.", "completion": "9", "label": "no"},                                    # 3
    {"prompt": "", "completion": "9", "label": False},                                                # 4
]
UNPAIRED_PROBLEMS = {3: ["field 'label' must be true or false, got 'no'"], 4: ["field 'prompt' is empty"]}


@pytest.fixture()
def files(tmp_path):
    return {name: write_jsonl(tmp_path / f"{name}.jsonl", rows) for name, rows in
            [("paired", PAIRED_ROWS), ("conversation_pairs", CONVERSATION_ROWS), ("unpaired", UNPAIRED_ROWS)]}


def problems_by_line(path) -> dict[int, list[str]]:
    return {int(s.where.rsplit(":", 1)[1]): s.problems for s in scan_rows(str(path)) if s.problems}


def test_each_form_is_detected_and_normalised(files):
    paired = {int(s.where.rsplit(":", 1)[1]): s for s in scan_rows(str(files["paired"]))}
    assert {s.format for s in paired.values()} == {"paired"}
    first, with_system = paired[1].example, paired[2].example
    assert first.messages == (USER, GOOD) and first.rejected == (USER, BAD) and first.prompt_turns == 1
    assert with_system.messages == (SYSTEM, USER, GOOD) and with_system.prompt_turns == 2
    conversation = next(s for s in scan_rows(str(files["conversation_pairs"])) if s.where.endswith(":2")).example
    assert conversation.prompt_turns == 3  # the shared prefix up to its last user turn
    assert conversation.messages[3:] == (GOOD,) and conversation.rejected[3:] == (BAD,)
    unpaired = [s.example for s in scan_rows(str(files["unpaired"]))][:2]
    assert [u.desirable for u in unpaired] == [True, False] and unpaired[1].messages == (USER, BAD)
    assert unpaired[1].rejected is None and unpaired[1].is_preference


@pytest.mark.parametrize("form, expected", [("paired", PAIRED_PROBLEMS), ("conversation_pairs", CONVERSATION_PROBLEMS),
                                            ("unpaired", UNPAIRED_PROBLEMS)])
def test_every_problem_is_named_at_its_line(files, form, expected):
    assert problems_by_line(files[form]) == expected


def test_data_check_reports_problems_duplicates_and_lengths(files):
    result = run_cli("data", "check", str(files["paired"]), "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    reported = {(int(p["where"].rsplit(":", 1)[1]), p["reason"]) for p in report["problems"]}
    assert reported == {(line, reason) for line, reasons in PAIRED_PROBLEMS.items() for reason in reasons}
    assert [[w.rsplit(":", 1)[1] for w in group] for group in report["exact_duplicates"]] == [["1", "8"]]
    assert report["lengths"]["rows"] == len(PAIRED_ROWS) - len(PAIRED_PROBLEMS)


def test_convert_between_the_paired_forms_and_to_chat_keeps_every_turn(files, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [CONVERSATION_ROWS[0], CONVERSATION_ROWS[1]])
    as_paired, back = tmp_path / "paired.jsonl", tmp_path / "back.jsonl"
    assert run_cli("data", "convert", str(good), "--to", "paired", "-o", str(as_paired)).returncode == 0
    rows = [json.loads(line) for line in as_paired.read_text().splitlines()]
    assert rows[1] == {"prompt": [USER, GOOD, USER], "chosen": [GOOD], "rejected": [BAD]}
    assert run_cli("data", "convert", str(as_paired), "--to", "conversation_pairs", "-o", str(back)).returncode == 0
    assert [json.loads(line) for line in back.read_text().splitlines()] == [CONVERSATION_ROWS[0], CONVERSATION_ROWS[1]]
    chat = tmp_path / "chat.jsonl"
    assert run_cli("data", "convert", str(as_paired), "--to", "chat", "-o", str(chat)).returncode == 0
    assert json.loads(chat.read_text().splitlines()[1]) == {"messages": [USER, GOOD, USER, GOOD]}  # the chosen one
    refused = run_cli("data", "convert", str(files["unpaired"]), "--to", "chat", "-o", str(tmp_path / "u.jsonl"))
    assert refused.returncode != 0 and "labelled undesirable" in refused.stderr and not (tmp_path / "u.jsonl").exists()


def test_split_keeps_pairs_whole(tmp_path):
    rows = [{"prompt": f"Say {i}.", "chosen": f"{i}", "rejected": f"{i + 1}"} for i in range(20)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert run_cli("data", "split", str(path), "--val", "0.25").returncode == 0
    train = load_examples(str(tmp_path / "pairs.train.jsonl"))
    val = load_examples(str(tmp_path / "pairs.val.jsonl"))
    assert len(train) + len(val) == 20 and all(e.rejected is not None for e in train + val)


def test_supervised_training_refuses_preference_rows_in_one_line(files, tiny_model_dir, tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(f"model: {tiny_model_dir}\ndata:\n  train: {files['unpaired']}\n  on_error: skip\n")
    result = run_cli("train", str(run), f"output_dir={tmp_path / 'run'}")
    assert result.returncode != 0
    message = [line for line in result.stderr.splitlines() if "preference rows" in line]
    assert len(message) == 1 and "unpaired.jsonl:1: this file holds unpaired preference rows" in message[0]
    assert "--to chat" in message[0] and not (tmp_path / "run" / "adapter_model.safetensors").exists()

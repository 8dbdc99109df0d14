"""`tuneforge data convert` (same training examples after conversion) and `data split` (disjoint, complete,
stratified, reproducible)."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from tests.conftest import run_cli, write_jsonl
from tuneforge.data.convert import convert_file
from tuneforge.data.formats import load_examples
from tuneforge.data.split import split_file
from tuneforge.errors import DataError, UserError

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "category": "maths"},
    {"instruction": "Greet politely.", "output": "Good morning!", "system": "You are formal.", "id": 7},
]
SHAREGPT = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                               {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "Bye"},
                               {"from": "gpt", "value": "Goodbye."}], "source": "forum"}]


def messages_of(path):
    return [ex.messages for ex in load_examples(str(path))]


def test_alpaca_to_chat_and_back_trains_on_the_same_examples(tmp_path):
    src = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    chat = tmp_path / "chat.jsonl"
    assert convert_file(str(src), "chat", str(chat)).rows == 2
    rows = [json.loads(x) for x in chat.read_text().splitlines()]
    assert rows[0]["category"] == "maths" and rows[1]["id"] == 7 and "instruction" not in rows[0]
    assert messages_of(chat) == messages_of(src)
    back = tmp_path / "back.jsonl"
    convert_file(str(chat), "instruction", str(back))
    assert messages_of(back) == messages_of(src)
    assert json.loads(back.read_text().splitlines()[1]) == {"instruction": "Greet politely.",
                                                            "output": "Good morning!", "system": "You are formal.",
                                                            "id": 7}


def test_sharegpt_to_chat_via_cli(tmp_path):
    src = write_jsonl(tmp_path / "sg.jsonl", SHAREGPT)
    out = tmp_path / "chat.jsonl"
    result = run_cli("data", "convert", str(src), "--to", "chat", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "converted 1 rows (sharegpt -> chat)" in result.stdout
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert row["source"] == "forum" and row["messages"][1] == {"role": "user", "content": "Hi"}
    assert messages_of(out) == messages_of(src)


def test_unconvertible_rows_fail_with_their_line_and_write_nothing(tmp_path):
    src = write_jsonl(tmp_path / "sg.jsonl", SHAREGPT)
    out = tmp_path / "alpaca.jsonl"
    with pytest.raises(DataError, match=r"sg.jsonl:1: a conversation with 4 user/assistant turns"):
        convert_file(str(src), "instruction", str(out))
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["sg.jsonl"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing required field 'output'"):
        convert_file(str(bad), "chat", str(out))


def categorised(n_maths=80, n_poetry=20):
    return ([{"text": f"maths {i}", "category": "maths"} for i in range(n_maths)]
            + [{"text": f"poem {i}", "category": "poetry"} for i in range(n_poetry)])


def read(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_stratified_split_is_disjoint_complete_proportional_and_seeded(tmp_path):
    src = write_jsonl(tmp_path / "all.jsonl", categorised())
    result = split_file(str(src), val=0.1, test=0.2, by="category", seed=3)
    parts = {name: read(path) for name, path in result.outputs.items()}
    texts = [row["text"] for rows in parts.values() for row in rows]
    assert sorted(texts) == sorted(row["text"] for row in categorised())  # complete and disjoint
    assert {k: Counter(r["category"] for r in v) for k, v in parts.items()} == {
        "train": {"maths": 56, "poetry": 14}, "val": {"maths": 8, "poetry": 2}, "test": {"maths": 16, "poetry": 4}}
    again = split_file(str(src), val=0.1, test=0.2, by="category", seed=3, out_dir=str(tmp_path / "again"))
    assert read(again.outputs["val"]) == parts["val"]
    other = split_file(str(src), val=0.1, test=0.2, by="category", seed=4, out_dir=str(tmp_path / "other"))
    assert read(other.outputs["val"]) != parts["val"]


def test_split_cli_without_test_and_missing_by_field(tmp_path):
    src = write_jsonl(tmp_path / "all.jsonl", categorised(30, 10))
    result = run_cli("data", "split", str(src), "--val", "0.25", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.jsonl", "all.train.jsonl", "all.val.jsonl"]
    assert len(read(tmp_path / "all.val.jsonl")) == 10
    assert re.search(r"^val +10 rows -> .*all.val.jsonl$", result.stdout, re.M), result.stdout
    with pytest.raises(DataError, match=r"all.jsonl:1: missing field 'topic' \(--by\)"):
        split_file(str(src), val=0.1, by="topic", out_dir=str(tmp_path / "x"))


FIRST = [a + b for a in ("Ka", "Lo", "Mi", "Ru", "Se", "To") for b in ("ran", "vik", "mel", "dor", "sa")]
LAST = [a + b for a in ("Ber", "Cas", "Dun", "Fol", "Gar") for b in ("ton", "ley", "ski", "ova", "ez", "ard")]
CITIES = [a + b for a in ("Por", "Vel", "Ash", "Bri", "Cor") for b in ("ia", "ton", "burg", "mar", "ado", "ville")]


def named_rows(n: int = 200, chat: bool = False) -> list[dict]:
    import random

    rng = random.Random(5)
    out = []
    for i in range(n):
        name, city = f"{rng.choice(FIRST)} {rng.choice(LAST)}", rng.choice(CITIES)
        question, answer = f"{name} moved to {city} (row {i}).", f"NAME={name}; CITY={city}"
        out.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
                   if chat else {"instruction": "Extract the name and city.", "input": question, "output": answer})
    return out


def answer_words_of(row: dict) -> set[str]:
    answer = row["messages"][-1]["content"] if "messages" in row else row["output"]
    return set(re.findall(r"\w+", answer.lower()))


@pytest.mark.parametrize("chat", [False, True])
def test_unseen_answers_split_holds_out_words_no_training_answer_holds(tmp_path, chat):
    """Every held-out row's answer names something (a first name, a surname, a city) that no training answer names,
    as a test set of new people and places does; a random split shares them with training (asserted too)."""
    src = write_jsonl(tmp_path / "all.jsonl", named_rows(chat=chat))
    result = split_file(str(src), val=0.2, test=0.1, seed=3, unseen_answers=True)
    parts = {name: read(path) for name, path in result.outputs.items()}
    assert sum(len(rows) for rows in parts.values()) == 200
    seen = set().union(*(answer_words_of(row) for row in parts["train"]))
    for name, share in (("val", 0.2), ("test", 0.1)):
        assert abs(len(parts[name]) - 200 * share) <= 0.1 * 200 * share, (name, len(parts[name]))
        assert all(answer_words_of(row) - seen for row in parts[name]), name
    again = split_file(str(src), val=0.2, test=0.1, seed=3, unseen_answers=True, out_dir=str(tmp_path / "again"))
    assert read(again.outputs["val"]) == parts["val"]  # seeded

    plain = split_file(str(src), val=0.2, seed=3, out_dir=str(tmp_path / "random"))
    seen_randomly = set().union(*(answer_words_of(row) for row in read(plain.outputs["train"])))
    shares = [bool(answer_words_of(row) - seen_randomly) for row in read(plain.outputs["val"])]
    assert sum(shares) < len(shares) / 2  # most random validation rows name only what training named


def test_unseen_answers_split_refuses_answers_that_share_every_word(tmp_path):
    colours = [{"instruction": f"Colour number {i}?", "output": ["red", "green"][i % 2]} for i in range(40)]
    src = write_jsonl(tmp_path / "all.jsonl", colours)  # two answers in all, each in half the rows: none held out
    with pytest.raises(DataError, match=r"all.jsonl: --unseen-answers found words for only 0 of the 8 rows --val"):
        split_file(str(src), val=0.2, unseen_answers=True)
    with pytest.raises(UserError, match="--by and --unseen-answers"):
        split_file(str(write_jsonl(tmp_path / "c.jsonl", categorised())), val=0.2, by="category", unseen_answers=True)
    done = run_cli("data", "split", str(write_jsonl(tmp_path / "named.jsonl", named_rows())), "--val", "0.2",
                   "--unseen-answers")
    assert done.returncode == 0, done.stderr
    assert re.search(r"^val +(3[6-9]|4[0-4]) rows -> .*named.val.jsonl$", done.stdout, re.M), done.stdout

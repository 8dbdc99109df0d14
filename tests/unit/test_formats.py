"""Format detection, file types, and file:line errors."""

from __future__ import annotations

import json

import pytest

from tests.conftest import write_jsonl
from tuneforge.data.formats import load_examples
from tuneforge.errors import DataError

INSTR = {"instruction": "Q", "input": "ctx", "output": "A"}


def test_instruction_jsonl(tmp_path):
    (ex,) = load_examples(str(write_jsonl(tmp_path / "a.jsonl", [INSTR])))
    assert ex.messages[-1] == {"role": "assistant", "content": "A"}
    assert ex.source.endswith("a.jsonl:1")


def test_json_csv_parquet_and_dataset_dir(tmp_path):
    import datasets
    import pandas as pd

    rows = [INSTR, {"instruction": "Q2", "output": "B"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    datasets.Dataset.from_list([{"text": "hello"}, {"text": "world"}]).save_to_disk(str(tmp_path / "ds"))
    for name in ("a.json", "a.csv", "a.parquet"):
        examples = load_examples(str(tmp_path / name))
        assert [e.messages[-1]["content"] for e in examples] == ["A", "B"], name
    assert [e.text for e in load_examples(str(tmp_path / "ds"))] == ["hello", "world"]


def test_chat_and_system_prompt(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": "yo"}]}])
    (ex,) = load_examples(str(path), system_prompt="Be nice.")
    assert ex.messages[0] == {"role": "system", "content": "Be nice."}


@pytest.mark.parametrize(
    "lines, fragment",
    [
        (['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": '], "c.jsonl:2: malformed JSON"),
        (['{"instruction": "a"}'], "c.jsonl:1: missing required field 'output'"),
        (['{"instruction": "a", "output": 5}'], "c.jsonl:1: field 'output' must be text, got int"),
        (['{"instruction": "a", "output": "b"}', '{"text": "t"}'], "c.jsonl:2: row is completion but the file is"),
        (['{"messages": [{"role": "robot", "content": "x"}]}'], "c.jsonl:1: messages[0]: unknown role 'robot'"),
        (['{"messages": [{"role": "user", "content": "x"}]}'], "c.jsonl:1: conversation does not end on an assistant"),
        (['{"foo": 1}'], "c.jsonl:1: unknown row format"),
    ],
)
def test_errors_name_file_and_line(tmp_path, lines, fragment):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        load_examples(str(path))
    assert fragment in str(info.value)


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"c.jsonl:2: bytes that are not UTF-8"):
        load_examples(str(path))

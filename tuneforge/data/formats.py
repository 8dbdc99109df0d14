"""Read data files and normalise every row into one `Example` type.

Three row formats (the guide's), detected per file from the first row and required of every row after it:
- instruction: {"instruction", "input"?, "output", "system"?}  -> a user turn and an assistant turn
- chat:        {"messages": [{"role", "content"}, ...]}      (ShareGPT {"conversations": [{"from", "value"}]} maps here)
- completion:  {"text"}                                        -> plain text, trained on every token
Files: JSONL, JSON (a list of rows), CSV, Parquet, a saved `datasets` directory, or `hf:NAME` (a hub dataset, online).
Every problem is reported as `file:line: reason`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tuneforge.errors import DataError

FORMATS = ("instruction", "chat", "sharegpt", "completion")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class Example:
    """One training example. Exactly one of `messages` (chat-shaped) and `text` (completion) is set."""

    source: str  # "file:line", for messages that point the user at the row
    messages: tuple[dict[str, str], ...] | None = None
    text: str | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Reading rows: (location, row-dict) pairs, whatever the container.


def read_rows(path: str) -> Iterator[tuple[str, Any]]:
    """Yield (`file:line` or `file:row N`, row) for every row of a data source."""
    if path.startswith("hf:"):
        yield from _read_hub_dataset(path[3:])
        return
    p = Path(path)
    if p.is_dir():
        yield from _read_saved_dataset(p)
        return
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(p)
    elif suffix == ".json":
        yield from _read_json(p)
    elif suffix == ".csv":
        yield from _read_csv(p)
    elif suffix == ".parquet":
        yield from _read_parquet(p)
    else:
        raise DataError(f"{path}: unsupported data file type {suffix or '(none)'}; use .jsonl, .json, .csv or .parquet")


def _read_jsonl(p: Path) -> Iterator[tuple[str, Any]]:
    with p.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            where = f"{p}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: bytes that are not UTF-8 (at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: malformed JSON: {exc.msg} (column {exc.colno})") from None


def _read_json(p: Path) -> Iterator[tuple[str, Any]]:
    try:
        loaded = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: bytes that are not UTF-8 (at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{p}:{exc.lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("data"), list):
        loaded = loaded["data"]
    if not isinstance(loaded, list):
        raise DataError(f"{p}: a .json data file must hold a list of rows (or {{'data': [...]}})")
    for index, row in enumerate(loaded, start=1):
        yield f"{p}:row {index}", row


def _read_csv(p: Path) -> Iterator[tuple[str, Any]]:
    try:
        with p.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            for row in reader:
                # DictReader's line_num is the physical line the row ended on (header is line 1).
                yield f"{p}:{reader.line_num}", {k: v for k, v in row.items() if v not in (None, "")}
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: bytes that are not UTF-8 (at byte {exc.start})") from None


def _read_parquet(p: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DataError(f"{p}: unreadable Parquet file: {exc}") from None
    for index, row in enumerate(table.to_pylist(), start=1):
        yield f"{p}:row {index}", row


def _rows_of_dataset(name: str, dataset: Any) -> Iterator[tuple[str, Any]]:
    if hasattr(dataset, "keys") and not hasattr(dataset, "column_names"):  # a DatasetDict: take the train split
        if "train" not in dataset:
            raise DataError(f"{name}: dataset has no 'train' split (splits: {', '.join(dataset.keys())})")
        dataset = dataset["train"]
    for index, row in enumerate(dataset, start=1):
        yield f"{name}:row {index}", row


def _read_saved_dataset(p: Path) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(p))
    except Exception as exc:
        raise DataError(f"{p}: not a saved `datasets` directory: {exc}") from None
    yield from _rows_of_dataset(str(p), dataset)


def _read_hub_dataset(name: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split="train")
    except Exception as exc:
        raise DataError(f"hf:{name}: could not load hub dataset: {exc}") from None
    yield from _rows_of_dataset(f"hf:{name}", dataset)


# ---------------------------------------------------------------------------------------------------------------------
# Format detection and normalisation.


def detect_format(row: Any, where: str) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        return "chat"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row or "output" in row:
        return "instruction"
    if "text" in row:
        return "completion"
    keys = ", ".join(sorted(map(str, row))) or "none"
    raise DataError(
        f"{where}: unknown row format (keys: {keys}); expected instruction/input/output, messages, conversations or text"
    )


def load_examples(path: str, fmt: str = "auto", system_prompt: str | None = None) -> list[Example]:
    """All rows of one data source as Examples; the first bad row raises `DataError` naming its location."""
    examples: list[Example] = []
    file_format = None if fmt == "auto" else fmt
    for where, row in read_rows(path):
        row_format = detect_format(row, where)
        if file_format is None:
            file_format = row_format
        elif row_format != file_format:
            raise DataError(f"{where}: row is {row_format} but the file is {file_format}; one format per file")
        examples.append(normalise_row(row, row_format, where, system_prompt))
    if not examples:
        raise DataError(f"{path}: no rows")
    return examples


def normalise_row(row: dict[str, Any], fmt: str, where: str, system_prompt: str | None = None) -> Example:
    if fmt == "completion":
        return Example(source=where, text=_text_field(row, "text", where))
    if fmt == "instruction":
        messages = _instruction_messages(row, where)
    elif fmt == "sharegpt":
        messages = _sharegpt_messages(row, where)
    else:
        messages = _chat_messages(row.get("messages"), where, "messages", "role", "content", None)
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    _check_turn_order(messages, where)
    return Example(source=where, messages=tuple(messages))


def _text_field(row: dict[str, Any], key: str, where: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise DataError(f"{where}: missing required field '{key}'")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be text, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return value


def _instruction_messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    instruction = _text_field(row, "instruction", where)
    extra = _text_field(row, "input", where, required=False)
    output = _text_field(row, "output", where)
    system = _text_field(row, "system", where, required=False)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "system", "content": system}] if system.strip() else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _sharegpt_messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    return _chat_messages(row.get("conversations"), where, "conversations", "from", "value", SHAREGPT_ROLES)


def _chat_messages(turns: Any, where: str, field: str, role_key: str, content_key: str, role_map) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: {field}[{i}] must be an object with '{role_key}' and '{content_key}'")
        role = turn.get(role_key)
        allowed = tuple(role_map) if role_map else ROLES
        if role not in allowed:
            raise DataError(f"{where}: {field}[{i}]: unknown role {role!r} (allowed: {', '.join(allowed)})")
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise DataError(f"{where}: {field}[{i}].{content_key} must be text, got {type(content).__name__}")
        messages.append({"role": role_map[role] if role_map else role, "content": content})
    return messages


def _check_turn_order(messages: list[dict[str, str]], where: str) -> None:
    for i, message in enumerate(messages):
        if message["role"] == "system" and i != 0:
            raise DataError(f"{where}: turn {i}: a system turn may only come first")
        if message["role"] == "assistant" and not message["content"].strip():
            raise DataError(f"{where}: turn {i}: empty assistant turn")
        if i > 0 and message["role"] == messages[i - 1]["role"]:
            raise DataError(f"{where}: turn {i}: two {message['role']} turns in a row")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: conversation does not end on an assistant turn")

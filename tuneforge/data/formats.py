"""Read data files and normalise every row into one `Example` type.

Three row formats (the guide's), detected per file from the first row and required of every row after it:
- instruction: {"instruction", "input"?, "output", "system"?}  -> a user turn and an assistant turn
- chat:        {"messages": [{"role", "content"}, ...]}      (ShareGPT {"conversations": [{"from", "value"}]} maps here)
- completion:  {"text"}                                        -> plain text, trained on every token
and the preference forms (paired, conversations, unpaired; see preference_rows.py).
Files: JSONL, JSON (a list of rows), CSV, Parquet, a saved `datasets` directory, or `hf:NAME` (a hub dataset, online).
Every problem is reported as `file:line: reason`. `scan_rows` yields every row with all of its problems (what
`tuneforge data check` lists); `load_examples` fails on them, or skips the bad rows, per `data.on_error`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

from tuneforge.errors import DataError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class Example:
    """One training example. Exactly one of `messages` (chat-shaped) and `text` (completion) is set.

    A preference row (preference_rows.py) is chat-shaped: `messages` is its prompt and chosen answer (or its one
    answer, unpaired), `rejected` the prompt and rejected answer, and the first `prompt_turns` turns are the prompt."""

    source: str  # "file:line", for messages that point the user at the row
    messages: tuple[dict[str, str], ...] | None = None
    text: str | None = None
    origin: str = ""  # name of the data source it came from (data mixing, per-source losses)
    rejected: tuple[dict[str, str], ...] | None = None  # paired preference rows
    desirable: bool | None = None  # unpaired preference rows (KTO's label)
    prompt_turns: int = 0  # preference rows: the shared prompt is messages[:prompt_turns]

    @property
    def is_preference(self) -> bool:
        return self.rejected is not None or self.desirable is not None


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a row (or a file), located as `file:line`."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class ScannedRow:
    """A row as read: where it is, the parsed row (None when unreadable), its format, and an Example or problems."""

    where: str
    row: Any
    format: str | None
    example: Example | None
    problems: list[str]


# ---------------------------------------------------------------------------------------------------------------------
# Reading rows: (location, row-dict) pairs, whatever the container.


def read_rows(path: str) -> Iterator[tuple[str, Any]]:
    """Yield (`file:line` or `file:row N`, row) for every row of a data source; an unreadable row raises."""
    for where, row, problem in read_rows_or_problems(path):
        if problem is not None:
            raise DataError(f"{where}: {problem}")
        yield where, row


def read_rows_or_problems(path: str) -> Iterator[tuple[str, Any, str | None]]:
    """Yield (where, row, None) per row, or (where, None, reason) for a line that cannot be read (JSONL).

    A source that cannot be read at all (missing, unsupported type, not a JSON list) raises `DataError`.
    """
    if path.startswith("hf:"):
        yield from _no_problems(_read_hub_dataset(path[3:]))
        return
    p = Path(path)
    if p.is_dir():
        yield from _no_problems(_read_saved_dataset(p))
        return
    if not p.is_file():
        raise DataError(f"{path}: file not found")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(p)
    elif suffix == ".json":
        yield from _no_problems(_read_json(p))
    elif suffix == ".csv":
        yield from _no_problems(_read_csv(p))
    elif suffix == ".parquet":
        yield from _no_problems(_read_parquet(p))
    else:
        raise DataError(f"{path}: unsupported data file type {suffix or '(none)'}; use .jsonl, .json, .csv or .parquet")


def _no_problems(rows: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any, None]]:
    for where, row in rows:
        yield where, row, None


def _read_jsonl(p: Path) -> Iterator[tuple[str, Any, str | None]]:
    with p.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            where = f"{p}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield where, None, f"bytes that are not UTF-8 (at byte {exc.start})"
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line.rstrip("\r\n")), None
            except json.JSONDecodeError as exc:
                yield where, None, f"malformed JSON: {exc.msg} (column {exc.colno})"


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


# Keys that mark each format. `text` beside another format's keys is taken as a rendered copy of the row (as in
# tatsu-lab/alpaca) and ignored; the other formats together in one row are ambiguous: which one would we train on?
FORMAT_KEYS = {"chat": ("messages",), "sharegpt": ("conversations",), "instruction": ("instruction", "output")}


def detect_format(row: Any, where: str) -> str:
    fmt, problem = _detect_format(row)
    if problem:
        raise DataError(f"{where}: {problem}")
    return fmt


def _detect_format(row: Any) -> tuple[str | None, str | None]:
    """(format, None) or (None, why the row has no single format)."""
    if not isinstance(row, dict):
        return None, f"a row must be a JSON object, got {_type(row)}"
    from tuneforge.data.preference_rows import preference_format

    preference = preference_format(row)
    if preference is not None:
        return preference, None
    found = [fmt for fmt, keys in FORMAT_KEYS.items() if any(k in row for k in keys)]
    if len(found) > 1:
        keys = ", ".join(k for fmt in found for k in FORMAT_KEYS[fmt] if k in row)
        return None, f"row mixes formats: {' and '.join(found)} keys in one row ({keys}); keep one format per row"
    if found:
        return found[0], None
    if "text" in row:
        return "completion", None
    keys = ", ".join(sorted(map(str, row))) or "none"
    return None, (f"unknown row format (keys: {keys}); expected instruction/input/output, messages, conversations or "
                  "text (or, for preference data, prompt/chosen/rejected or prompt/completion/label)")


def scan_rows(path: str, fmt: str = "auto", system_prompt: str | None = None) -> Iterator[ScannedRow]:
    """Every row of one data source with ALL its problems: bad rows never stop the scan (only an unreadable file)."""
    file_format = None if fmt == "auto" else fmt
    format_from = "data.format" if file_format else None
    for where, row, problem in read_rows_or_problems(path):
        if problem is not None:
            yield ScannedRow(where, None, None, None, [problem])
            continue
        row_format, problem = _detect_format(row)
        if problem is not None:
            yield ScannedRow(where, row, None, None, [problem])
            continue
        if file_format is None:
            file_format, format_from = row_format, f"line {_line_of(where)}"
        if row_format != file_format:
            reason = f"row is {row_format} but the file is {file_format} (from {format_from}); one format per file"
            yield ScannedRow(where, row, row_format, None, [reason])
            continue
        example, problems = _example_or_problems(row, row_format, where, system_prompt)
        yield ScannedRow(where, row, row_format, example, problems)


def _line_of(where: str) -> str:
    return where.rsplit(":", 1)[-1]


def load_examples(
    path: str, fmt: str = "auto", system_prompt: str | None = None, on_error: Literal["fail", "skip"] = "fail"
) -> list[Example]:
    """All rows of one data source as Examples. `fail`: any bad row raises `DataError` naming the first one (and how
    many there are); `skip`: bad rows are left out (see `load_examples_and_problems` for which)."""
    examples, problems = load_examples_and_problems(path, fmt, system_prompt)
    if problems and on_error == "fail":
        raise DataError(_first_problem_message(path, problems))
    if not examples:
        raise DataError(f"{path}: no usable rows" + (f" ({len(problems)} bad rows skipped)" if problems else ""))
    return examples


def load_examples_and_problems(
    path: str, fmt: str = "auto", system_prompt: str | None = None
) -> tuple[list[Example], list[Problem]]:
    """The valid rows as Examples, and the first problem of every bad row."""
    examples: list[Example] = []
    problems: list[Problem] = []
    for scanned in scan_rows(path, fmt, system_prompt):
        if scanned.problems:
            problems.append(Problem(scanned.where, scanned.problems[0]))
        else:
            examples.append(scanned.example)
    return examples, problems


def _first_problem_message(path: str, problems: list[Problem]) -> str:
    message = str(problems[0])
    if len(problems) > 1:
        lines = ", ".join(_line_of(p.where) for p in problems[1:6]) + (", ..." if len(problems) > 6 else "")
        message += (f" (and {len(problems) - 1} more bad rows, at {lines}; `tuneforge data check {path}` lists them "
                    "all, data.on_error=skip trains without them)")
    return message


def normalise_row(row: dict[str, Any], fmt: str, where: str, system_prompt: str | None = None) -> Example:
    example, problems = _example_or_problems(row, fmt, where, system_prompt)
    if problems:
        raise DataError(f"{where}: {problems[0]}")
    return example


def _example_or_problems(
    row: dict[str, Any], fmt: str, where: str, system_prompt: str | None
) -> tuple[Example | None, list[str]]:
    from tuneforge.data.preference_rows import PREFERENCE_FORMATS, preference_example

    if fmt in PREFERENCE_FORMATS:
        return preference_example(row, fmt, where, system_prompt)
    problems: list[str] = []
    if fmt == "completion":
        text = text_field(row, "text", problems)
        return (None, problems) if problems else (Example(source=where, text=text), [])
    if fmt == "instruction":
        messages = _instruction_messages(row, problems)
    elif fmt == "sharegpt":
        messages = chat_messages(row.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES, problems)
    else:
        messages = chat_messages(row.get("messages"), "messages", "role", "content", None, problems)
    if problems:
        return None, problems
    check_turn_order(messages, problems)
    if problems:
        return None, problems
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return Example(source=where, messages=tuple(messages)), []


def _type(value: Any) -> str:
    return type(value).__name__


def text_field(row: dict[str, Any], key: str, problems: list[str], required: bool = True) -> str:
    value = row.get(key)
    if value is None:
        if required:
            problems.append(f"missing required field '{key}'")
        return ""
    if not isinstance(value, str):
        problems.append(f"field '{key}' must be text, got {_type(value)}")
        return ""
    if required and not value.strip():
        problems.append(f"field '{key}' is empty")
    return value


def _instruction_messages(row: dict[str, Any], problems: list[str]) -> list[dict[str, str]]:
    instruction = text_field(row, "instruction", problems)
    extra = text_field(row, "input", problems, required=False)
    output = text_field(row, "output", problems)
    system = text_field(row, "system", problems, required=False)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "system", "content": system}] if system.strip() else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def chat_messages(
    turns: Any, field: str, role_key: str, content_key: str, role_map: dict[str, str] | None, problems: list[str]
) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        problems.append(f"field '{field}' must be a non-empty list of turns, got {_type(turns)}"
                        if not isinstance(turns, list) else f"field '{field}' is an empty list of turns")
        return []
    messages = []
    allowed = tuple(role_map) if role_map else ROLES
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            problems.append(f"{field}[{i}] must be an object with '{role_key}' and '{content_key}', got {_type(turn)}")
            continue
        role = turn.get(role_key)
        if role not in allowed:
            shown = f"unknown role {role!r}" if role is not None else f"missing '{role_key}'"
            problems.append(f"{field}[{i}]: {shown} (allowed: {', '.join(allowed)})")
            continue
        content = turn.get(content_key)
        if content is None:
            problems.append(f"{field}[{i}]: missing required field '{content_key}'")
            continue
        if not isinstance(content, str):
            problems.append(f"{field}[{i}].{content_key} must be text, got {_type(content)}")
            continue
        messages.append({"role": role_map[role] if role_map else role, "content": content})
    return messages


def check_turn_order(messages: list[dict[str, str]], problems: list[str]) -> None:
    """Roles in an order a chat template can render and training can learn from; turn i is the row's i-th turn."""
    seen_user = False
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "system" and i != 0:
            problems.append(f"turn {i}: a system turn may only come first")
        elif i > 0 and role == messages[i - 1]["role"]:
            problems.append(f"turn {i}: two {role} turns in a row")
        elif role == "assistant" and not seen_user:
            problems.append(f"turn {i}: assistant turn before any user turn")
        if role == "assistant" and not message["content"].strip():
            problems.append(f"turn {i}: empty assistant turn")
        seen_user = seen_user or role == "user"
    if messages[-1]["role"] != "assistant":
        problems.append("conversation does not end on an assistant turn")

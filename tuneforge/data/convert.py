"""`tuneforge data convert`: rows from one format to another (Alpaca <-> chat, ShareGPT -> chat, and preference pairs
between their paired and conversation_pairs forms, or to chat with the chosen answer for supervised training first).

Rows go through the same normalisation training uses, so a converted file trains on exactly the same examples:
an instruction row becomes the user turn `instruction` (+ blank line + `input`) and the assistant turn `output`.
Fields that belong to no format (`id`, `category`, ...) are carried over unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import json

from tuneforge.data.atomic_write import atomic_text_writer, same_file
from tuneforge.data.formats import FORMAT_KEYS, Example, scan_rows
from tuneforge.errors import DataError, UserError

TARGETS = ("chat", "instruction", "paired", "conversation_pairs")
# Keys each source format owns; `input` and `system` belong to instruction rows, `text` is a rendered copy.
_OWN_KEYS = {"instruction": ("instruction", "input", "output", "system"), "chat": ("messages",),
             "sharegpt": ("conversations",), "completion": ("text",), "paired": ("prompt", "chosen", "rejected"),
             "conversation_pairs": ("chosen", "rejected"), "unpaired": ("prompt", "completion", "label")}


@dataclass
class ConvertResult:
    rows: int
    source_format: str | None
    output: Path


def convert_file(path: str, to: str, output: str) -> ConvertResult:
    if to not in TARGETS:
        raise UserError(f"--to: got {to!r}, allowed: {', '.join(TARGETS)}")
    out = Path(output)
    if out.suffix.lower() != ".jsonl":
        raise UserError(f"-o {output}: convert writes JSON Lines; give a path ending in .jsonl")
    if same_file(path, out):
        raise UserError(f"-o {output}: that is the input file; convert never modifies its input, choose another path")
    rows, source = 0, None
    with atomic_text_writer(out) as fh:
        for scanned in scan_rows(path):
            if scanned.problems:
                raise DataError(f"{scanned.where}: {scanned.problems[0]} (nothing written; `tuneforge data clean` "
                                "drops bad rows)")
            source = source or scanned.format
            converted = convert_row(scanned.example, to, scanned.where)
            converted.update(extra_fields(scanned.row, scanned.format))
            fh.write(json.dumps(converted, ensure_ascii=False) + "\n")
            rows += 1
    return ConvertResult(rows, source, out)


def convert_row(example: Example, to: str, where: str) -> dict[str, Any]:
    if example.messages is None:
        raise DataError(f"{where}: completion rows (plain text) have no turns to convert to {to}")
    messages = [dict(m) for m in example.messages]
    if to in ("paired", "conversation_pairs"):
        if example.rejected is None:
            raise DataError(f"{where}: the row has no rejected answer to make a {to} preference row of")
        rejected = [dict(m) for m in example.rejected]
        if to == "conversation_pairs":
            return {"chosen": messages, "rejected": rejected}
        prompt = example.prompt_turns
        return {"prompt": messages[:prompt], "chosen": messages[prompt:], "rejected": rejected[prompt:]}
    if example.desirable is not None:
        raise DataError(f"{where}: an unpaired preference row converted to {to} would train on its answer even when "
                        "it is labelled undesirable; keep it for an unpaired objective")
    if to == "chat":
        return {"messages": messages}
    system = messages.pop(0)["content"] if messages[0]["role"] == "system" else None
    if len(messages) != 2:
        raise DataError(f"{where}: a conversation with {len(messages)} user/assistant turns has no instruction "
                        "form (one instruction, one output); keep it as chat")
    row = {"instruction": messages[0]["content"], "output": messages[1]["content"]}
    if system is not None:
        row["system"] = system
    return row


def extra_fields(row: dict[str, Any], fmt: str) -> dict[str, Any]:
    format_keys = {k for keys in FORMAT_KEYS.values() for k in keys} | set(_OWN_KEYS[fmt]) | {"text"}
    return {k: v for k, v in row.items() if k not in format_keys}

"""Preference rows (DPO and kin): which answer is better, normalised into `Example`s like every other row.

Three row forms, detected per file from the first row like the SFT formats (see formats.py):
- paired:        {"prompt", "chosen", "rejected"}: text, or `prompt` as a message list and `chosen`/`rejected` as
                 lists of assistant messages (TRL's conversational form)
- conversation_pairs: {"chosen": [...], "rejected": [...]}: two whole conversations sharing a prefix (HH-RLHF
                 style); the shared prefix, up to its last user turn, is the prompt
- unpaired:      {"prompt", "completion", "label": true|false}: one answer marked desirable or not (KTO)

An Example of a pair holds `messages` = prompt + chosen and `rejected` = prompt + rejected, with `prompt_turns`
saying where the shared prompt ends; an unpaired row holds prompt + completion and `desirable`. So lengths,
duplicates and chat templates work on preference rows as on any other, and the prompt is one list of turns that the
training side can compute once per pair.
"""

from __future__ import annotations

from typing import Any

from tuneforge.data import formats

PREFERENCE_FORMATS = ("paired", "conversation_pairs", "unpaired")


def preference_format(row: dict[str, Any]) -> str | None:
    """The preference form a row is in, or None when it is no preference row."""
    if "chosen" in row or "rejected" in row:
        return "paired" if "prompt" in row else "conversation_pairs"
    if "label" in row and "completion" in row:
        return "unpaired"
    return None


def preference_example(row: dict[str, Any], fmt: str, where: str,
                       system_prompt: str | None) -> tuple[formats.Example | None, list[str]]:
    problems: list[str] = []
    if fmt == "conversation_pairs":
        prompt, chosen, rejected = _from_conversations(row, problems)
    else:
        prompt = _prompt(row, problems)
        chosen = _completion(row, "chosen" if fmt == "paired" else "completion", problems)
        rejected = _completion(row, "rejected", problems) if fmt == "paired" else None
    desirable = _label(row, problems) if fmt == "unpaired" else None
    if problems:
        return None, problems
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if answer is not None:
            order: list[str] = []
            formats.check_turn_order(prompt + answer, order)
            problems.extend(f"{name}: {p}" for p in order)
    if rejected is not None and chosen == rejected:
        problems.append("chosen and rejected are identical: the pair says nothing about which answer is better")
    if problems:
        return None, problems
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}] + prompt
    return formats.Example(source=where, messages=tuple(prompt + chosen),
                           rejected=None if rejected is None else tuple(prompt + rejected),
                           desirable=desirable, prompt_turns=len(prompt)), []


def _prompt(row: dict[str, Any], problems: list[str]) -> list[dict[str, str]]:
    value = row.get("prompt")
    if isinstance(value, list):
        turns = formats.chat_messages(value, "prompt", "role", "content", None, problems)
        if turns and turns[-1]["role"] != "user":
            problems.append("field 'prompt' must end on a user turn")
        return turns
    text = formats.text_field(row, "prompt", problems)
    return [{"role": "user", "content": text}]


def _completion(row: dict[str, Any], field: str, problems: list[str]) -> list[dict[str, str]]:
    value = row.get(field)
    if isinstance(value, list):
        turns = formats.chat_messages(value, field, "role", "content", None, problems)
        for i, turn in enumerate(turns):
            if turn["role"] != "assistant":
                problems.append(f"{field}[{i}]: a {turn['role']} turn in an answer (only assistant turns)")
        return turns
    text = formats.text_field(row, field, problems)
    return [{"role": "assistant", "content": text}]


def _from_conversations(row: dict[str, Any], problems: list[str]):
    """(prompt, chosen answer, rejected answer) of two conversations that share everything up to the answer."""
    sides = {}
    for field in ("chosen", "rejected"):
        value = row.get(field)
        if isinstance(value, str):
            problems.append(f"field '{field}' is text: give a 'prompt' field too, or '{field}' as a message list")
        elif value is None:
            problems.append(f"missing required field '{field}'")
        else:
            sides[field] = formats.chat_messages(value, field, "role", "content", None, problems)
    if problems:
        return None, None, None
    chosen, rejected = sides["chosen"], sides["rejected"]
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) == len(rejected):
        problems.append("chosen and rejected are identical: the pair says nothing about which answer is better")
        return None, None, None
    # The prompt ends at the last user turn both share; after it, each side may hold only its answer.
    end = max((i + 1 for i in range(shared) if chosen[i]["role"] == "user"), default=0)
    for field, turns in (("chosen", chosen), ("rejected", rejected)):
        later_user = next((i for i in range(end, len(turns)) if turns[i]["role"] != "assistant"), None)
        if later_user is not None:
            problems.append(f"chosen and rejected have different prompts: they differ from turn {shared}, and "
                            f"{field} turn {later_user} is a {turns[later_user]['role']} turn after that")
            return None, None, None
    if end == 0:
        problems.append("chosen and rejected share no user turn: no prompt to answer")
        return None, None, None
    return chosen[:end], chosen[end:], rejected[end:]


def _label(row: dict[str, Any], problems: list[str]) -> bool | None:
    value = row.get("label")
    if not isinstance(value, bool):
        problems.append(f"field 'label' must be true or false, got {value!r}")
        return None
    return value

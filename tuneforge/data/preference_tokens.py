"""Preference pairs as tokens: one prompt and two completions, so training can compute the prompt once per pair.

Each side is rendered and tokenized exactly as a supervised conversation is (`chat_pieces`, each piece on its own:
what inference sees), and the prompt is the pieces before the answer. Both sides' prompt tokens must come out equal,
since they are one copy in the packed row (tuneforge.data.batching.collate_pairs); a template that renders the same
prompt differently depending on the answer after it is refused in one line.

Targets of a completion are its answer tokens through the end-of-turn token, as in supervised training; text a
template puts after the end of turn is context, not scored.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.data.formats import Example
from tuneforge.data.tokenize import TokenizeReport, chat_pieces, pieces_tokens, render_prompt
from tuneforge.errors import DataError


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    chosen_target: list[bool]  # chosen_target[i]: token i of the completion is scored (predicted from what precedes)
    rejected_ids: list[int]
    rejected_target: list[bool]
    source: str
    origin: str = ""
    reference: tuple[float, float] | None = None  # the reference model's (chosen, rejected) log-probabilities

    @property
    def packed_length(self) -> int:
        """One prompt and both completions: what the pair costs in a packed row."""
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)

    @property
    def num_targets(self) -> int:
        return sum(self.chosen_target) + sum(self.rejected_target)


@dataclass
class TokenizedUnpaired:
    """One answer marked desirable or not (KTO), with the answer of another example to the same prompt format for
    KTO's KL estimate (`kl_ids`: the previous example's answer, as TRL pairs them: a mismatched completion)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    completion_target: list[bool]
    desirable: bool
    kl_ids: list[int]
    kl_target: list[bool]
    source: str
    origin: str = ""
    reference: tuple[float, float] | None = None  # the reference's log-probabilities of (completion, KL completion)

    @property
    def packed_length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def num_targets(self) -> int:
        return sum(self.completion_target)

    def as_pair(self, kl: bool = False) -> TokenizedPair:
        """The prompt with its completion (or its KL completion) as a pair's chosen side, no rejected side."""
        ids, target = (self.kl_ids, self.kl_target) if kl else (self.completion_ids, self.completion_target)
        return TokenizedPair(self.prompt_ids, ids, target, [], [], self.source, self.origin)


def _prompt_and_answer(tokenizer, example: Example, turns) -> tuple[list[int], list[int], list[bool]]:
    """(prompt ids, answer ids, answer targets) of one side, tokenized as the whole conversation is."""
    prompt_text = render_prompt(tokenizer, list(example.messages[: example.prompt_turns]))
    pieces = chat_pieces(tokenizer, turns)
    ids, target, ends = pieces_tokens(tokenizer, pieces)
    consumed = 0
    for (text, _), end in zip(pieces, ends):
        consumed += len(text)
        if consumed == len(prompt_text):
            return ids[:end], ids[end:], target[end:]
    raise DataError(f"{example.source}: the chat template does not render the prompt as the start of the "
                    "conversation, so the answer cannot be separated from it")


def tokenize_pair(tokenizer, example: Example) -> TokenizedPair:
    sides = [_prompt_and_answer(tokenizer, example, turns) for turns in (example.messages, example.rejected)]
    (prompt, chosen, chosen_target), (other_prompt, rejected, rejected_target) = sides
    if prompt != other_prompt:
        raise DataError(f"{example.source}: the chat template renders this pair's prompt differently before the chosen "
                        "and the rejected answer, so one copy of it cannot serve both")
    return TokenizedPair(prompt, chosen, chosen_target, rejected, rejected_target, example.source, example.origin)


def fit_pair(pair: TokenizedPair, max_length: int, overlong: str) -> TokenizedPair | None:
    """Each side (prompt + completion) within max_length, or None (dropped). Like a supervised conversation, the
    completions stay whole and the prompt loses tokens from its middle (its start and the end of the question stay)."""
    longest = max(len(pair.chosen_ids), len(pair.rejected_ids))  # an unpaired example has no rejected side
    if len(pair.prompt_ids) + longest <= max_length:
        return pair
    budget = max_length - longest
    if overlong == "drop" or budget < 2:
        return None
    head = budget // 2
    prompt = pair.prompt_ids[:head] + pair.prompt_ids[len(pair.prompt_ids) - (budget - head):]
    return TokenizedPair(prompt, pair.chosen_ids, pair.chosen_target, pair.rejected_ids, pair.rejected_target,
                         pair.source, pair.origin)


def tokenize_pairs(tokenizer, examples: list[Example], max_length: int,
                   overlong: str) -> tuple[list[TokenizedPair], TokenizeReport]:
    report = TokenizeReport()
    kept: list[TokenizedPair] = []
    for example in examples:
        tokenized = tokenize_pair(tokenizer, example)
        fitted = fit_pair(tokenized, max_length, overlong)
        if fitted is None or not any(fitted.chosen_target) or not any(fitted.rejected_target):
            report.dropped += 1
            report.dropped_sources.append(example.source)
            continue
        report.truncated += fitted is not tokenized
        kept.append(fitted)
    report.kept = len(kept)
    return kept, report


def tokenize_unpaired(tokenizer, examples: list[Example], max_length: int,
                      overlong: str) -> tuple[list[TokenizedUnpaired], TokenizeReport]:
    """KTO's examples: unpaired rows as they are; a pair gives two (its chosen answer desirable, its rejected one
    not), as TRL's unpair_preference_dataset does. Each example's KL completion is the previous kept example's answer
    (the first takes the last's): fixed, so the reference's log-probability of it is computed once."""
    report = TokenizeReport()
    kept: list[tuple[list[int], list[int], list[bool], bool, str, str]] = []
    for example in examples:
        sides = [(example.messages, True if example.desirable is None else example.desirable)]
        if example.rejected is not None:
            sides.append((example.rejected, False))
        for turns, desirable in sides:
            prompt, answer, target = _prompt_and_answer(tokenizer, example, turns)
            fitted = fit_pair(TokenizedPair(prompt, answer, target, [], [], example.source), max_length, overlong)
            if fitted is None or not any(fitted.chosen_target):
                report.dropped += 1
                report.dropped_sources.append(example.source)
                continue
            report.truncated += len(fitted.prompt_ids) < len(prompt)
            kept.append((fitted.prompt_ids, answer, target, desirable, example.source, example.origin))
    report.kept = len(kept)
    return [TokenizedUnpaired(prompt, answer, target, desirable, kept[i - 1][1], kept[i - 1][2], source, origin)
            for i, (prompt, answer, target, desirable, source, origin) in enumerate(kept)], report

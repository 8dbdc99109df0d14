"""From the `data:` section of a run to tokenized train and validation sets, with a report of what was kept."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np

from tuneforge.config import DataSettings, DataSource, data_sources
from tuneforge.data.formats import Example, load_examples, load_examples_and_problems
from tuneforge.data.preference_tokens import TokenizedPair, TokenizedUnpaired, tokenize_pairs, tokenize_unpaired
from tuneforge.data.tokenize import TokenizedExample, TokenizeReport, ensure_chat_template, tokenize_all
from tuneforge.errors import DataError

log = logging.getLogger("tuneforge")
SKIPPED_SHOWN = 20  # skipped rows logged with their reason (all are counted and their lines listed)


@dataclass
class PreparedData:
    train: list[TokenizedExample] | list[TokenizedPair] | list[TokenizedUnpaired]
    val: list[TokenizedExample] | list[TokenizedPair] | list[TokenizedUnpaired]
    train_report: TokenizeReport
    val_report: TokenizeReport | None
    val_rows: list[Example] = dataclasses.field(default_factory=list)  # untokenized: generation metrics need them

    def summary(self) -> str:
        line = f"train: {self.train_report.summary()}"
        if self.val_report is not None:
            line += f"; val: {self.val_report.summary()}"
        return line


def read_raw(data: DataSettings, seed: int, objective: str = "sft") -> tuple[list[Example], list[Example]]:
    """Rows of train and validation data (validated, not tokenized): fast, so bad data fails before model loading.
    Each row's `origin` names its source; with val_split, every training source gives its own share. `objective`:
    what the rows must be (supervised rows for sft, preference pairs for the preference objectives)."""
    train: list[Example] = []
    val: list[Example] = []
    for source in data_sources(data.train):
        rows = _source_rows(source, data, seed, objective)
        if data.val is None and data.val_split > 0:
            rows, held_out = split_examples(rows, data.val_split, seed)
            val += held_out
        train += rows
    if data.val is not None:
        val = [row for source in data_sources(data.val) for row in _source_rows(source, data, seed, objective)]
    return train, val


def _source_rows(source: DataSource, data: DataSettings, seed: int, objective: str) -> list[Example]:
    rows = _validated_rows(source.path, data, data.format if source.format == "default" else source.format)
    _check_rows_fit(rows, objective)
    if source.max_rows is not None and len(rows) > source.max_rows:
        keep = sorted(np.random.default_rng([seed, len(rows)]).choice(len(rows), source.max_rows, replace=False))
        rows = [rows[i] for i in keep]
    return [dataclasses.replace(row, origin=source.name) for row in rows]


def _validated_rows(path: str, data: DataSettings, fmt: str) -> list[Example]:
    """The checks of `tuneforge data check` (every row, every problem); bad rows fail the run or are skipped."""
    if data.on_error == "fail":
        return load_examples(path, fmt, data.system_prompt, on_error="fail")
    examples, problems = load_examples_and_problems(path, fmt, data.system_prompt)
    if problems:
        lines = ", ".join(p.where.rsplit(":", 1)[-1] for p in problems)
        log.warning("data: skipped %d bad rows of %s (data.on_error=skip): lines %s", len(problems), path, lines)
        for problem in problems[:SKIPPED_SHOWN]:
            log.warning("data: skipped %s", problem)
        if len(problems) > SKIPPED_SHOWN:
            log.warning("data: ... `tuneforge data check %s` lists the other %d", path, len(problems) - SKIPPED_SHOWN)
    if not examples:
        raise DataError(f"{path}: no usable rows ({len(problems)} bad rows skipped)")
    return examples


def _check_rows_fit(examples: list[Example], objective: str) -> None:
    """A file's rows (one form per file) must be what the objective learns from."""
    first = examples[0]
    if objective == "sft":
        # Training on preference rows as if supervised would learn the rejected (or undesirable) answers too.
        if first.is_preference:
            kind = "paired" if first.rejected is not None else "unpaired"
            raise DataError(f"{first.source}: this file holds {kind} preference rows, and objective is 'sft'; set "
                            "objective: dpo (or ipo, simpo, orpo) to learn from the pairs, or keep only the chosen "
                            "answers for supervised training with `tuneforge data convert FILE --to chat -o OUT`")
    elif objective == "kto":
        if not first.is_preference:
            raise DataError(f"{first.source}: objective 'kto' learns from answers marked desirable or not "
                            "({prompt, completion, label} rows, or pairs: chosen desirable, rejected not), and this "
                            "file holds supervised rows")
    elif first.rejected is None:
        kind = "unpaired rows (prompt, completion, label: KTO's form)" if first.is_preference else "supervised rows"
        raise DataError(f"{first.source}: objective {objective!r} learns from pairs ({{prompt, chosen, rejected}} or "
                        f"{{chosen, rejected}} conversations), and this file holds {kind}"
                        + ("; objective kto learns from them" if first.is_preference else ""))


def split_examples(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    n_val = max(1, round(len(examples) * fraction))
    if n_val >= len(examples):
        raise DataError(f"data.val_split={fraction} leaves no training examples out of {len(examples)}")
    order = np.random.default_rng(seed).permutation(len(examples))
    val_idx = set(order[:n_val].tolist())
    train = [ex for i, ex in enumerate(examples) if i not in val_idx]
    val = [ex for i, ex in enumerate(examples) if i in val_idx]
    return train, val


def tokenize_data(
    data: DataSettings, tokenizer, train_rows: list[Example], val_rows: list[Example], objective: str = "sft"
) -> PreparedData:
    """Supervised rows become `TokenizedExample`s, preference pairs `TokenizedPair`s (one prompt, two answers), and
    KTO's rows `TokenizedUnpaired`s (one answer, desirable or not)."""
    ensure_chat_template(tokenizer)
    pairs = bool(train_rows) and train_rows[0].rejected is not None

    def tokenize(rows: list[Example], on_prompt: bool):
        if objective == "kto":
            return tokenize_unpaired(tokenizer, rows, data.max_length, data.overlong)
        if pairs:
            return tokenize_pairs(tokenizer, rows, data.max_length, data.overlong)
        return tokenize_all(tokenizer, rows, data.max_length, data.overlong, on_prompt)

    train, train_report = tokenize(train_rows, data.train_on_prompt)
    if not train:
        paths = ", ".join(s.path for s in data_sources(data.train))
        raise DataError(f"{paths}: no usable training examples after tokenization ({train_report.summary()})")
    val, val_report = [], None
    if val_rows:
        # Validation always measures the answer tokens: it is the quantity users compare across runs.
        val, val_report = tokenize(val_rows, False)
    return PreparedData(train, val, train_report, val_report, list(val_rows))

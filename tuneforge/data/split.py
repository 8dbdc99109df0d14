"""`tuneforge data split`: train / validation / test files, stratified by a field, or held out by answer word.

Two streaming passes: the first reads only what the assignment needs (each row's class, the `--by` field, or the
words of its reference answer), the second writes every row to its split.
- Random (stratified with --by): each class is shuffled with the seed and cut by the fractions, so every split keeps
  the class proportions (a class too small for a row in a split sends all its rows to train).
- Unseen answers (--unseen-answers): held-out rows are every row whose answer holds one of a set of held-out words,
  so no training answer holds any of them. Why: when the test rows name people, places or values the training rows
  never name, a random validation split shares them with training and rewards memorising; a configuration search
  scored on it picks the configurations that recall best and generalise worst (measured: bench/tune.py).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tuneforge.data.atomic_write import atomic_text_writer, same_file
from tuneforge.data.formats import ScannedRow, read_rows, scan_rows
from tuneforge.errors import DataError, UserError

SPLITS = ("train", "val", "test")


@dataclass
class SplitResult:
    outputs: dict[str, Path]
    counts: dict[str, int]
    by_class: dict[str, Counter]  # split -> class -> rows (empty without --by)


def split_file(path: str, val: float, test: float = 0.0, by: str | None = None, seed: int = 42,
               out_dir: str | None = None, unseen_answers: bool = False) -> SplitResult:
    if not 0 < val < 1 or not 0 <= test < 1 or val + test >= 1:
        raise UserError(f"--val {val} --test {test}: each must be a fraction in (0, 1) and together below 1")
    if by and unseen_answers:
        raise UserError("--by and --unseen-answers: choose one way to split (stratified, or held out by answer word)")
    classes = [_class_of(row, by, where) for where, row in read_rows(path)] if by else None
    if unseen_answers:
        answers = [answer_words(scanned) for scanned in scan_rows(path)]
        n = len(answers)
    else:
        n = len(classes) if classes is not None else sum(1 for _ in read_rows(path))
    if n == 0:
        raise DataError(f"{path}: no rows")
    if unseen_answers:
        assignment = assign_unseen(answers, val, test, seed, path)
    else:
        assignment = _assign(classes if classes is not None else [""] * n, val, test, seed)
    src = Path(path)
    folder = Path(out_dir) if out_dir else src.parent
    outputs = {name: folder / f"{src.stem}.{name}.jsonl" for name in SPLITS if name != "test" or test > 0}
    for target in outputs.values():
        if same_file(src, target):
            raise UserError(f"{target}: would overwrite the input; pass --out-dir")
    counts = Counter(assignment.tolist())
    by_class: dict[str, Counter] = {name: Counter() for name in outputs}
    with ExitStack() as stack:  # every split file appears only if all were written
        handles = {name: stack.enter_context(atomic_text_writer(target)) for name, target in outputs.items()}
        for index, (_, row) in enumerate(read_rows(path)):
            name = SPLITS[assignment[index]]
            handles[name].write(json.dumps(row, ensure_ascii=False) + "\n")
            if classes is not None:
                by_class[name][classes[index]] += 1
    return SplitResult(outputs, {SPLITS[k]: v for k, v in sorted(counts.items())},
                       by_class if classes is not None else {})


def _class_of(row, by: str, where: str) -> str:
    if not isinstance(row, dict) or by not in row:
        raise DataError(f"{where}: missing field '{by}' (--by)")
    value = row[by]
    return value if isinstance(value, str) else json.dumps(value)


def _assign(classes: list[str], val: float, test: float, seed: int) -> np.ndarray:
    """Split number (0 train, 1 val, 2 test) per row; per class: shuffle, then the first rows go to test and val."""
    rng = np.random.default_rng(seed)
    assignment = np.zeros(len(classes), dtype=np.int8)
    members: dict[str, list[int]] = {}
    for index, value in enumerate(classes):
        members.setdefault(value, []).append(index)
    for value in sorted(members):
        order = rng.permutation(np.asarray(members[value]))
        n_test, n_val = round(len(order) * test), round(len(order) * val)
        assignment[order[:n_test]] = 2
        assignment[order[n_test : n_test + n_val]] = 1
    return assignment


WORD = re.compile(r"\w+")
WIDEST_HELD_WORD = 0.5  # a held-out word is in at most this share of a split's target rows: a word in most answers
#                          (a field name, "the") would take every row with it


def answer_words(scanned: ScannedRow) -> frozenset[str]:
    """The lower-cased words of a row's reference answer (its last turn; a completion row's text); none for a row
    that does not parse (it goes to train, where training reports it)."""
    example = scanned.example
    if example is None:
        return frozenset()
    answer = example.messages[-1]["content"] if example.messages else example.text or ""
    return frozenset(WORD.findall(answer.lower()))


def assign_unseen(answers: list[frozenset[str]], val: float, test: float, seed: int, path: str) -> np.ndarray:
    """Split number per row (0 train, 1 val, 2 test): words drawn in a seeded order, each sending every row whose
    answer holds it to the split being filled, until the split has its share of the rows. A word that would
    overfill the split is passed over, so the shares come out within a few rows of the fractions."""
    rng = np.random.default_rng(seed)
    n = len(answers)
    assignment = np.zeros(n, dtype=np.int8)
    rows_of: dict[str, list[int]] = {}
    for index, words in enumerate(answers):
        for word in words:
            rows_of.setdefault(word, []).append(index)
    words = sorted(rows_of)
    order = [words[i] for i in rng.permutation(len(words))]
    for split, fraction, name in ((2, test, "--test"), (1, val, "--val")):
        target = round(n * fraction)
        if target == 0:
            continue
        taken = 0
        for word in order:
            free = [i for i in rows_of[word] if assignment[i] == 0]
            if not free or len(rows_of[word]) > max(1, WIDEST_HELD_WORD * target) or taken + len(free) > target * 1.1:
                continue
            assignment[free] = split
            taken += len(free)
            if taken >= target * 0.9:
                break
        if taken < target * 0.9:
            raise DataError(f"{path}: --unseen-answers found words for only {taken} of the {target} rows {name} "
                            f"asks for (the answers share their words too widely to hold rows out by word); "
                            "split at random instead")
    return assignment

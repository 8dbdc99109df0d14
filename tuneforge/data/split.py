"""`tuneforge data split`: train / validation / test files, stratified by a field when asked.

Two streaming passes: the first reads only each row's class (the `--by` field), the second writes every row to its
split. Each class is shuffled with the seed and cut by the fractions, so every split keeps the class proportions
(a class too small for a row in a split sends all its rows to train).
"""

from __future__ import annotations

import json
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tuneforge.data.atomic_write import atomic_text_writer, same_file
from tuneforge.data.formats import read_rows
from tuneforge.errors import DataError, UserError

SPLITS = ("train", "val", "test")


@dataclass
class SplitResult:
    outputs: dict[str, Path]
    counts: dict[str, int]
    by_class: dict[str, Counter]  # split -> class -> rows (empty without --by)


def split_file(path: str, val: float, test: float = 0.0, by: str | None = None, seed: int = 42,
               out_dir: str | None = None) -> SplitResult:
    if not 0 < val < 1 or not 0 <= test < 1 or val + test >= 1:
        raise UserError(f"--val {val} --test {test}: each must be a fraction in (0, 1) and together below 1")
    classes = [_class_of(row, by, where) for where, row in read_rows(path)] if by else None
    n = len(classes) if classes is not None else sum(1 for _ in read_rows(path))
    if n == 0:
        raise DataError(f"{path}: no rows")
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

"""`tuneforge data check` and `data clean`: every problem of every row, duplicates, token lengths and balance.

One streaming pass over the files keeps, per row, a few dozen bytes (line number, token length, band hashes; see
`dedup.py`), never the text; a second pass reads back only the rows that LSH paired as candidate near-duplicates
(`clean` makes a third, writing the kept rows). So memory stays bounded whatever the files' size.
"""

from __future__ import annotations

import json
from array import array
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tuneforge.data.atomic_write import atomic_text_writer, same_file
from tuneforge.data.dedup import NEAR_DUP_THRESHOLD, DuplicateFinder, DuplicateGroups, word_set
from tuneforge.data.formats import Example, Problem, detect_format, normalise_row, read_rows_or_problems, scan_rows
from tuneforge.data.lengths import LengthCounter, histogram, length_summary, would_be_dropped
from tuneforge.errors import DataError, UserError

BALANCE_RATIO = 5.0  # warn when the largest class has more than this many times the rows of the smallest
MIN_ANSWER_TOKENS = 3  # answers shorter than this are flagged
LISTED = 100  # rows listed per warning in the report (counts are always complete)
_BATCH = 4096  # rows tokenized per batch


@dataclass
class FileSummary:
    path: str
    rows: int = 0
    bad_rows: int = 0
    format: str | None = None
    error: str | None = None  # set when the file could not be read (to the end)


class RowIndex:
    """Row number -> `file:line`, for every row of every file, at 6 bytes a row."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self._file = array("H")
        self._line = array("I")
        self._row_style: list[bool] = []  # `file:row N` (JSON, Parquet, datasets) rather than `file:line`

    def start_file(self, path: str) -> int:
        self.paths.append(path)
        self._row_style.append(False)
        return len(self.paths) - 1

    def add(self, file_no: int, where: str) -> int:
        suffix = where.rsplit(":", 1)[-1]
        if suffix.startswith("row "):
            self._row_style[file_no] = True
            suffix = suffix[4:]
        self._file.append(file_no)
        self._line.append(int(suffix))
        return len(self._line) - 1

    def __len__(self) -> int:
        return len(self._line)

    def where(self, index: int) -> str:
        file_no = self._file[index]
        return f"{self.paths[file_no]}:{'row ' if self._row_style[file_no] else ''}{self._line[index]}"


@dataclass
class CheckReport:
    files: list[FileSummary]
    rows: RowIndex
    problems: list[Problem] = field(default_factory=list)
    bad_rows: set[int] = field(default_factory=set)
    duplicates: DuplicateGroups = field(default_factory=DuplicateGroups)
    near_threshold: float = NEAR_DUP_THRESHOLD
    tokenizer_name: str | None = None
    max_length: int | None = None
    lengths: np.ndarray | None = None
    overlong: list[int] = field(default_factory=list)
    overlong_dropped: int = 0
    min_answer_tokens: int = MIN_ANSWER_TOKENS
    short_answers: list[int] = field(default_factory=list)
    balance_field: str | None = None
    balance: Counter = field(default_factory=Counter)
    balance_ratio: float = BALANCE_RATIO

    # ---- verdict ----------------------------------------------------------------------------------------------
    @property
    def unreadable(self) -> list[FileSummary]:
        return [f for f in self.files if f.error]

    @property
    def duplicate_rows(self) -> int:
        return len(self.duplicates.dropped())

    @property
    def exit_code(self) -> int:
        """0 clean, 1 problems found (bad rows or duplicates), 2 a file could not be read."""
        if self.unreadable:
            return 2
        return 1 if self.problems or self.duplicate_rows else 0

    def verdict(self) -> str:
        total = len(self.rows)
        if self.unreadable:
            return f"verdict: unreadable - {len(self.unreadable)} file(s) could not be read (exit 2)"
        found = []
        if self.bad_rows:
            found.append(f"{len(self.bad_rows):,} bad rows")
        exact = sum(len(g) - 1 for g in self.duplicates.exact)
        near = self.duplicate_rows - exact
        if exact:
            found.append(f"{exact:,} exact duplicates")
        if near:
            found.append(f"{near:,} near duplicates")
        if len(self.problems) and not self.bad_rows:
            found.append(f"{len(self.problems)} file problem(s)")
        if found:
            return f"verdict: problems found in {total:,} rows - {', '.join(found)} (exit 1)"
        warnings = len(self.warnings())
        note = f"; {warnings} warning(s) above" if warnings else ""
        return f"verdict: clean - {total:,} rows, no bad rows, no duplicates{note} (exit 0)"

    def warnings(self) -> list[str]:
        out = []
        if self.overlong:
            out.append(f"{len(self.overlong):,} rows over max length {self.max_length}")
        if self.short_answers:
            out.append(f"{len(self.short_answers):,} very short answers")
        warning = self.balance_warning()
        if warning:
            out.append(warning)
        return out

    def balance_warning(self) -> str | None:
        if len(self.balance) < 2:
            return None
        (top, most), (bottom, least) = self.balance.most_common()[0], self.balance.most_common()[-1]
        if most > self.balance_ratio * least:
            return (f"imbalanced {self.balance_field}: largest class {top!r} ({most:,} rows) is "
                    f"{most / least:.1f}x the smallest {bottom!r} ({least:,}); limit {self.balance_ratio:g}x")
        return None

    # ---- output -----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        where = self.rows.where
        dup = self.duplicates
        out: dict[str, Any] = {
            "files": [vars(f) for f in self.files],
            "rows": len(self.rows),
            "bad_rows": len(self.bad_rows),
            "problems": [{"where": p.where, "reason": p.reason} for p in self.problems],
            "exact_duplicates": [[where(i) for i in g] for g in dup.exact],
            "near_duplicates": {
                "threshold": self.near_threshold,
                "groups": [
                    {"rows": [where(i) for i in g],
                     "similar_to": {where(i): [where(dup.near_partner[i][0]), round(dup.near_partner[i][1], 3)]
                                    for i in g}}
                    for g in dup.near
                ],
            },
        }
        if self.lengths is not None:
            out["lengths"] = {
                "tokenizer": self.tokenizer_name,
                **length_summary(self.lengths),
                "histogram": histogram(self.lengths),
                "max_length": self.max_length,
                "over_max_length": len(self.overlong),
                "would_truncate": len(self.overlong) - self.overlong_dropped,
                "would_drop": self.overlong_dropped,
                "over_max_length_rows": [where(i) for i in self.overlong[:LISTED]],
                "min_answer_tokens": self.min_answer_tokens,
                "short_answers": len(self.short_answers),
                "short_answer_rows": [where(i) for i in self.short_answers[:LISTED]],
            }
        if self.balance_field:
            out["balance"] = {"field": self.balance_field, "counts": dict(self.balance.most_common()),
                              "max_ratio": self.balance_ratio, "warning": self.balance_warning()}
        out["warnings"] = self.warnings()
        out["verdict"] = self.verdict()
        out["exit_code"] = self.exit_code
        return out

    def render(self, show: int = 50) -> str:
        """The report as readable tables; `show` caps each listing (the counts are always complete)."""
        where = self.rows.where
        lines = [f"files: {len(self.files)}, rows: {len(self.rows):,}"]
        for f in self.files:
            state = f"unreadable: {f.error}" if f.error else f"{f.rows:,} rows, {f.format or 'no'} format"
            lines.append(f"  {f.path}: {state}" + (f", {f.bad_rows:,} bad" if f.bad_rows else ""))
        lines.append("")
        lines.append(f"problems: {_n(len(self.problems), 'problem')} in {_n(len(self.bad_rows), 'row')}"
                     if self.problems else "problems: none")
        lines += [f"  {p}" for p in self.problems[:show]]
        lines += _more(len(self.problems), show)
        dup = self.duplicates
        lines.append("")
        exact_extra = sum(len(g) - 1 for g in dup.exact)
        lines.append(f"exact duplicates (whitespace and case ignored): {_n(len(dup.exact), 'group')}, "
                     f"{_n(exact_extra, 'extra row')}" if dup.exact else "exact duplicates: none")
        lines += ["  " + ", ".join(where(i) for i in g) for g in dup.exact[:show]]
        lines += _more(len(dup.exact), show)
        near_extra = sum(len(g) - 1 for g in dup.near)
        lines.append(f"near duplicates (word Jaccard >= {self.near_threshold:g}): {_n(len(dup.near), 'group')}, "
                     f"{_n(near_extra, 'extra row')}" if dup.near else
                     f"near duplicates (word Jaccard >= {self.near_threshold:g}): none")
        for group in dup.near[:show]:
            best = max(dup.near_partner[i][1] for i in group)
            worst = min(dup.near_partner[i][1] for i in group)
            span = f"{best:.2f}" if best == worst else f"{worst:.2f}-{best:.2f}"
            lines.append("  " + ", ".join(where(i) for i in group) + f"  (similarity {span})")
        lines += _more(len(dup.near), show)
        if self.lengths is not None:
            lines += [""] + self._render_lengths(show)
        if self.balance_field:
            lines += [""] + self._render_balance(show)
        lines += ["", self.verdict()]
        return "\n".join(lines)

    def _render_lengths(self, show: int) -> list[str]:
        where = self.rows.where
        s = length_summary(self.lengths)
        lines = [f"lengths in tokens ({self.tokenizer_name} tokenizer and chat template), {s['rows']:,} valid rows:"]
        if not s["rows"]:
            return lines
        lines.append("  " + "  ".join(f"{k} {s[k]:,}" for k in ("min", "mean", "p50", "p90", "p95", "p99", "max")))
        bins = histogram(self.lengths)
        widest = max(b["rows"] for b in bins)
        for b in bins:
            label = f"{b['from']:>6,} - {b['to']:>6,}" if b["to"] is not None else f"{b['from']:>6,} +       "
            bar = "#" * max(1 if b["rows"] else 0, round(40 * b["rows"] / widest))
            lines.append(f"  {label} | {bar:<40} {b['rows']:,}")
        if self.overlong:
            lines.append(f"  over max length {self.max_length}: {_n(len(self.overlong), 'row')} "
                         f"({len(self.overlong) - self.overlong_dropped:,} would be truncated, "
                         f"{self.overlong_dropped:,} dropped under data.overlong=truncate; all with overlong=drop)")
            lines += [f"    {where(i)}" for i in self.overlong[: min(show, 10)]]
            lines += ["  " + m for m in _more(len(self.overlong), min(show, 10))]
        else:
            lines.append(f"  over max length {self.max_length}: none")
        if self.short_answers:
            lines.append(f"  very short answers (< {self.min_answer_tokens} tokens): "
                         f"{_n(len(self.short_answers), 'row')}")
            lines += [f"    {where(i)}" for i in self.short_answers[: min(show, 10)]]
            lines += ["  " + m for m in _more(len(self.short_answers), min(show, 10))]
        return lines

    def _render_balance(self, show: int) -> list[str]:
        total = sum(self.balance.values())
        width = max([len(str(k)) for k, _ in self.balance.most_common(show)] + [len(self.balance_field), 5])
        lines = [f"balance by {self.balance_field}:", f"  {self.balance_field:<{width}}  {'rows':>9}  share"]
        for value, count in self.balance.most_common(show):
            lines.append(f"  {str(value):<{width}}  {count:>9,}  {count / total:6.1%}")
        lines += _more(len(self.balance), show)
        warning = self.balance_warning()
        if warning:
            lines.append(f"  warning: {warning}")
        return lines


def _n(count: int, word: str) -> str:
    return f"{count:,} {word}{'' if count == 1 else 's'}"


def _more(total: int, shown: int) -> list[str]:
    return [f"  ... and {total - shown:,} more (--json lists all)"] if total > shown else []


# ---------------------------------------------------------------------------------------------------------------------
# The check itself.


def check_files(
    paths: list[str],
    tokenizer=None,
    tokenizer_name: str | None = None,
    max_length: int = 1024,
    by: str | None = None,
    near_threshold: float = NEAR_DUP_THRESHOLD,
    balance_ratio: float = BALANCE_RATIO,
    min_answer_tokens: int = MIN_ANSWER_TOKENS,
    fmt: str = "auto",
) -> CheckReport:
    """Check every row of every file. Without a tokenizer there is no length report."""
    report = CheckReport(files=[], rows=RowIndex(), near_threshold=near_threshold, tokenizer_name=tokenizer_name,
                         max_length=max_length, min_answer_tokens=min_answer_tokens, balance_field=by,
                         balance_ratio=balance_ratio)
    finder = DuplicateFinder(near_threshold)
    counter = LengthCounter(tokenizer) if tokenizer is not None else None
    lengths = array("i")
    batch: list[tuple[int, Example]] = []
    # The Rust tokenizer releases the GIL: one batch is tokenized in a worker thread while this thread parses,
    # validates and hashes the next one, so the two halves of the work overlap on a 2-core machine.
    tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="data-check-lengths") if counter else None
    in_flight: list[tuple[list[tuple[int, Example]], Future]] = []  # at most one batch

    def measure() -> None:
        collect()
        in_flight.append((list(batch), tokenizing.submit(counter.count, [ex for _, ex in batch])))
        batch.clear()

    def collect() -> None:
        if not in_flight:
            return
        done, future = in_flight.pop()
        for (index, _), row in zip(done, future.result()):
            lengths.append(row.total)
            if row.total > max_length:
                report.overlong.append(index)
                report.overlong_dropped += would_be_dropped(row, max_length)
            if row.answer is not None and row.answer < min_answer_tokens:
                report.short_answers.append(index)

    for path in paths:
        summary = FileSummary(path)
        report.files.append(summary)
        file_no = report.rows.start_file(path)
        try:
            for scanned in scan_rows(path, fmt):
                index = report.rows.add(file_no, scanned.where)
                summary.rows += 1
                summary.format = summary.format or scanned.format
                if scanned.problems:
                    summary.bad_rows += 1
                    report.bad_rows.add(index)
                    report.problems.extend(Problem(scanned.where, reason) for reason in scanned.problems)
                    continue
                example = scanned.example
                finder.add(index, exact_text(example), near_text(example))
                if by is not None:
                    report.balance[_class_of(scanned.row, by)] += 1
                if counter is not None:
                    batch.append((index, example))
                    if len(batch) >= _BATCH:
                        measure()
        except DataError as exc:
            summary.error = str(exc)
        except OSError as exc:  # a directory, no permission, an I/O error: the file is unreadable, exit 2
            summary.error = f"{path}: cannot read: {exc.strerror or exc}"
        if summary.rows == 0 and not summary.error:
            report.problems.append(Problem(path, "no rows"))
    if counter is not None:
        if batch:
            measure()
        collect()
        tokenizing.shutdown()
    if counter is not None:
        report.lengths = np.frombuffer(lengths, dtype=np.int32).copy() if lengths else np.zeros(0, np.int32)
    pairs = finder.candidates()
    wanted = set(pairs.ravel().tolist())
    report.duplicates = finder.verify(pairs, _word_sets(paths, wanted) if wanted else {})
    return report


def exact_text(example: Example) -> str:
    """What makes two rows the same row: every turn with its role."""
    if example.messages is None:
        return example.text
    return "\n".join(f"{m['role']}\x1f{m['content']}" for m in example.messages)


def near_text(example: Example) -> str:
    """What near-duplicate detection compares: the conversation without system turns (a system prompt shared by
    every row would make every row look alike)."""
    if example.messages is None:
        return example.text
    return "\n".join(m["content"] for m in example.messages if m["role"] != "system")


def _class_of(row: Any, by: str) -> str:
    value = row.get(by) if isinstance(row, dict) else None
    if value is None:
        return "(missing)"
    return value if isinstance(value, str) else json.dumps(value)


def _word_sets(paths: list[str], wanted: set[int]) -> dict[int, frozenset[str]]:
    """Second pass: the word sets of the candidate rows only (row numbers count as in `check_files`)."""
    sets: dict[int, frozenset[str]] = {}
    index = 0
    for path in paths:
        try:
            for where, row, problem in read_rows_or_problems(path):
                if index in wanted:
                    example = normalise_row(row, detect_format(row, where), where)
                    sets[index] = word_set(near_text(example))
                index += 1
        except (DataError, OSError):
            pass  # the file went unreadable in the first pass too; none of its later rows were candidates
    return sets


# ---------------------------------------------------------------------------------------------------------------------
# Clean: the rows worth keeping, written atomically beside a report of every dropped row.


@dataclass
class CleanResult:
    kept: int
    dropped: Counter
    output: Path
    report_path: Path


def clean_file(path: str, output: str, report: CheckReport, drop_overlong: bool) -> CleanResult:
    """Write the rows of `path` that are valid, first of their duplicate group and (optionally) not over-long."""
    out = Path(output)
    if out.suffix.lower() != ".jsonl":
        raise UserError(f"-o {output}: clean writes JSON Lines; give a path ending in .jsonl")
    if same_file(path, out):
        raise UserError(f"-o {output}: that is the input file; clean never modifies its input, choose another path")
    if report.unreadable:
        raise DataError(report.unreadable[0].error)
    where = report.rows.where
    reasons: dict[int, tuple[str, str]] = {}  # row -> (kind, reason)
    first_problem: dict[str, str] = {}
    for problem in report.problems:
        first_problem.setdefault(problem.where, problem.reason)
    for index in report.bad_rows:
        reasons[index] = ("invalid", first_problem[where(index)])
    for index, (kind, other, similarity) in report.duplicates.dropped().items():
        reasons.setdefault(index, (kind, f"exact duplicate of {where(other)}" if kind == "exact"
                                   else f"near duplicate of {where(other)} (word Jaccard {similarity:.2f})"))
    if drop_overlong:
        for index in report.overlong:
            reasons.setdefault(index, ("overlong", f"over max length: more than {report.max_length} tokens"))
    report_path = out.with_name(out.stem + ".dropped.txt")
    dropped: Counter = Counter()
    kept = 0
    with atomic_text_writer(out) as rows_out, atomic_text_writer(report_path) as report_out:
        for index, (row_where, row, _) in enumerate(read_rows_or_problems(path)):
            if index not in reasons:
                rows_out.write(json.dumps(row, ensure_ascii=False) + "\n")
                kept += 1
                continue
            kind, reason = reasons[index]
            report_out.write(f"{row_where}: {reason}\n")
            dropped[kind] += 1
    return CleanResult(kept, dropped, out, report_path)

"""`tuneforge data check | clean | convert | split`: the data-quality checklist as commands."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager

from tuneforge.config import EMBEDDED_MODEL, DataSettings
from tuneforge.errors import OutputWriteError


def cmd_check(args: argparse.Namespace) -> int:
    from tuneforge.data.lengths import plot_histogram
    from tuneforge.data.quality import check_files

    tokenizer = _tokenizer(args.model)
    report = check_files(args.files, tokenizer, args.model, args.max_length, args.by, args.near_dup_threshold,
                         args.balance_ratio, args.min_answer_tokens, args.format)
    plotted = bool(args.plot and report.lengths is not None and len(report.lengths))
    if plotted:
        with _writing(f"--plot {args.plot}"):
            plot_histogram(report.lengths, args.max_length, args.plot,
                           f"{len(report.lengths):,} rows, {args.model} tokens")
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2, ensure_ascii=False)
        print()
    else:
        print(report.render(show=args.show))
        if args.plot:
            print(f"length histogram: {args.plot}" if plotted else f"length histogram: not written ({args.plot}): "
                  "no valid rows to measure")
    return report.exit_code


def cmd_clean(args: argparse.Namespace) -> int:
    from tuneforge.data.quality import check_files, clean_file

    tokenizer = _tokenizer(args.model) if args.drop_overlong else None
    report = check_files([args.file], tokenizer, args.model, args.max_length, near_threshold=args.near_dup_threshold,
                         fmt=args.format)
    with _writing(f"-o {args.output}"):
        result = clean_file(args.file, args.output, report, args.drop_overlong)
    parts = ", ".join(f"{n:,} {kind}" for kind, n in sorted(result.dropped.items())) or "none"
    print(f"kept {result.kept:,} of {len(report.rows):,} rows -> {result.output}")
    print(f"dropped: {parts}; every dropped row and why: {result.report_path}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from tuneforge.data.convert import convert_file

    with _writing(f"-o {args.output}"):
        result = convert_file(args.file, args.to, args.output)
    print(f"converted {result.rows:,} rows ({result.source_format} -> {args.to}) -> {result.output}")
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from tuneforge.data.split import split_file

    with _writing(f"{args.file} split"):
        result = split_file(args.file, args.val, args.test, args.by, args.seed, args.out_dir, args.unseen_answers)
    for name, path in result.outputs.items():
        line = f"{name:<5} {result.counts.get(name, 0):>9,} rows -> {path}"
        if result.by_class:
            line += "  (" + ", ".join(f"{k}: {v:,}" for k, v in sorted(result.by_class[name].items())) + ")"
        print(line)
    return 0


@contextmanager
def _writing(what: str):
    """An output the OS refuses (no such folder, no permission, a full disk) is one line and exit code 4; nothing
    half-written is left, as every output is written atomically."""
    try:
        yield
    except OSError as exc:
        where = exc.filename or what
        raise OutputWriteError(f"{what}: cannot write {where}: {exc.strerror or exc}") from None


def _tokenizer(name: str):
    from tuneforge.model.load import load_tokenizer

    return load_tokenizer(name)


def add_parsers(sub) -> None:
    defaults = DataSettings()
    data = sub.add_parser("data", help="check, clean, convert and split data files")
    verbs = data.add_subparsers(dest="data_command", required=True)

    def common(p, model_help: str) -> None:
        p.add_argument("--model", default=EMBEDDED_MODEL, help=model_help)
        p.add_argument("--max-length", type=_positive_int, default=defaults.max_length,
                       help=f"token budget per row, as data.max_length (default {defaults.max_length})")
        p.add_argument("--near-dup-threshold", type=_fraction, default=_near_default(),
                       help="word-set Jaccard at or above which two rows are near-duplicates (default %(default)s)")
        p.add_argument("--format", default="auto", choices=["auto", "instruction", "chat", "sharegpt", "completion"],
                       help="row format (default: detected per file)")

    p = verbs.add_parser("check", help="validate rows, find duplicates, report lengths and balance",
                         description="Exit code: 0 clean, 1 problems found (bad rows or duplicates), "
                                     "2 a file could not be read.")
    p.add_argument("files", nargs="+", help="data files (.jsonl, .json, .csv, .parquet, saved dataset dirs)")
    common(p, "tokenizer whose token lengths are reported (default: the embedded model)")
    p.add_argument("--by", help="a field to count rows by, e.g. category (balance report)")
    p.add_argument("--balance-ratio", type=_ratio, default=_quality("BALANCE_RATIO"),
                   help="warn when the largest --by class is over this multiple of the smallest (default %(default)s)")
    p.add_argument("--min-answer-tokens", type=_positive_int, default=_quality("MIN_ANSWER_TOKENS"),
                   help="flag answers shorter than this (default %(default)s)")
    p.add_argument("--json", action="store_true", help="the report as JSON on stdout")
    p.add_argument("--plot", metavar="OUT.png", help="write the token-length histogram as a PNG")
    p.add_argument("--show", type=_positive_int, default=50,
                   help="rows listed per section in the text report (default 50)")
    p.set_defaults(func=cmd_check)

    p = verbs.add_parser("clean", help="write a copy without bad rows and with one row per duplicate group")
    p.add_argument("file")
    p.add_argument("-o", "--output", required=True, help="the cleaned file (.jsonl); the input is never modified")
    common(p, "tokenizer for --drop-overlong (default: the embedded model)")
    p.add_argument("--drop-overlong", action="store_true", help="also drop rows longer than --max-length tokens")
    p.set_defaults(func=cmd_clean)

    p = verbs.add_parser("convert", help="convert rows: Alpaca <-> chat, ShareGPT -> chat")
    p.add_argument("file")
    p.add_argument("--to", required=True, choices=["chat", "instruction", "paired", "conversation_pairs"],
                   help="chat/instruction: supervised rows (a preference pair keeps its chosen answer); "
                        "paired/conversation_pairs: the two forms of preference pairs")
    p.add_argument("-o", "--output", required=True, help="the converted file (.jsonl)")
    p.set_defaults(func=cmd_convert)

    p = verbs.add_parser("split", help="write train / val (/ test) files, stratified with --by")
    p.add_argument("file")
    p.add_argument("--val", type=float, required=True, help="fraction of rows for validation, e.g. 0.1")
    p.add_argument("--test", type=float, default=0.0, help="fraction of rows for test (default: no test file)")
    p.add_argument("--by", help="stratify by this field, e.g. category")
    p.add_argument("--unseen-answers", action="store_true",
                   help="hold rows out by answer word: no training answer holds a word of the held-out rows' chosen "
                        "words (names, places, values), for tests whose answers name what training never saw")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out-dir", help="where to write FILE.train/.val/.test.jsonl (default: beside FILE)")
    p.set_defaults(func=cmd_split)


def _fraction(text: str) -> float:
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def _ratio(text: str) -> float:
    value = _number(text, float)
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"must be a number >= 1 (largest class / smallest), got {text}")
    return value


def _number(text: str, kind):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a {'whole number' if kind is int else 'number'}: {text!r}") from None


def _near_default() -> float:
    from tuneforge.data.dedup import NEAR_DUP_THRESHOLD

    return NEAR_DUP_THRESHOLD


def _quality(name: str):
    from tuneforge.data import quality

    return getattr(quality, name)

"""Command line: one table of subcommand families; each module parses arguments and calls into the library.

No logic lives here: a subcommand's module imports the stage that does the work, lazily, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from tuneforge.cli import chat, data, deploy, evaluate, plan, train, tune, ui
from tuneforge.errors import UserError

# The table: every subcommand family, in the order `tuneforge --help` lists them.
FAMILIES = [train, tune, data, evaluate, chat, deploy, plan, ui]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneforge", description="Fine-tune open LLMs on your own data.")
    sub = parser.add_subparsers(dest="command", required=True)
    for family in FAMILIES:
        family.add_parsers(sub)
    return parser


def quiet_libraries() -> None:
    """Our own progress bar and log lines only: the libraries' loading bars and deprecation notices are noise here."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    # bitsandbytes warns on import that an optional hub-downloaded CPU kernel is missing; its built-in path works.
    for noisy in ("transformers", "httpx", "huggingface_hub", "peft", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    if "TORCHELASTIC_ERROR_FILE" in os.environ:  # a torchrun worker: report our crash in torchrun's failure summary
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(_main)(argv)
    return _main(argv)


def _main(argv: list[str] | None) -> int:
    logging.basicConfig(level=logging.INFO, format="tuneforge: %(message)s", stream=sys.stderr)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse ends a command's positional overrides at its first option (`train run.yaml --quiet lr=...` left
    # `lr=...` unrecognised): dotted overrides after an option are overrides too, in the order typed.
    if extra and hasattr(args, "overrides") and all("=" in arg and not arg.startswith("-") for arg in extra):
        args.overrides, extra = [*args.overrides, *extra], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = list(argv if argv is not None else sys.argv[1:])  # as typed, for commands that relaunch themselves
    if argv is None and args.command == "train":  # the program itself, not a caller's main([...]): its allocator
        from tuneforge.allocator import use_tcmalloc

        use_tcmalloc(args.argv)
    quiet_libraries()
    try:
        return args.func(args)
    except UserError as exc:
        print(f"tuneforge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("tuneforge: interrupted", file=sys.stderr)
        return 130

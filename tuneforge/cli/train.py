"""`tuneforge train`."""

from __future__ import annotations

import argparse
import os
import sys

from tuneforge.errors import UserError


def cmd_train(args: argparse.Namespace) -> int:
    from tuneforge.config import describe_schema, load_config, validate_for_training
    from tuneforge.data.prepare import read_raw

    if args.help_config:
        print(describe_schema())
        return 0
    if args.config is None:
        raise UserError("train: give a run file, e.g. tuneforge train configs/demo.yaml")
    overrides = list(args.overrides) + (["train.resume=auto"] if args.resume else [])
    cfg = load_config(args.config, overrides)
    # Config and data are checked before torch and transformers are even imported (seconds of startup): a broken
    # row fails at once. The loop trains on the rows read here.
    validate_for_training(cfg)
    rows = read_raw(cfg.data, cfg.train.seed, cfg.objective)
    if args.nproc:
        return _launch_torchrun(args.nproc, cfg, args.argv)
    from tuneforge.allocator import allocator_line
    from tuneforge.plan.estimate import preflight_report
    from tuneforge.train.loop import train

    if os.environ.get("RANK", "0") == "0":
        print(f"tuneforge: {allocator_line()}", file=sys.stderr, flush=True)

    def preflight(example_lengths: list[int], row_lengths: tuple[int, ...]) -> None:
        # The planned peak for this data's largest micro-batch, once it is tokenized and before the model loads: a
        # run that cannot fit says so now, not after minutes of loading.
        text, warning = preflight_report(cfg, example_lengths, row_lengths)
        print(text, file=sys.stderr, flush=True)
        if warning is not None:
            print(warning, file=sys.stderr, flush=True)

    result = train(cfg, show_progress=not args.quiet, rows=rows, preflight=preflight)
    val = f", val_loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary for the run, not one per process
        print(f"done: {result.steps} steps, train_loss {result.train_loss:.4f}{val} -> {result.run_dir}")
    return 0


def _launch_torchrun(nproc: int, cfg, raw_argv: list[str]) -> int:
    """`--nproc N`: this same command under torchrun on one machine (config and data were checked once, above)."""
    import subprocess

    if cfg.train.distributed == "none":
        raise UserError(f"--nproc {nproc}: train.distributed is 'none'; use ddp or fsdp (or leave it at auto)")
    argv, skip_value = [], False
    for arg in raw_argv:
        if skip_value or arg.startswith("--nproc="):
            skip_value = False
            continue
        skip_value = arg == "--nproc"
        if not skip_value:
            argv.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "tuneforge", *argv]
    print("tuneforge: launching " + " ".join(command[2:]), file=sys.stderr, flush=True)
    # torchrun sets OMP_NUM_THREADS=1 per process unless it is set: N processes must not each claim every core.
    return subprocess.call(command, env=os.environ.copy())


def add_parsers(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model from a YAML run file")
    p.add_argument("config", nargs="?", help="run file (YAML)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 lora.r=8")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train with N processes on this machine (launches torchrun; see train.distributed)")
    p.set_defaults(func=cmd_train)

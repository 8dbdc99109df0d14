"""`tuneforge recommend` and `tuneforge estimate`: planning before spending compute (logic in tuneforge/plan/)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from tuneforge.errors import UserError


def cmd_recommend(args: argparse.Namespace) -> int:
    from tuneforge.config import RunConfig, load_config
    from tuneforge.plan.data_shape import measure_data
    from tuneforge.plan.recommend import recommend, render_yaml

    model = args.model or RunConfig().model
    shape = None
    if args.data is not None:
        if not Path(args.data).exists():
            raise UserError(f"--data: file not found: {args.data}")
        shape = measure_data(load_config(overrides=[f"data.train={args.data}"]).data, model,
                             objective=args.objective)
        print(f"data: {shape.summary()}")
    examples = shape.num_examples if shape is not None else args.examples
    rec = recommend(model, examples, args.gpu_mem, args.domain_shift, shape=shape, data_path=args.data,
                    seq_len=args.seq_len, device=args.device, objective=args.objective)
    text = render_yaml(rec)
    if args.tune:
        return _recommend_then_tune(args, text)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        load_config(args.output)  # what we wrote must be a run file `tuneforge train` accepts
        print(f"{rec.summary[0]}\nwrote {args.output}")
    else:
        print(text, end="")
    return 0


def _recommend_then_tune(args: argparse.Namespace, text: str) -> int:
    """`recommend --tune BUDGET`: the recommendation, then a search around it, then the best run file."""
    from tuneforge.config import load_config
    from tuneforge.tune.settings import TuneSettings, budget_seconds
    from tuneforge.tune.study import run_study

    if args.data is None:
        raise UserError("recommend --tune: needs --data (the search trains on it)")
    budget_seconds(args.tune)
    output = Path(args.output or "tuned.yaml")
    recommended = output.with_name(output.stem + ".recommended.yaml")
    recommended.write_text(text, encoding="utf-8")
    cfg = load_config(recommended)
    print(f"wrote the recommendation to {recommended}; tuning around it for {args.tune}", flush=True)
    result = run_study(str(recommended), [], TuneSettings(budget=args.tune, output=str(output),
                                                          study_dir=f"{cfg.output_dir}-tune"))
    return 0 if result.best_run is not None else 3


def cmd_estimate(args: argparse.Namespace) -> int:
    from tuneforge.plan import estimate as plan
    from tuneforge.plan.memory import estimate_memory

    if args.table:
        from tuneforge.plan.table import compute_table, format_table

        print(format_table(compute_table()))
        return 0
    if args.config is not None:
        from tuneforge.config import load_config

        cfg = load_config(args.config, args.overrides)
    else:
        if args.overrides:
            raise UserError(f"estimate: overrides {' '.join(args.overrides)} need a run file; without one use "
                            "--model, --method, --r, --seq-len, --batch")
        cfg = plan.config_for(args.model, args.method, args.r, args.seq_len, args.batch,
                              args.gradient_checkpointing, args.device)
    shape = plan.data_shape_of(cfg) if args.config is not None else None
    spec = plan.spec_from_config(cfg, shape, device=args.device, engine=args.engine, optimizer=args.optimizer)
    if args.no_double_quant:
        spec = dataclasses.replace(spec, double_quant=False)
    est = estimate_memory(spec)
    print(plan.format_estimate(est, shape))
    rate = _throughput(args, cfg)
    if rate is not None:
        print(plan.time_per_epoch(cfg, shape, *rate).summary())
    return 0


def _throughput(args: argparse.Namespace, cfg) -> tuple[float, str] | None:
    if args.tokens_per_s is not None:
        return args.tokens_per_s, "given"
    if args.from_run is not None:
        from tuneforge.plan.calibrate import throughput_of_run

        return throughput_of_run(args.from_run), f"measured in {args.from_run}"
    if args.calibrate:
        from tuneforge.plan.calibrate import measure_run

        measured = measure_run(cfg, steps=args.calibrate)
        if measured.tokens_per_s is None:
            raise UserError("--calibrate: the calibration run logged no throughput")
        print(f"calibration: {args.calibrate} steps, peak memory growth {measured.peak_growth / 2**30:.2f} GiB")
        return measured.tokens_per_s, f"calibrated over {args.calibrate} steps"
    return None


def add_parsers(sub) -> None:
    from tuneforge.config import OBJECTIVES
    from tuneforge.plan import DEFAULT_DOMAIN_SHIFT, DOMAIN_SHIFTS, ENGINES, METHODS, OPTIMIZERS

    p = sub.add_parser("recommend", help="the guide's decision tree for your model, data and GPU: a ready run file")
    p.add_argument("--model", help="model alias, hub id, bundled name (e.g. llama-2-7b) or local dir "
                                   "(default: the embedded model)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--data", help="training data file: example count and token lengths come from it")
    size.add_argument("--examples", type=int, help="number of training examples (when there is no file yet)")
    p.add_argument("--gpu-mem", type=float, required=True, help="memory of the GPU (or RAM with --device cpu), GiB")
    p.add_argument("--domain-shift", choices=DOMAIN_SHIFTS, default=DEFAULT_DOMAIN_SHIFT,
                   help="how far the target is from what the model already does (sets the LoRA rank)")
    p.add_argument("--seq-len", type=int, help="max_length in tokens (default: from --data, else config default)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="what --gpu-mem describes")
    p.add_argument("--objective", choices=OBJECTIVES, default="sft",
                   help="sft, or a preference objective: its strength and learning rate come with their reasons")
    p.add_argument("-o", "--output", help="write the run file here (default: print it)")
    p.add_argument("--tune", metavar="BUDGET", help="then search around the recommendation for this long (e.g. 30m) "
                                                    "and write the best run file (needs --data)")
    p.set_defaults(func=cmd_recommend)

    e = sub.add_parser("estimate", help="peak training memory (and time per epoch) of a run file or a model + method")
    e.add_argument("config", nargs="?", help="run file (YAML); its data file sizes the micro-batch")
    e.add_argument("overrides", nargs="*", help="dotted overrides for the run file, e.g. train.batch_size=4")
    e.add_argument("--table", action="store_true", help="the guide's 7B/13B/70B x full/LoRA/QLoRA table, computed")
    e.add_argument("--model", help="model without a run file: bundled name, hub id or local dir")
    e.add_argument("--method", choices=METHODS)
    e.add_argument("--r", type=int, help="LoRA rank")
    e.add_argument("--seq-len", type=int, help="tokens per example")
    e.add_argument("--batch", type=int, help="examples per micro-batch")
    e.add_argument("--gradient-checkpointing", action="store_true")
    e.add_argument("--optimizer", choices=OPTIMIZERS, default=OPTIMIZERS[0])
    e.add_argument("--engine", choices=ENGINES, default=ENGINES[0],
                   help="tuneforge (what `tuneforge train` does) or a standard Hugging Face setup")
    e.add_argument("--device", choices=("cpu", "cuda"), help="plan for this device (default: the run's)")
    e.add_argument("--no-double-quant", action="store_true", help="QLoRA without double quantization")
    rate = e.add_mutually_exclusive_group()
    rate.add_argument("--tokens-per-s", type=float, help="measured training throughput: adds time per epoch")
    rate.add_argument("--from-run", help="take the throughput from an earlier run directory's metrics")
    rate.add_argument("--calibrate", type=int, metavar="STEPS", help="measure throughput with a short real run")
    e.set_defaults(func=cmd_estimate)

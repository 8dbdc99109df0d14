"""`tuneforge merge`, `tuneforge export` and `tuneforge serve`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tuneforge.cli.options import add_option, from_args
from tuneforge.deploy.serve_settings import ServeSettings
from tuneforge.errors import UserError


def cmd_merge(args: argparse.Namespace) -> int:
    from tuneforge.deploy.merge import merge_run

    out = merge_run(args.run, args.output, args.dtype)
    print(f"merged {args.run} -> {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "gguf":
        from tuneforge.deploy.gguf_export import export_gguf

        _refuse_options(args, "gguf", bits=None, group_size=None, calibration=None, samples=None, dtype=None)
        quant = args.quant or "f16"
        out = export_gguf(args.source, args.output, quant, force=args.force, ollama=args.ollama)
        print(f"exported {args.source} -> {out} ({quant}, {out.stat().st_size / 1e6:.1f} MB)")
        return 0
    from tuneforge.deploy.compressed_export import export_compressed

    _refuse_options(args, args.format, quant=None, ollama=False)
    out = export_compressed(args.source, args.output, args.format, bits=args.bits or 4, group_size=args.group_size,
                            calibration=args.calibration, samples=args.samples or 128,
                            dtype=args.dtype or "bfloat16", force=args.force)
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(f"exported {args.source} -> {out}/ ({args.format}, {args.bits or 4}-bit, {size:.1f} MB)")
    return 0


def _refuse_options(args: argparse.Namespace, fmt: str, **unset) -> None:
    """An option of another format is refused, not ignored: `--quant q4_k_m --format gptq` is a mistake."""
    for name, default in unset.items():
        if getattr(args, name) != default:
            raise UserError(f"--{name.replace('_', '-')}: not an option of --format {fmt}")


def parse_adapter(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise UserError(f"--adapter {spec!r}: expected NAME=PATH, e.g. --adapter extract=runs/demo")
    return name, path


def cmd_serve(args: argparse.Namespace) -> int:
    adapters = [parse_adapter(spec) for spec in args.adapter]
    names = [name for name, _ in adapters]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise UserError(f"--adapter: the name {duplicate!r} is given twice")
    if args.engine == "vllm":
        from tuneforge.deploy.vllm import run_vllm, vllm_command

        return run_vllm(vllm_command(args.model, adapters, args.host, args.port, _api_key(args), args.max_model_len),
                        args.print)
    if args.print:
        raise UserError("--print: only with --engine vllm")
    settings = serve_settings(args)
    from tuneforge.deploy.server import load_server, run_server

    run_server(load_server(args.model, adapters, settings))
    return 0


def serve_settings(args: argparse.Namespace) -> ServeSettings:
    """The settings the options describe, each value checked against its field's range."""
    return from_args(ServeSettings, args, api_key=_api_key(args),
                     admin_dir=Path(args.admin_dir) if args.admin_dir else None)


def _api_key(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get("TUNEFORGE_API_KEY") or None


def add_parsers(sub) -> None:
    p = sub.add_parser("merge", help="fold a LoRA/DoRA/QLoRA run into its base: a plain Hugging Face model directory")
    p.add_argument("run", help="run directory written by tuneforge train")
    p.add_argument("-o", "--output", required=True, help="new directory for the merged model")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="weight precision of the merged model (default float32)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="write a run or model as GGUF (llama.cpp, Ollama, LM Studio) or as 4-bit "
                                      "GPTQ/AWQ (vLLM, transformers)")
    p.add_argument("source", help="run directory, model directory or alias")
    p.add_argument("--format", choices=["gguf", "gptq", "awq"], default="gguf",
                   help="gguf: one file for llama.cpp; gptq/awq: a compressed-tensors model directory (default gguf)")
    p.add_argument("--quant", choices=["f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q5_0", "q4_0"],
                   help="gguf: weight type (default f16); the K-quants and mixes are llama.cpp's own, written here "
                        "(nothing to compile)")
    p.add_argument("--ollama", action="store_true", help="gguf: also write a Modelfile beside it (FROM, TEMPLATE "
                                                         "translated from the chat template, stop tokens, num_ctx)")
    p.add_argument("--bits", type=int, help="gptq/awq: weight bits, 4 or 8 (default 4)")
    p.add_argument("--group-size", type=int, help="gptq/awq: values per scale; must divide every layer's input "
                                                  "(default: the largest of 128, 64, 32 that does)")
    p.add_argument("--calibration", help="gptq/awq: rows to calibrate on, in any format tuneforge train reads "
                                         "(default: the run's training rows)")
    p.add_argument("--samples", type=int, help="gptq/awq: calibration rows used (default 128)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="gptq/awq: precision of what stays unquantized: embeddings, norms, head (default bfloat16)")
    p.add_argument("-o", "--output", required=True, help="gguf: output file ending in .gguf; gptq/awq: new directory")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="OpenAI-compatible server: one base model, many LoRA adapters")
    p.add_argument("--model", required=True, help="base model (alias, model directory, full fine-tuning run)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="a LoRA run or PEFT adapter served as model NAME (repeatable)")
    # Defaults, help and ranges: ServeSettings, the one home of serve's defaults.
    for name in ("host", "port", "api_key", "admin_dir", "max_tokens_limit", "max_model_len", "max_concurrent",
                 "max_batch", "max_body_bytes", "dtype", "device"):
        add_option(p, ServeSettings, name)
    p.add_argument("--engine", choices=["tuneforge", "vllm"], default="tuneforge",
                   help="vllm: run (or with --print, print) the equivalent vllm serve command")
    p.add_argument("--print", action="store_true", help="with --engine vllm: print the command instead of running it")
    p.set_defaults(func=cmd_serve)

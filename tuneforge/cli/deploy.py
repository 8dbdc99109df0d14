"""`tuneforge merge`, `tuneforge export` and `tuneforge serve`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tuneforge.errors import UserError


def cmd_merge(args: argparse.Namespace) -> int:
    from tuneforge.deploy.merge import merge_run

    out = merge_run(args.run, args.output, args.dtype)
    print(f"merged {args.run} -> {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tuneforge.deploy.gguf_export import export_gguf

    if args.format != "gguf":
        raise UserError(f"--format: got {args.format!r}, allowed: gguf")
    out = export_gguf(args.source, args.output, args.quant, force=args.force)
    print(f"exported {args.source} -> {out} ({args.quant}, {out.stat().st_size / 1e6:.1f} MB)")
    return 0


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
    api_key = args.api_key or os.environ.get("TUNEFORGE_API_KEY") or None
    if args.engine == "vllm":
        from tuneforge.deploy.vllm import run_vllm, vllm_command

        return run_vllm(vllm_command(args.model, adapters, args.host, args.port, api_key, args.max_model_len),
                        args.print)
    if args.print:
        raise UserError("--print: only with --engine vllm")
    for flag in ("max_tokens_limit", "max_concurrent", "max_batch", "max_body_bytes"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')}: got {getattr(args, flag)}, must be >= 1")
    import torch

    from tuneforge.deploy.server import ServeSettings, load_server, run_server

    settings = ServeSettings(api_key=api_key, admin_dir=Path(args.admin_dir) if args.admin_dir else None,
                             max_body_bytes=args.max_body_bytes, max_tokens_limit=args.max_tokens_limit,
                             max_model_len=args.max_model_len, max_concurrent=args.max_concurrent,
                             max_batch=args.max_batch)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    server = load_server(args.model, adapters, settings, dtype=dtype, device=args.device)
    run_server(server, args.host, args.port)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("merge", help="fold a LoRA/DoRA/QLoRA run into its base: a plain Hugging Face model directory")
    p.add_argument("run", help="run directory written by tuneforge train")
    p.add_argument("-o", "--output", required=True, help="new directory for the merged model")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="weight precision of the merged model (default float32)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="write a run or model as a GGUF file for llama.cpp, Ollama, LM Studio")
    p.add_argument("source", help="run directory, model directory or alias")
    p.add_argument("--format", default="gguf", help="output format (gguf)")
    p.add_argument("--quant", choices=["f32", "f16", "q8_0"], default="f16", help="weight type (default f16)")
    p.add_argument("-o", "--output", required=True, help="output file, ending in .gguf")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="OpenAI-compatible server: one base model, many LoRA adapters")
    p.add_argument("--model", required=True, help="base model (alias, model directory, full fine-tuning run)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="a LoRA run or PEFT adapter served as model NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health "
                                     "(default: $TUNEFORGE_API_KEY, else no key)")
    p.add_argument("--admin-dir", help="enable /admin/adapters to load and unload adapters found inside this "
                                       "directory at run time (off by default)")
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask for")
    p.add_argument("--max-model-len", type=int, help="limit on prompt + max_tokens (default: the model's context)")
    p.add_argument("--max-concurrent", type=int, default=32, help="requests answered at once; more get HTTP 429")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together in one batch")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000, help="largest request body")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--engine", choices=["tuneforge", "vllm"], default="tuneforge",
                   help="vllm: run (or with --print, print) the equivalent vllm serve command")
    p.add_argument("--print", action="store_true", help="with --engine vllm: print the command instead of running it")
    p.set_defaults(func=cmd_serve)

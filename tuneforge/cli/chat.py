"""`tuneforge generate` and `tuneforge chat`."""

from __future__ import annotations

import argparse


def cmd_generate(args: argparse.Namespace) -> int:
    from tuneforge.deploy.chat import generate_once

    print(generate_once(args.model, args.prompt, args.system, args.max_new_tokens, args.temperature))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from tuneforge.deploy.chat import chat_loop

    chat_loop(args.model, args.system, args.max_new_tokens, args.temperature)
    return 0


def add_parsers(sub) -> None:
    for name, helptext, func in (("generate", "answer one prompt", cmd_generate),
                                 ("chat", "talk to a run or model in the terminal", cmd_chat)):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("model", help="run directory, model alias, hub id or model directory")
        if name == "generate":
            p.add_argument("--prompt", required=True)
        p.add_argument("--system", help="system message")
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        p.set_defaults(func=func)

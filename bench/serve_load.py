"""Load benchmark for `tuneforge serve`: requests/s and generated tokens/s at 1, 4 and 16 concurrent clients.

The server runs the embedded model (or --model) behind uvicorn on a free localhost port, in this process, and is
queried over real HTTP with the official `openai` client from N client threads; half the requests go to the base
and half to a LoRA adapter, so batches mix adapters. The peer, run in the same script on the same model: one
transformers `generate` call per request, one after another (what a naive server would do).

    .venv/bin/python bench/serve_load.py                     # embedded SmolLM2-135M-Instruct, fp32, CPU
    .venv/bin/python bench/serve_load.py --requests 32 --max-tokens 64 --clients 1 4 16

Prints one line per concurrency level and the ratio against the sequential peer. Figures vary with the machine and
its load; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOPICS = ["the sea", "a lighthouse", "Tampere in winter", "a cat on a boat", "bread", "the first snow", "trains",
          "a library at night", "mountains", "a lost key", "rain on a roof", "an old map", "bees", "a violin",
          "the moon", "a market"]


def make_adapter(model_name: str, out: Path) -> Path:
    """A random LoRA on the base (the served arithmetic is the same as for a trained one)."""
    from peft import LoraConfig, get_peft_model

    from tuneforge.model.load import load_model, load_tokenizer

    torch.manual_seed(0)
    model = get_peft_model(load_model(model_name), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                             init_lora_weights=False))
    model.save_pretrained(out)
    load_tokenizer(model_name).save_pretrained(out)
    (out / "tuneforge.json").write_text(json.dumps({"base_model": model_name, "method": "lora"}))
    return out


def start(server):
    import uvicorn

    from tuneforge.deploy.server import build_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(build_app(server), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=uv.run, daemon=True).start()
    while not uv.started:
        time.sleep(0.05)
    return uv, f"http://127.0.0.1:{port}/v1"


def question(i: int) -> str:
    return f"Write a few sentences about {TOPICS[i % len(TOPICS)]}."


def load_level(url: str, models: list[str], clients: int, requests: int, max_tokens: int) -> tuple[float, int]:
    from openai import OpenAI

    api = OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)

    def one(i: int) -> int:
        reply = api.chat.completions.create(model=models[i % len(models)], max_tokens=max_tokens, temperature=0,
                                            messages=[{"role": "user", "content": question(i)}])
        return reply.usage.completion_tokens

    start_time = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(one, range(requests)))
    return time.perf_counter() - start_time, tokens


def sequential_peer(model_name: str, adapter: Path, requests: int, max_tokens: int) -> tuple[float, int]:
    """One transformers generate per request, in order, switching adapters with PEFT's set_adapter/disable."""
    from peft import PeftModel

    from tuneforge.data.tokenize import render_prompt
    from tuneforge.model.load import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_name)
    model = PeftModel.from_pretrained(load_model(model_name), str(adapter), adapter_name="lora").eval()
    tokens = 0
    start_time = time.perf_counter()
    with torch.no_grad():
        for i in range(requests):
            ids = tokenizer(render_prompt(tokenizer, [{"role": "user", "content": question(i)}]),
                            add_special_tokens=False, return_tensors="pt")["input_ids"]
            kwargs = dict(input_ids=ids, max_new_tokens=max_tokens, do_sample=False, temperature=None, top_p=None,
                          top_k=None, pad_token_id=tokenizer.pad_token_id)
            if i % 2 == 0:
                with model.disable_adapter():
                    out = model.generate(**kwargs)
            else:
                out = model.generate(**kwargs)
            generated = out[0, ids.shape[1]:].tolist()
            tokens += len(generated)
    return time.perf_counter() - start_time, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice); on a machine shared "
                                                     "with other jobs, 1 avoids OpenMP oversubscription stalls")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from tuneforge.deploy.server import ServeSettings, load_server

    with tempfile.TemporaryDirectory() as tmp:
        adapter = make_adapter(args.model, Path(tmp) / "lora")
        server = load_server(args.model, [("lora", str(adapter))],
                             ServeSettings(max_concurrent=max(args.clients), max_batch=max(args.clients)))
        uv, url = start(server)
        models = [args.model, "lora"]
        load_level(url, models, 1, 2, 4)  # warm-up: first-call allocations out of the measurement
        print(f"tuneforge serve load: {args.model}, {args.requests} requests x max {args.max_tokens} tokens, "
              f"greedy, base + LoRA alternating, {torch.get_num_threads()} torch threads")
        results = {}
        for clients in args.clients:
            seconds, tokens = load_level(url, models, clients, args.requests, args.max_tokens)
            results[clients] = (seconds, tokens)
            print(f"  {clients:>3} clients: {args.requests / seconds:6.2f} requests/s  {tokens / seconds:7.1f} "
                  f"tokens/s  ({tokens} tokens in {seconds:.1f} s)", flush=True)
        uv.should_exit = True
        server.engine.close()
        seconds, tokens = sequential_peer(args.model, adapter, args.requests, args.max_tokens)
        print(f"  peer, transformers generate one request at a time: {args.requests / seconds:6.2f} requests/s  "
              f"{tokens / seconds:7.1f} tokens/s")
        for clients, (s, t) in results.items():
            print(f"  ratio at {clients:>3} clients vs peer: {(t / s) / (tokens / seconds):.2f}x tokens/s")


if __name__ == "__main__":
    main()

"""`tuneforge serve --engine vllm`: the equivalent `vllm serve` command, for users with vLLM and a GPU.

vLLM loads the same PEFT adapter directories (`--enable-lora --lora-modules NAME=PATH`) and serves the same
OpenAI routes, so clients written against `tuneforge serve` keep working when the deployment scales out.
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

from tuneforge.deploy.adapters import check_adapter_dir
from tuneforge.errors import UserError
from tuneforge.method_registry import saves_whole_model
from tuneforge.model.load import resolve_model
from tuneforge.run_dir import read_meta

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


def vllm_command(model: str, adapters: list[tuple[str, str]], host: str, port: int, api_key: str | None,
                 max_model_len: int | None = None) -> list[str]:
    meta = read_meta(Path(model)) if Path(model).is_dir() else None
    if meta is not None and not saves_whole_model(meta.get("method")):
        raise UserError(f"--model {model}: a {meta.get('method')} run is an adapter; give its base with --model "
                        f"and the run with --adapter, or merge it first with tuneforge merge")
    # vLLM needs a Hugging Face model directory or hub id: aliases and GGUF files become their cached directory.
    command = ["vllm", "serve", resolve_model(model), "--served-model-name", model, "--host", host,
               "--port", str(port)]
    if adapters:
        ranks = []
        for name, path in adapters:
            config = check_adapter_dir(Path(path))
            if config.get("use_dora"):
                raise UserError(f"adapter {path}: vLLM cannot serve DoRA adapters; merge it with tuneforge merge")
            ranks.append(int(config.get("r", 16)))
        command += ["--enable-lora", "--lora-modules", *[f"{name}={Path(path).resolve()}" for name, path in adapters]]
        need = max(ranks)
        rank = next((r for r in VLLM_LORA_RANKS if r >= need), None)
        if rank is None:
            raise UserError(f"adapters: LoRA rank {need} is above vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}")
        command += ["--max-lora-rank", str(rank), "--max-loras", str(len(adapters))]
    if max_model_len:
        command += ["--max-model-len", str(max_model_len)]
    if api_key:
        command += ["--api-key", api_key]
    return command


def run_vllm(command: list[str], print_only: bool) -> int:
    if print_only:
        print(shlex.join(command))
        return 0
    if shutil.which("vllm") is None:
        raise UserError("--engine vllm: vllm is not installed here (pip install vllm, on a machine with a GPU); "
                        "add --print to see the command")
    os.execvp(command[0], command)  # replaces this process: vLLM owns the terminal and the signals from here on
    return 0  # not reached


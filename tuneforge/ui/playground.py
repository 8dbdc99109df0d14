"""The playground: one conversation answered by two models side by side, on tuneforge.deploy's engine.

A base model is loaded once as a `tuneforge serve` ModelServer; a LoRA-family run (lora, dora, qlora) is attached to
its base's server as an adapter, so "base vs tuned" is decoded in one mixed batch and the base is in memory once.
A full fine-tune is a model of its own (its own server). Prefix, prompt and bottleneck-adapter runs cannot be switched
per request, so they are loaded whole with load_for_inference and answered with the batched generation of `tuneforge
chat`. Models stay loaded until the UI stops.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from pathlib import Path

from tuneforge.data.tokenize import render_prompt
from tuneforge.deploy.adapters import SERVABLE_METHODS
from tuneforge.deploy.engine import Sampling
from tuneforge.deploy.server import ModelServer, ServeSettings, _collect
from tuneforge.deploy.protocol import RequestError
from tuneforge.errors import UserError
from tuneforge.model.trained import load_for_inference, read_run_meta

MAX_NEW_TOKENS = 1024


@dataclass
class GenerationRequest:
    messages: list[dict[str, str]]
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0

    def check(self) -> None:
        if not self.messages or self.messages[-1].get("role") != "user":
            raise UserError("messages: the conversation must end with a user message")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise UserError(f"max_new_tokens: expected 1 to {MAX_NEW_TOKENS}, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 2 or not 0 < self.top_p <= 1:
            raise UserError("temperature must be in [0, 2] and top_p in (0, 1]")


class Playground:
    def __init__(self):
        self._servers: dict[str, ModelServer] = {}  # model name or full-run path -> its server
        self._adapters: dict[Path, tuple[ModelServer, str]] = {}  # LoRA-family run -> (its base's server, name)
        self._whole: dict[Path, tuple] = {}  # other runs -> (model, tokenizer)
        self._loading = threading.Lock()  # two clicks must not load the same model twice

    async def answer(self, model: str | Path, request: GenerationRequest) -> str:
        """`model`: a base model name (alias, hub id, directory) or a run directory (already confined)."""
        request.check()
        if isinstance(model, Path) and _method(model) not in (*SERVABLE_METHODS, "full"):
            loaded = await asyncio.to_thread(self._load_whole, model)
            return await asyncio.to_thread(_generate_whole, loaded, request)
        server, adapter = await asyncio.to_thread(self._server_for, model)
        prompt_ids = server.tokenizer(render_prompt(server.tokenizer, request.messages),
                                      add_special_tokens=False)["input_ids"]
        sampling = Sampling(max_tokens=request.max_new_tokens, temperature=request.temperature, top_p=request.top_p)
        try:
            text, _finished = await _collect(server.events(prompt_ids, adapter, sampling))
        except RequestError as exc:
            raise UserError(exc.message) from None
        return text

    def _server_for(self, model: str | Path) -> tuple[ModelServer, str | None]:
        with self._loading:
            if isinstance(model, Path) and _method(model) in SERVABLE_METHODS:
                if model not in self._adapters:
                    server = self._base_server(str(read_run_meta(model)["base_model"]))
                    name = f"run{len(self._adapters) + 1}"
                    # This is a worker thread (asyncio.to_thread): it can run the server's own coroutine to the end.
                    asyncio.run(server.load_adapter(name, model))
                    self._adapters[model] = (server, name)
                return self._adapters[model]
            return self._base_server(str(model)), None

    def _base_server(self, name: str) -> ModelServer:
        if name not in self._servers:
            model, tokenizer = load_for_inference(name)
            self._servers[name] = ModelServer(model, tokenizer, name, ServeSettings())
        return self._servers[name]

    def _load_whole(self, run: Path) -> tuple:
        with self._loading:
            if run not in self._whole:
                self._whole[run] = load_for_inference(str(run))
            return self._whole[run]

    def close(self) -> None:
        for server in self._servers.values():
            server.engine.close()


def _method(run: Path) -> str | None:
    meta = read_run_meta(run)
    return None if meta is None else meta.get("method")


def _generate_whole(loaded: tuple, request: GenerationRequest) -> str:
    from tuneforge.eval.generation import generate_replies

    model, tokenizer = loaded
    return generate_replies(model, tokenizer, [request.messages], max_new_tokens=request.max_new_tokens,
                            temperature=request.temperature, top_p=request.top_p)[0]

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
from tuneforge.deploy.server import ModelServer, ServeSettings, collect_text
from tuneforge.deploy.protocol import RequestError
from tuneforge.errors import UserError
from tuneforge.method_registry import saves_whole_model
from tuneforge.model.trained import load_for_inference
from tuneforge.run_dir import read_meta
from tuneforge.ui.settings import ANSWER, checked


@dataclass
class GenerationRequest:
    messages: list[dict[str, str]]
    max_new_tokens: int = ANSWER.max_new_tokens  # defaults and ranges: ui/settings.py
    temperature: float = ANSWER.temperature
    top_p: float = ANSWER.top_p

    def check(self) -> None:
        if not self.messages or self.messages[-1].get("role") != "user":
            raise UserError("messages: the conversation must end with a user message")
        for name in ("max_new_tokens", "temperature", "top_p"):
            checked(name, getattr(self, name))


class Playground:
    def __init__(self):
        self._servers: dict[str, ModelServer] = {}  # model name or full-run path -> its server
        self._adapters: dict[Path, tuple[ModelServer, str]] = {}  # LoRA-family run -> (its base's server, name)
        self._whole: dict[Path, tuple] = {}  # other runs -> (model, tokenizer)
        self._loading = threading.Lock()  # two clicks must not load the same model twice

    async def answer(self, model: str | Path, request: GenerationRequest) -> str:
        """`model`: a base model name (alias, hub id, directory) or a run directory (already confined)."""
        request.check()
        if isinstance(model, Path) and not (_method(model) in SERVABLE_METHODS or saves_whole_model(_method(model))):
            loaded = await asyncio.to_thread(self._load_whole, model)
            return await asyncio.to_thread(_generate_whole, loaded, request)
        server, adapter = await asyncio.to_thread(self._server_for, model)
        prompt_ids = server.tokenizer(render_prompt(server.tokenizer, request.messages),
                                      add_special_tokens=False)["input_ids"]
        sampling = Sampling(max_tokens=request.max_new_tokens, temperature=request.temperature, top_p=request.top_p)
        try:
            text, _finished = await collect_text(server.events(prompt_ids, adapter, sampling))
        except RequestError as exc:
            raise UserError(exc.message) from None
        return text

    def _server_for(self, model: str | Path) -> tuple[ModelServer, str | None]:
        with self._loading:
            if isinstance(model, Path) and _method(model) in SERVABLE_METHODS:
                if model not in self._adapters:
                    server = self._base_server(str(read_meta(model)["base_model"]))
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
    meta = read_meta(run)
    return None if meta is None else meta.get("method")


def _generate_whole(loaded: tuple, request: GenerationRequest) -> str:
    from tuneforge.eval.generation import generate_replies

    model, tokenizer = loaded
    return generate_replies(model, tokenizer, [request.messages], max_new_tokens=request.max_new_tokens,
                            temperature=request.temperature, top_p=request.top_p)[0]

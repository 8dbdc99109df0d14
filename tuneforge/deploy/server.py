"""`tuneforge serve`: an OpenAI-compatible HTTP server, one base model in memory and any number of LoRA adapters.

Routes: GET /health (never needs the key), GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both
streaming with server-sent events or not), and, only with --admin-dir, GET/POST /admin/adapters and
DELETE /admin/adapters/{name} to load and unload adapters found inside that directory while serving.
The request's `model` names the base or an adapter; the engine (engine.py) batches requests across adapters.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import time
from pathlib import Path

import torch
# At module level, not inside build_app: with postponed annotations FastAPI resolves `request: Request` by name in
# this module's globals, and a local import would make it a required query parameter (every call a 422).
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tuneforge.data.tokenize import ensure_chat_template, render_prompt
from tuneforge.deploy import adapters as adapter_ops
from tuneforge.deploy.engine import Delta, Engine, Failed, Finished, Job, Sampling
from tuneforge.deploy.protocol import (ChatRequest, CompletionRequest, RequestError, chat_chunk, chat_reply,
                                       completion_reply, new_id, parse, usage)
from tuneforge.deploy.serve_settings import ServeSettings
from tuneforge.errors import UserError

log = logging.getLogger("tuneforge")

GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions")


class ModelServer:
    """The state behind the routes: engine, tokenizer, served names and limits."""

    def __init__(self, model, tokenizer, base_name: str, settings: ServeSettings):
        ensure_chat_template(tokenizer)
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.settings = settings
        context = getattr(model.config, "max_position_embeddings", None) or 2048
        self.context_length = min(settings.max_model_len or context, context)
        # The engine decodes on its own thread with its own tokenizer copy: a fast tokenizer is not safe to share.
        self.engine = Engine(model, copy.deepcopy(tokenizer), max_batch=settings.max_batch)
        self.adapters: dict[str, Path] = {}
        self.in_flight = 0
        self.created = int(time.time())

    # -- adapters ---------------------------------------------------------------------------------------------------

    async def load_adapter(self, name: str, path: Path) -> None:
        adapter_ops.check_name(name, set(self.adapters) | {self.base_name})
        adapter_ops.check_adapter_dir(path)

        def attach(engine: Engine) -> None:
            engine.model = adapter_ops.attach(engine.model, name, path)

        await asyncio.wrap_future(self.engine.run(attach))
        self.adapters[name] = path
        log.info("adapter %s loaded from %s", name, path)

    async def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise RequestError(404, f"adapter {name!r} is not loaded", "name")

        def detach(engine: Engine) -> None:
            engine.model = adapter_ops.detach(engine.model, name)

        del self.adapters[name]  # new requests stop finding it at once; queued ones are told it was unloaded
        await asyncio.wrap_future(self.engine.run(detach))
        log.info("adapter %s unloaded", name)

    # -- requests ---------------------------------------------------------------------------------------------------

    def adapter_for(self, model: str) -> str | None:
        if model == self.base_name:
            return None
        if model in self.adapters:
            return model
        raise RequestError(404, f"model {model!r} does not exist here (served: {', '.join(self.model_names())})",
                           "model", code="model_not_found")

    def model_names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def sampling(self, request, prompt_ids: list[int]) -> Sampling:
        limit, context = self.settings.max_tokens_limit, self.context_length
        asked = request.token_budget()
        if asked is not None and asked > limit:
            raise RequestError(400, f"max_tokens: got {asked}, this server allows at most {limit}", "max_tokens")
        if len(prompt_ids) + (asked or 1) > context:
            raise RequestError(400, f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({asked or 1}) exceeds "
                                    f"the context length of {context} tokens", "max_tokens",
                               code="context_length_exceeded")
        return Sampling(max_tokens=asked or min(limit, context - len(prompt_ids)), temperature=request.temperature,
                        top_p=request.top_p, stop=request.stop_list(), seed=request.seed)

    async def events(self, prompt_ids: list[int], adapter: str | None, sampling: Sampling):
        """The engine's events for one request, as an async iterator; leaving early cancels the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(event) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop is gone (server stopping): nobody is listening
                pass

        job = Job(prompt_ids, adapter, sampling, emit)
        self.engine.submit(job)
        try:
            while True:
                event = await queue.get()
                yield event
                if isinstance(event, (Finished, Failed)):
                    return
        finally:
            job.cancelled.set()  # a client that went away frees its batch row at the next step


# ---------------------------------------------------------------------------------------------------------------------
# The HTTP application


def build_app(server: ModelServer) -> FastAPI:
    app = FastAPI(title="tuneforge serve", docs_url=None, redoc_url=None, openapi_url=None)
    settings = server.settings

    app.add_middleware(Guard, server=server)

    @app.exception_handler(RequestError)
    async def request_error(_request, exc: RequestError):
        return _error(exc)

    @app.exception_handler(UserError)
    async def user_error(_request, exc: UserError):
        return _error(RequestError(400, str(exc)))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        data = [{"id": server.base_name, "object": "model", "created": server.created, "owned_by": "tuneforge"}]
        data += [{"id": name, "object": "model", "created": server.created, "owned_by": "tuneforge",
                  "parent": server.base_name} for name in server.adapters]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse(ChatRequest, await _read_json(request, settings.max_body_bytes))
        adapter = server.adapter_for(req.model)
        conversation = [{"role": m.role, "content": m.text()} for m in req.messages]
        prompt = render_prompt(server.tokenizer, conversation)
        prompt_ids = server.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        sampling = server.sampling(req, prompt_ids)
        rid = new_id("chatcmpl")
        events = server.events(prompt_ids, adapter, sampling)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_chat_stream(events, rid, req.model, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, done = await collect_text(events)
        return chat_reply(rid, req.model, text, done.finish_reason, usage(done.prompt_tokens, done.completion_tokens))

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await _read_json(request, settings.max_body_bytes))
        adapter = server.adapter_for(req.model)
        prompt = req.prompt[0] if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], str) \
            else req.prompt
        if isinstance(prompt, list):  # token ids
            if not prompt or any(not 0 <= t < len(server.tokenizer) for t in prompt):
                raise RequestError(400, f"prompt: token ids must be in [0, {len(server.tokenizer)})", "prompt")
            prompt_ids = list(prompt)
        else:
            prompt_ids = server.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if not prompt_ids:
            raise RequestError(400, "prompt: empty", "prompt")
        sampling = server.sampling(req, prompt_ids)
        rid = new_id("cmpl")
        events = server.events(prompt_ids, adapter, sampling)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_completion_stream(events, rid, req.model, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, done = await collect_text(events)
        return completion_reply(rid, req.model, text, done.finish_reason,
                                usage(done.prompt_tokens, done.completion_tokens))

    if settings.admin_dir is not None:
        admin_dir = Path(settings.admin_dir)

        @app.get("/admin/adapters")
        async def list_adapters():
            return {"data": [{"name": n, "path": str(p)} for n, p in server.adapters.items()]}

        @app.post("/admin/adapters")
        async def load_adapter(request: Request):
            body = await _read_json(request, settings.max_body_bytes)
            if not isinstance(body, dict) or not isinstance(body.get("name"), str):
                raise RequestError(400, "send {\"name\": NAME, \"path\": DIR inside the allowed directory}", "name")
            path = adapter_ops.confined_path(admin_dir, body.get("path"))
            await server.load_adapter(body["name"], path)
            return {"name": body["name"], "loaded": True}

        @app.delete("/admin/adapters/{name}")
        async def unload_adapter(name: str):
            await server.unload_adapter(name)
            return {"name": name, "unloaded": True}

    return app


def _error(exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _too_large(limit: int) -> RequestError:
    return RequestError(413, f"request body larger than {limit} bytes", code="request_too_large")


class Guard:
    """ASGI middleware in front of every route: API key, declared body size, and the concurrency limit.

    Pure ASGI rather than an @app.middleware function, so a streamed reply is counted in flight until its last
    byte is sent or its client disconnects, and the count can never leak.
    """

    def __init__(self, app, server: ModelServer):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings, server = self.server.settings, self.server
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        # The key is checked before anything else, on every route but /health (unknown routes included).
        if settings.api_key and scope["path"] != "/health":
            expected = f"Bearer {settings.api_key}".encode()
            if not hmac.compare_digest(headers.get("authorization", "").encode(), expected):
                error = RequestError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                                     kind="authentication_error", code="invalid_api_key")
                return await _error(error)(scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > settings.max_body_bytes:
            return await _error(_too_large(settings.max_body_bytes))(scope, receive, send)
        if scope["path"] not in GENERATION_ROUTES or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if server.in_flight >= settings.max_concurrent:
            error = RequestError(429, f"too many concurrent requests (limit {settings.max_concurrent}); retry later",
                                 kind="rate_limit_error", code="rate_limit_exceeded")
            return await _error(error)(scope, receive, send)
        server.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            server.in_flight -= 1


async def _read_json(request, limit: int):
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "the request body is not valid JSON") from None


async def collect_text(events) -> tuple[str, Finished]:
    """A whole reply from `ModelServer.events`: its text and the closing `Finished`; a failure as a RequestError."""
    parts: list[str] = []
    async for event in events:
        if isinstance(event, Delta):
            parts.append(event.text)
        elif isinstance(event, Failed):
            raise RequestError(event.status, event.message, kind="server_error" if event.status >= 500 else
                               "invalid_request_error")
        else:
            return "".join(parts), event
    raise RequestError(500, "generation ended without a result", kind="server_error")


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _chat_stream(events, rid: str, model: str, include_usage: bool):
    yield _sse(chat_chunk(rid, model, {"role": "assistant", "content": ""}))
    async for event in events:
        if isinstance(event, Delta):
            yield _sse(chat_chunk(rid, model, {"content": event.text}))
        elif isinstance(event, Failed):
            yield _sse(RequestError(event.status, event.message, kind="server_error").body())
        else:
            yield _sse(chat_chunk(rid, model, {}, finish=event.finish_reason))
            if include_usage:
                yield _sse(chat_chunk(rid, model, {}, use=usage(event.prompt_tokens, event.completion_tokens),
                                      choices=False))
    yield "data: [DONE]\n\n"


async def _completion_stream(events, rid: str, model: str, include_usage: bool):
    async for event in events:
        if isinstance(event, Delta):
            yield _sse(completion_reply(rid, model, event.text, None, None))
        elif isinstance(event, Failed):
            yield _sse(RequestError(event.status, event.message, kind="server_error").body())
        else:
            yield _sse(completion_reply(rid, model, "", event.finish_reason, None))
            if include_usage:
                chunk = completion_reply(rid, model, "", None, usage(event.prompt_tokens, event.completion_tokens))
                chunk["choices"] = []
                yield _sse(chunk)
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------------------------------
# Starting


def load_server(model_name: str, adapter_specs: list[tuple[str, str]], settings: ServeSettings) -> ModelServer:
    from tuneforge.method_registry import saves_whole_model
    from tuneforge.model.trained import load_for_inference
    from tuneforge.run_dir import read_meta

    path = Path(model_name)
    meta = read_meta(path) if path.is_dir() else None
    if meta is not None and not saves_whole_model(meta.get("method")):
        raise UserError(f"--model {model_name}: a {meta.get('method')} run is an adapter; serve it with "
                        f"--model {meta.get('base_model')} --adapter {path.name}={model_name}")
    if settings.admin_dir is not None and not Path(settings.admin_dir).is_dir():
        raise UserError(f"--admin-dir {settings.admin_dir}: not a directory")
    for name, adapter_path in adapter_specs:
        adapter_ops.check_adapter_dir(Path(adapter_path))
    model, tokenizer = load_for_inference(model_name, device=settings.device, dtype=getattr(torch, settings.dtype))
    server = ModelServer(model, tokenizer, model_name, settings)

    async def attach_all():
        for name, adapter_path in adapter_specs:
            await server.load_adapter(name, Path(adapter_path).resolve())

    asyncio.run(attach_all())
    return server


def run_server(server: ModelServer) -> None:
    import uvicorn

    host, port = server.settings.host, server.settings.port
    app = build_app(server)
    names = ", ".join(server.adapters) or "none"
    print(f"tuneforge serve: {server.base_name} (adapters: {names}) on http://{host}:{port}/v1", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        server.engine.close()

"""OpenAI request bodies (the part tuneforge serves) and the replies' JSON, with one-line errors for bad requests.

Parameters we do not implement are refused by name rather than silently ignored, so a client never believes it got
something (n > 1, logprobs, tools) that it did not.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class RequestError(Exception):
    """A request the server refuses: HTTP status, one-line message, OpenAI error type and offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we don't use (user, metadata...)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    n: int = 1
    logprobs: Any = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise RequestError(400, f"stop: at most 4 stop strings, got {len(stops)}", "stop")
        return stops

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise RequestError(400, f"n: only n=1 is supported, got {self.n}", "n")
        if self.logprobs not in (None, False, 0):
            raise RequestError(400, "logprobs: not supported by tuneforge serve", "logprobs")


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name for max_tokens
    tools: Any = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise RequestError(400, "tools: tool calling is not supported by tuneforge serve", "tools")

    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for name in ("echo", "suffix", "best_of"):
            if getattr(self, name) not in (None, False, 1):
                raise RequestError(400, f"{name}: not supported by tuneforge serve", name)
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) != 1:
            raise RequestError(400, f"prompt: send one prompt per request, got {len(self.prompt)}", "prompt")

    def token_budget(self) -> int | None:
        return self.max_tokens


def parse(model_cls: type[BaseModel], body: Any):
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    try:
        request = model_cls.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        got = "" if first["type"] == "missing" else f" (got {first.get('input')!r:.60})"
        raise RequestError(400, f"{where}: {first['msg']}{got}", where.split(".")[0]) from None
    request.refuse_unsupported()
    return request


# ---------------------------------------------------------------------------------------------------------------------
# Replies


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_reply(rid: str, model: str, text: str, finish: str, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}], "usage": use}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None = None, use: dict | None = None,
               choices: bool = True) -> dict:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else []}
    if use is not None:
        chunk["usage"] = use
    return chunk


def completion_reply(rid: str, model: str, text: str, finish: str | None, use: dict | None,
                     object_name: str = "text_completion") -> dict:
    reply = {"id": rid, "object": object_name, "created": int(time.time()), "model": model,
             "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
    if use is not None:
        reply["usage"] = use
    return reply

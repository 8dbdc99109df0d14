"""The generation engine behind `tuneforge serve`: one thread owns the model and decodes batches of requests.

Requests that wait while a batch runs are decoded together in the next one, whatever adapter each asks for: every
row names its adapter (or the base) through PEFT's mixed-batch `adapter_names`, so one forward pass serves them all.
PEFT cannot mix DoRA adapters into such a batch (their magnitude vectors need the whole weight), so rows for a DoRA
adapter are decoded as their own group with that adapter active; everything else still shares one pass.
Each row keeps its own sampling settings, stop strings and token budget, and leaves the batch as soon as it is done.
Because only this thread touches the model, adapters are attached and detached here too, between batches, and need
no lock.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import traceback
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from tuneforge.deploy.adapters import BASE_ROW
from tuneforge.deploy.reply_text import ReplyText

log = logging.getLogger("tuneforge")

MIXED = "__mixed__"  # a batch whose rows name different adapters: PEFT's per-row `adapter_names`


@dataclass
class Sampling:
    max_tokens: int
    temperature: float  # 0 = greedy; no defaults here: the request's (protocol.py) or the playground's apply
    top_p: float
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    finish_reason: str  # "stop" (end of turn or stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str
    status: int = 500  # the HTTP status a non-streaming reply gets


@dataclass
class Job:
    prompt_ids: list[int]
    adapter: str | None  # None: the base model
    sampling: Sampling
    emit: Callable[[Delta | Finished | Failed], None]  # called on the engine thread
    cancelled: threading.Event = field(default_factory=threading.Event)


class Engine:
    def __init__(self, model, tokenizer, max_batch: int):  # max_batch: rows decoded together (ServeSettings)
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.eos_ids = eos_ids
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids), 0)
        self._cond = threading.Condition()
        self._jobs: deque[Job] = deque()
        self._commands: deque[tuple[Callable, Future]] = deque()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="tuneforge-engine", daemon=True)
        self._thread.start()

    # -- called from any thread ---------------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._cond:
            self._jobs.append(job)
            self._cond.notify()

    def run(self, command: Callable[["Engine"], object]) -> Future:
        """Run `command(engine)` on the engine thread between batches (attach/detach adapters)."""
        future: Future = Future()
        with self._cond:
            self._commands.append((command, future))
            self._cond.notify()
        return future

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # -- the engine thread ------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not (self._jobs or self._commands or self._closed):
                    self._cond.wait()
                if self._closed:
                    for job in self._jobs:
                        job.emit(Failed("the server is shutting down", status=503))
                    return
                commands = list(self._commands)
                self._commands.clear()
                batch = [self._jobs.popleft() for _ in range(min(self.max_batch, len(self._jobs)))]
            for command, future in commands:
                try:
                    future.set_result(command(self))
                except BaseException as exc:  # handed to the caller, who turns it into an HTTP error
                    future.set_exception(exc)
            batch = [job for job in batch if not job.cancelled.is_set()]
            if batch:
                try:
                    self._decode(batch)
                except Exception:  # a bug must not kill the engine: fail this batch, keep serving
                    log.error("generation failed:\n%s", traceback.format_exc())
                    for job in batch:
                        job.emit(Failed("internal error during generation"))

    def adapter_names(self) -> set[str]:
        return set(getattr(self.model, "peft_config", {}) or {})

    def _decode(self, jobs: list[Job]) -> None:
        known = self.adapter_names()
        for job in [j for j in jobs if j.adapter is not None and j.adapter not in known]:
            job.emit(Failed(f"model {job.adapter!r} was unloaded", status=404))
        jobs = [j for j in jobs if j.adapter is None or j.adapter in known]
        dora = {name for name in known if getattr(self.model.peft_config[name], "use_dora", False)}
        shared = [j for j in jobs if j.adapter not in dora]
        if shared:
            names = {j.adapter or BASE_ROW for j in shared}
            # One adapter (or the base) for every row skips PEFT's per-row split, which costs on every layer.
            self._decode_group(shared, route=names.pop() if len(names) == 1 else MIXED)
        for name in sorted({j.adapter for j in jobs} & dora):
            self._decode_group([j for j in jobs if j.adapter == name], route=name)

    def _decode_group(self, jobs: list[Job], route: str) -> None:
        """Decode `jobs` together. route: MIXED (each row its own adapter), BASE_ROW, or the one adapter of all rows."""
        model = self.model
        if route not in (MIXED, BASE_ROW) and hasattr(model, "peft_config"):
            model.set_adapter(route)
        device = next(model.parameters()).device
        width = max(len(j.prompt_ids) for j in jobs)
        # Left padding puts every prompt's last token in the last column, where decoding continues.
        input_ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, job in enumerate(jobs):
            input_ids[row, width - len(job.prompt_ids):] = torch.tensor(job.prompt_ids)
            mask[row, width - len(job.prompt_ids):] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        rows = [_Row(job, ReplyText(self.tokenizer, job.sampling.stop)) for job in jobs]
        from transformers import DynamicCache

        cache = DynamicCache(config=getattr(model, "config", None))
        logits = self._forward(model, input_ids, mask, positions, cache, rows, route)
        while True:
            next_tokens = [row.sample(logits[i]) for i, row in enumerate(rows)]
            keep = [i for i, (row, token) in enumerate(zip(rows, next_tokens)) if not row.advance(token, self.eos_ids)]
            if not keep:
                return
            if len(keep) < len(rows):  # finished rows leave the batch, and their cache rows with them
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                mask, positions = mask[index], positions[index]
                rows = [rows[i] for i in keep]
                next_tokens = [next_tokens[i] for i in keep]
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=device)], dim=1)
            positions = positions[:, -1:] + 1
            step_ids = torch.tensor(next_tokens, device=device).unsqueeze(1)
            logits = self._forward(model, step_ids, mask, positions, cache, rows, route)

    def _forward(self, model, input_ids, mask, positions, cache, rows, route: str) -> torch.Tensor:
        is_peft = hasattr(model, "peft_config")
        extra = {}
        # Base rows go through the per-row path too: measured on CPU, PEFT's disable_adapter() around each step
        # costs more than the split it avoids.
        if is_peft and route in (MIXED, BASE_ROW):
            extra["adapter_names"] = [row.job.adapter or BASE_ROW for row in rows]
        base = model.get_base_model() if is_peft else model
        extra[_cache_keyword(type(base))] = cache
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **extra)
        return out.logits[:, -1, :].float()


@functools.cache
def _cache_keyword(model_class: type) -> str:
    # transformers 5.x renamed `past_key_values` to `cache` (the old name warns, then goes); we accept both releases.
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


class _Row:
    """One request inside a batch: its sampler, its text so far and its budget."""

    def __init__(self, job: Job, text: ReplyText):
        self.job = job
        self.text = text
        self.generated = 0
        sampling = job.sampling
        self.generator = None
        if sampling.temperature > 0:
            self.generator = torch.Generator()
            if sampling.seed is not None:
                self.generator.manual_seed(sampling.seed)
            else:
                self.generator.seed()

    def sample(self, logits: torch.Tensor) -> int:
        s = self.job.sampling
        if s.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / s.temperature, dim=-1)
        if s.top_p < 1.0:
            # Nucleus: keep the most likely tokens whose cumulative probability first reaches top_p.
            sorted_probs, order = torch.sort(probs, descending=True)
            before = sorted_probs.cumsum(-1) - sorted_probs
            sorted_probs[before >= s.top_p] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))

    def advance(self, token: int, eos_ids: set[int]) -> bool:
        """Take the sampled token; True when this row is finished (and its Finished event sent)."""
        job = self.job
        if job.cancelled.is_set():
            return True
        self.generated += 1
        if token in eos_ids:
            return self._finish("stop")
        delta = self.text.push(token)
        if delta:
            job.emit(Delta(delta))
        if self.text.stopped:
            return self._finish("stop")
        if self.generated >= job.sampling.max_tokens:
            return self._finish("length")
        return False

    def _finish(self, reason: str) -> bool:
        rest = self.text.flush()
        if rest:
            self.job.emit(Delta(rest))
        self.job.emit(Finished(reason, len(self.job.prompt_ids), self.generated))
        return True

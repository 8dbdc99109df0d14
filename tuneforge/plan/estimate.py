"""`tuneforge estimate`: peak training memory (and, with a measured throughput, time per epoch) for a run file or a
model + method, and the pre-flight lines `tuneforge train` prints before it loads a model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tuneforge.config import RunConfig, config_from_dict
from tuneforge.errors import UserError
from tuneforge.method_registry import method_named
from tuneforge.plan import METHODS
from tuneforge.plan.data_shape import DataShape, measure_data
from tuneforge.plan.memory import MemoryEstimate, MemorySpec, estimate_memory

GIB = 2**30


def resolve_device(requested: str) -> str:
    """Like training's `auto`, but planning for CUDA on a machine without one is allowed."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def compute_dtype(requested: str, device: str) -> str:
    """The dtype activations are held in: the run's `train.dtype`, with `auto` decided as training decides it."""
    if requested in ("bfloat16", "bf16"):
        return "bf16"
    if requested in ("float32", "fp32"):
        return "fp32"
    if device == "cuda" and not torch.cuda.is_available():
        return "bf16"  # planning for a GPU from elsewhere: every current training GPU has bf16
    from tuneforge.model.load import native_bf16

    return "bf16" if native_bf16(device) else "fp32"


def spec_from_config(cfg: RunConfig, shape: DataShape | None = None, *, device: str | None = None,
                     engine: str = "tuneforge", optimizer: str = "adamw") -> MemorySpec:
    """The memory spec of a run file; with `shape`, its largest micro-batch comes from the data."""
    if cfg.method not in METHODS:
        raise UserError(f"estimate: method {cfg.method!r} is not modelled yet (modelled: {', '.join(METHODS)})")
    device = resolve_device(device or cfg.train.device)
    batch = cfg.train.batch_size
    if shape is not None and shape.num_examples and engine == "tuneforge" and cfg.data.packing and \
            cfg.train.micro_batch_tokens != 0:
        # The loop re-lays each step out in rows of up to train.micro_batch_tokens: the largest such row.
        from tuneforge.data.batching import StepPlan
        from tuneforge.train.micro_batch_size import largest_row, micro_batch_tokens

        plan = StepPlan(batch, cfg.train.grad_accum, cfg.train.tokens_per_batch, True, False, cfg.train.seed)
        budget, _ = micro_batch_tokens(cfg, list(shape.lengths), plan, 1)
        row = largest_row(list(shape.lengths), plan, 1, budget)
        lengths, targets = tuple(shape.lengths[i] for i in row), sum(shape.targets[i] for i in row)
    elif shape is not None and shape.num_examples:
        lengths, targets = shape.largest_micro_batch(batch)
    else:
        lengths, targets = (cfg.data.max_length,) * batch, None
    lora = cfg.lora
    qlora = getattr(cfg, "qlora", None)  # the qlora section arrives with method: qlora
    return MemorySpec(
        model=cfg.model,
        method=method_named(cfg.method).planner,
        lora_r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules if isinstance(lora.target_modules, str) else tuple(lora.target_modules),
        example_lengths=tuple(lengths),
        target_tokens=None if cfg.data.train_on_prompt else targets,
        grad_accum=cfg.train.grad_accum,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        optimizer=optimizer,
        engine=engine,
        compute_dtype=compute_dtype(cfg.train.dtype, device),
        double_quant=bool(getattr(qlora, "double_quant", True)),
        packing=cfg.data.packing,
        fuse_lora=cfg.train.fuse_lora and cfg.train.distributed != "fsdp",
        device=device,
        trust_remote_code=cfg.trust_remote_code,
    )


def config_for(model: str | None = None, method: str | None = None, r: int | None = None,
               seq_len: int | None = None, batch: int | None = None, gradient_checkpointing: bool = False,
               device: str | None = None) -> RunConfig:
    """A run config from `tuneforge estimate --model ...` options; what is not given keeps config.py's default."""
    raw: dict = {"lora": {}, "data": {}, "train": {}}
    for section, key, value in (("", "model", model), ("", "method", method), ("lora", "r", r),
                                ("data", "max_length", seq_len), ("train", "batch_size", batch),
                                ("train", "device", device)):
        if value is not None:
            (raw[section] if section else raw)[key] = value
    if gradient_checkpointing:
        raw["train"]["gradient_checkpointing"] = True
    return config_from_dict(raw)


def data_shape_of(cfg: RunConfig) -> DataShape | None:
    if cfg.data.train is None:
        return None
    return measure_data(cfg.data, cfg.model, cfg.train.seed, cfg.trust_remote_code, cfg.objective)


# --------------------------------------------------------------------------------------------------------------------
# Time


@dataclass(frozen=True)
class TimeEstimate:
    tokens_per_epoch: int
    tokens_per_s: float
    epochs: int
    source: str  # where the throughput came from

    @property
    def seconds_per_epoch(self) -> float:
        return self.tokens_per_epoch / self.tokens_per_s

    def summary(self) -> str:
        total = self.seconds_per_epoch * self.epochs
        return (f"time: {self.tokens_per_epoch:,} tokens an epoch at {self.tokens_per_s:,.0f} tokens/s "
                f"({self.source}) = {format_duration(self.seconds_per_epoch)} an epoch, "
                f"{format_duration(total)} for {self.epochs} epoch{'s' if self.epochs != 1 else ''}")


def time_per_epoch(cfg: RunConfig, shape: DataShape | None, tokens_per_s: float, source: str) -> TimeEstimate:
    """Expected time per epoch at a measured throughput, from the tokens of the run's data."""
    if shape is None or not shape.num_examples:
        raise UserError("estimate: time per epoch needs the run's data (data.train) to count its tokens")
    if tokens_per_s <= 0:
        raise UserError(f"--tokens-per-s: got {tokens_per_s}, must be > 0")
    return TimeEstimate(shape.total_tokens, tokens_per_s, cfg.train.epochs, source)


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# --------------------------------------------------------------------------------------------------------------------
# Rendering


def format_estimate(est: MemoryEstimate, shape: DataShape | None = None) -> str:
    spec, params = est.spec, est.params
    method = spec.method
    if spec.peft:
        targets = spec.target_modules if isinstance(spec.target_modules, str) else ",".join(spec.target_modules)
        method += f" r={spec.lora_r} ({targets})"
        if spec.method == "qlora":
            method += f", NF4 {'with' if spec.double_quant else 'without'} double quantization"
    lengths = spec.example_lengths
    layout = (f"{len(lengths)} x {lengths[0]}" if len(set(lengths)) == 1 else
              f"{len(lengths)} examples, {sum(lengths):,}")
    lines = [
        f"estimate: {spec.model}, {method}, {layout} tokens a micro-batch"
        f"{', gradient checkpointing' if spec.gradient_checkpointing else ''}, {spec.compute_dtype} activations, "
        f"{spec.optimizer}, engine {spec.engine}, {spec.device}",
        f"parameters: {params.total:,} (linear {params.linear:,}, embedding {params.embedding:,}, "
        f"head {params.lm_head:,}, other {params.other:,}); trainable {est.trainable_params:,} "
        f"({100 * est.trainable_params / params.total:.4f}%)",
    ]
    if shape is not None:
        lines.append(f"data: {shape.summary()}")
    lines.append("")
    width = max(len(c.name) for c in est.components)
    for c in est.components:
        lines.append(f"  {c.name:<{width}}  {c.bytes / GIB:9.3f} GiB  {c.note}")
    lines.append(f"  {'peak':<{width}}  {est.peak / GIB:9.3f} GiB  at the {est.peak_phase} "
                 f"(end of forward {est.forward_peak / GIB:.3f} GiB, optimizer step {est.step_peak / GIB:.3f} GiB, "
                 f"+ overhead)")
    for note in est.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Pre-flight: what `tuneforge train` prints before loading the model.


def available_memory(device: str) -> tuple[int | None, str]:
    """(bytes available for training, what they are): free GPU memory on CUDA, else the kernel's MemAvailable."""
    if device == "cuda" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info()
        return int(free), f"free memory on {torch.cuda.get_device_name()}"
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "RAM available"
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available), "RAM available"
    except ImportError:
        return None, "RAM available (unknown on this system)"


def micro_batch_of(cfg: RunConfig, lengths: Sequence[int] | None = None) -> tuple[int, ...]:
    """Token lengths of the largest micro-batch a run can form. Without `lengths`: `batch_size` examples of
    `max_length` (or `tokens_per_batch` tokens when set), an upper bound, since real examples are usually shorter.
    With `lengths` (this run's tokenized examples): the largest micro-batch they can form, the `batch_size` longest
    (the worst that any shuffle can draw) or the token budget filled with the longest."""
    longest = max(lengths) if lengths else cfg.data.max_length
    budget = cfg.train.tokens_per_batch
    if budget > 0:
        full, rest = divmod(budget, longest)
        return (longest,) * full + ((rest,) if rest else ()) if full else (budget,)
    if lengths:
        return tuple(sorted(lengths, reverse=True)[:cfg.train.batch_size])
    return (longest,) * cfg.train.batch_size


def preflight_report(cfg: RunConfig, example_lengths: Sequence[int] | None = None,
                     row_lengths: Sequence[int] | None = None) -> tuple[str, str | None]:
    """What `tuneforge train` prints before it loads the model: one paragraph with the estimated peak by component,
    and a warning line when that peak exceeds the memory available (free GPU memory, or RAM on CPU), else None.
    `example_lengths`: the run's tokenized training examples, so the estimate is for the micro-batches this data
    forms, not for rows of max_length; `row_lengths`: the examples of the largest micro-batch as the loop lays them
    out (train.micro_batch_tokens), when it is known. Never raises for a model it cannot estimate: training must not
    fail because planning could not."""
    if cfg.method not in METHODS:
        return f"memory estimate: not modelled for method {cfg.method!r} (modelled: {', '.join(METHODS)})", None
    lengths = tuple(row_lengths) if row_lengths else micro_batch_of(cfg, example_lengths)
    try:
        est = estimate_memory(dataclasses.replace(spec_from_config(cfg), example_lengths=lengths, target_tokens=None))
    except UserError as exc:
        return f"memory estimate: unavailable ({exc})", None
    parts = [("weights", est.component("base weights") + est.component("trainable params")
              + est.component("fp32 master copy")),
             ("gradients", est.component("gradients")),
             ("optimizer", est.component("optimizer states") + est.component("optimizer step temporaries")),
             ("activations", est.component("activations") + est.component("backward working set")),
             ("loss", est.component("logits / loss buffers")), ("overhead", est.overhead)]
    detail = ", ".join(f"{name} {nbytes / GIB:.2f}" for name, nbytes in parts)
    available, what = available_memory(est.spec.device)
    avail_text = f"; {available / GIB:.1f} GiB {what}" if available is not None else ""
    layout = f"{len(lengths)} x {lengths[0]}" if len(set(lengths)) == 1 else f"{len(lengths)} examples, {sum(lengths)}"
    basis = (f"the largest this run's {len(example_lengths):,} tokenized examples form" if example_lengths else
             "an upper bound: real examples are usually shorter")
    text = (f"memory estimate: peak {est.peak / GIB:.2f} GiB at the {est.peak_phase} ({detail} GiB) for "
            f"{cfg.method} on {est.spec.device}, micro-batches of {layout} tokens ({basis}){avail_text}; "
            f"`tuneforge estimate` gives the full breakdown")
    warning = None
    if available is not None and est.peak > available:
        warning = (f"warning: the estimated peak ({est.peak / GIB:.1f} GiB) exceeds the {available / GIB:.1f} GiB "
                   f"{what}; {_how_to_fit(cfg)}")
    return text, warning


def _how_to_fit(cfg: RunConfig) -> str:
    ideas = []
    if not cfg.train.gradient_checkpointing:
        ideas.append("train.gradient_checkpointing=true")
    if cfg.train.batch_size > 1:
        ideas.append("a smaller train.batch_size with a larger train.grad_accum")
    planned = method_named(cfg.method).planner  # the planner's memory model: a lighter one that may fit
    if planned == "full":
        ideas.append("method=lora")
    elif planned in ("lora", "dora"):
        ideas.append("method=qlora")
    return "try " + ", ".join(ideas) if ideas else "use a smaller model or a machine with more memory"

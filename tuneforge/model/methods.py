"""load → quantize → method: the base model each method needs, and which of its parameters train.

What each method trains, how it is saved and what it supports is the registry's (tuneforge/method_registry.py,
`methods_table()`); here is its code: `APPLY`, the one function per method that wraps a fresh base, and the checks
around it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tuneforge.config import RunConfig
from tuneforge.errors import ConfigError
from tuneforge.method_registry import METHOD_NAMES, find_method, method_named, saves_whole_model
from tuneforge.model.bottleneck import BottleneckModel, add_bottleneck_adapters
from tuneforge.model.load import load_model
from tuneforge.model.lora import apply_dora, apply_lora
from tuneforge.model.prompt_learning import apply_prefix, apply_prompt
from tuneforge.run_dir import read_meta


def train_every_weight(model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
    from tuneforge.model.families import freeze_beside_language_model

    for param in model.parameters():
        param.requires_grad_(True)
    freeze_beside_language_model(model)  # every weight that text training runs; not a vision tower
    return model


def add_bottleneck(model: torch.nn.Module, cfg: RunConfig) -> BottleneckModel:
    return add_bottleneck_adapters(model, cfg.adapter)


# How each registry method wraps a fresh base, leaving exactly its parameters trainable. qlora is lora: its 4-bit base
# is prepared by apply_method for any method with `quantized_base`.
APPLY = {"full": train_every_weight, "lora": apply_lora, "qlora": apply_lora, "dora": apply_dora,
         "adapter": add_bottleneck, "prefix": apply_prefix, "prompt": apply_prompt}


def load_base_model(cfg: RunConfig, device: str) -> torch.nn.Module:
    """The base model the method trains on: 4-bit for a `quantized_base` method (qlora), float32 otherwise."""
    _refuse_run_as_base(cfg.model)
    if method_named(cfg.method).quantized_base:
        from tuneforge.model.quantize import load_quantized_model

        return load_quantized_model(cfg.model, cfg.qlora, device, cfg.trust_remote_code)
    return load_model(cfg.model, dtype=torch.float32, device=device, trust_remote_code=cfg.trust_remote_code)


def _refuse_run_as_base(name: str) -> None:
    # Training on an adapter run would need its adapter underneath a second one; say what to do instead.
    meta = read_meta(Path(name)) if Path(name).is_dir() else None
    if meta is not None and not saves_whole_model(meta.get("method")):
        method, base = meta.get("method"), meta.get("base_model")
        known = find_method(method)
        other = ("merge it first (tuneforge merge) and train on the merged model" if known is not None and known.merges
                 else f"start a fresh run on its base {base}")
        raise ConfigError(f"model: {name} is a {method} run (an adapter on {base}), not a base model; continue it "
                          f"with --resume in its own output_dir, or {other}")


def apply_method(model: torch.nn.Module, cfg: RunConfig, token_ids: list[int] = ()) -> torch.nn.Module:
    """Wrap `model` (a freshly loaded base) for `cfg.method` and leave exactly its parameters trainable.
    `token_ids`: the added tokens' rows (tuneforge.model.vocabulary), which LoRA-type methods train too."""
    _refuse_wrapped(model, cfg.method)
    wrap = APPLY.get(cfg.method)
    if wrap is None:
        raise ConfigError(f"method: got {cfg.method!r}, allowed: {', '.join(METHOD_NAMES)}")
    if method_named(cfg.method).quantized_base:
        from peft import prepare_model_for_kbit_training

        # Norms and other small weights to fp32 and everything frozen; gradient checkpointing stays the loop's
        # decision (train.gradient_checkpointing), not a side effect of quantization.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return wrap(model, cfg, token_ids) if token_ids and cfg.method in ("lora", "dora") else wrap(model, cfg)


def _refuse_wrapped(model: torch.nn.Module, method: str) -> None:
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    already = isinstance(model, (PeftModel, BottleneckModel)) or any(
        isinstance(m, BaseTunerLayer) for m in model.modules())
    if already:
        raise ConfigError(f"method {method}: the model already carries an adapter; train a fresh base model")


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once; 4-bit weights by their original size."""
    trainable = total = 0
    for param in model.parameters():  # yields a tied (shared) weight once
        quant_state = getattr(param, "quant_state", None)  # bitsandbytes packs two 4-bit values per stored byte
        count = quant_state.shape.numel() if quant_state is not None else param.numel()
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def parameter_report(model: torch.nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"

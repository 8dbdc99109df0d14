"""apply_method(model, cfg): make the right parameters trainable for the chosen fine-tuning method."""

from __future__ import annotations

import torch

from tuneforge.config import RunConfig
from tuneforge.errors import ConfigError


def apply_method(model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
    if cfg.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if cfg.method == "lora":
        return _apply_lora(model, cfg)
    raise ConfigError(f"method: got {cfg.method!r}, allowed: full, lora")  # the schema already refuses others


def _apply_lora(model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise ConfigError("method: lora on a model that already carries an adapter; train a fresh base model")
    lora = cfg.lora
    targets = lora.target_modules
    if isinstance(targets, list):
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t not in present]
        if missing:
            raise ConfigError(
                f"lora.target_modules: {', '.join(missing)} not found in {cfg.model}; "
                f"linear modules there: {', '.join(sorted(linear_module_names(model)))}"
            )
    elif targets != "all-linear":
        targets = [targets]
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def linear_module_names(model: torch.nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def parameter_report(model: torch.nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"

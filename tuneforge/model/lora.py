"""LoRA and DoRA adapters (PEFT) on a fresh base: methods lora, dora and qlora (LoRA on the 4-bit base)."""

from __future__ import annotations

import re

import torch

from tuneforge.config import RunConfig
from tuneforge.errors import ConfigError


def apply_lora(model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, cfg))


def apply_dora(model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, cfg, use_dora=True))


def lora_config(model: torch.nn.Module, cfg: RunConfig, use_dora: bool = False):
    from peft import LoraConfig

    from tuneforge.model.families import freeze_beside_language_model

    lora = cfg.lora
    targets = lora.target_modules
    exclude = freeze_beside_language_model(model)  # a multimodal checkpoint's vision tower gets no adapters
    if isinstance(targets, list):
        missing = missing_targets(model, targets, exclude)
        if missing:
            raise ConfigError(
                f"lora.target_modules: {', '.join(missing)} not found in {cfg.model}; "
                f"linear modules there: {', '.join(sorted(linear_module_names(model)))}"
            )
    elif targets != "all-linear":
        targets = [targets]
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        exclude_modules=exclude,
        bias="none",
        use_dora=use_dora,
        task_type="CAUSAL_LM",
    )


def missing_targets(model: torch.nn.Module, targets, exclude: str | None) -> list[str]:
    """The named LoRA targets that no module outside `exclude` (a PEFT exclude_modules pattern) is called."""
    outside = re.compile(exclude) if exclude else None
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()
               if not (outside and outside.fullmatch(name))}
    return [t for t in targets if t not in present]


def linear_module_names(model: torch.nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}

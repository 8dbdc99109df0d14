"""LoRA and DoRA adapters (PEFT) on a fresh base: methods lora, dora and qlora (LoRA on the 4-bit base)."""

from __future__ import annotations

import re

import torch

from tuneforge.config import RunConfig
from tuneforge.errors import ConfigError
from tuneforge.model.vocabulary import ties_embeddings, trainable_token_modules


def apply_lora(model: torch.nn.Module, cfg: RunConfig, token_ids: list[int] = ()) -> torch.nn.Module:
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, cfg, token_ids=token_ids))


def apply_dora(model: torch.nn.Module, cfg: RunConfig, token_ids: list[int] = ()) -> torch.nn.Module:
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, cfg, use_dora=True, token_ids=token_ids))


def lora_config(model: torch.nn.Module, cfg: RunConfig, use_dora: bool = False, token_ids: list[int] = ()):
    """`token_ids`: rows of added tokens (tuneforge.model.vocabulary), trained and saved beside the adapter."""
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
    to_save = lora.modules_to_save or None
    if to_save:
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [m for m in to_save if m not in present]
        if missing:
            raise ConfigError(f"lora.modules_to_save: {', '.join(missing)} not found in {cfg.model}; "
                              f"e.g. embed_tokens, lm_head")
    tokens = trainable_token_modules(model, list(token_ids)) if token_ids else None
    if tokens and to_save:  # a module trained in full already trains the added rows
        tokens = {name: ids for name, ids in tokens.items() if name not in to_save} or None
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        exclude_modules=exclude,
        bias="none",
        use_dora=use_dora,
        task_type="CAUSAL_LM",
        modules_to_save=to_save,
        trainable_token_indices=tokens,
        # Tied embeddings stay one matrix: trained apart, the merged model would re-tie them and lose one (PEFT
        # issue #2777, what "my merged model behaves like the base model" often is).
        ensure_weight_tying=ties_embeddings(model),
    )


def missing_targets(model: torch.nn.Module, targets, exclude: str | None) -> list[str]:
    """The named LoRA targets that no module outside `exclude` (a PEFT exclude_modules pattern) is called."""
    outside = re.compile(exclude) if exclude else None
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()
               if not (outside and outside.fullmatch(name))}
    return [t for t in targets if t not in present]


def linear_module_names(model: torch.nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}

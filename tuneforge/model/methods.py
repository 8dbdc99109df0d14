"""load → quantize → method: the base model each method needs, and which of its parameters train.

| method  | what trains                                                    | saved as                         |
|---------|----------------------------------------------------------------|----------------------------------|
| full    | every weight                                                   | a Hugging Face model directory   |
| lora    | low-rank updates B·A beside the linear layers (PEFT)           | PEFT adapter                     |
| dora    | LoRA plus a learned magnitude per output unit (PEFT use_dora)  | PEFT adapter                     |
| qlora   | LoRA on a base whose linear weights are 4-bit NF4 (bitsandbytes) | PEFT adapter                 |
| adapter | bottleneck layers after attention / MLP (tuneforge.bottleneck) | adapter_model + bottleneck_config|
| prefix  | learned key/value prefixes in every layer (PEFT)               | PEFT adapter                     |
| prompt  | learned soft-prompt input embeddings (PEFT)                    | PEFT adapter                     |
"""

from __future__ import annotations

from pathlib import Path

import torch

from tuneforge.config import RunConfig
from tuneforge.errors import ConfigError
from tuneforge.model.bottleneck import BottleneckModel, add_bottleneck_adapters
from tuneforge.model.load import load_model, resolve_model
from tuneforge.model.trained import read_run_meta
from tuneforge.model.virtual_generation import use_virtual_token_generation

PEFT_METHODS = ("lora", "dora", "qlora", "prefix", "prompt")
MERGEABLE_METHODS = ("lora", "dora", "qlora")  # their update folds into the base weights


def load_base_model(cfg: RunConfig, device: str) -> torch.nn.Module:
    """The base model the method trains on: 4-bit for qlora, float32 otherwise."""
    _refuse_run_as_base(cfg.model)
    if cfg.method == "qlora":
        from tuneforge.model.quantize import load_quantized_model

        return load_quantized_model(cfg.model, cfg.qlora, device, cfg.trust_remote_code)
    return load_model(cfg.model, dtype=torch.float32, device=device, trust_remote_code=cfg.trust_remote_code)


def _refuse_run_as_base(name: str) -> None:
    # Training on an adapter run would need its adapter underneath a second one; say what to do instead.
    meta = read_run_meta(Path(name)) if Path(name).is_dir() else None
    if meta is not None and meta.get("method") != "full":
        method, base = meta.get("method"), meta.get("base_model")
        other = ("merge it first (tuneforge merge) and train on the merged model" if method in MERGEABLE_METHODS
                 else f"start a fresh run on its base {base}")
        raise ConfigError(f"model: {name} is a {method} run (an adapter on {base}), not a base model; continue it "
                          f"with --resume in its own output_dir, or {other}")


def apply_method(model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
    """Wrap `model` (a freshly loaded base) for `cfg.method` and leave exactly its parameters trainable."""
    _refuse_wrapped(model, cfg.method)
    method = cfg.method
    if method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if method == "adapter":
        return add_bottleneck_adapters(model, cfg.adapter)
    from peft import get_peft_model

    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        # Norms and other small weights to fp32 and everything frozen; gradient checkpointing stays the loop's
        # decision (train.gradient_checkpointing), not a side effect of quantization.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if method in ("lora", "dora", "qlora"):
        return get_peft_model(model, lora_config(model, cfg, use_dora=method == "dora"))
    if method == "prefix":
        from peft import PrefixTuningConfig

        prefix = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.prefix.num_virtual_tokens)
        return use_virtual_token_generation(get_peft_model(model, prefix))
    if method == "prompt":
        return use_virtual_token_generation(get_peft_model(model, prompt_tuning_config(cfg)))
    raise ConfigError(f"method: got {method!r}, allowed: full, {', '.join(PEFT_METHODS)}, adapter")


def _refuse_wrapped(model: torch.nn.Module, method: str) -> None:
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    already = isinstance(model, (PeftModel, BottleneckModel)) or any(
        isinstance(m, BaseTunerLayer) for m in model.modules())
    if already:
        raise ConfigError(f"method {method}: the model already carries an adapter; train a fresh base model")


def lora_config(model: torch.nn.Module, cfg: RunConfig, use_dora: bool = False):
    from peft import LoraConfig

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
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
        use_dora=use_dora,
        task_type="CAUSAL_LM",
    )


def prompt_tuning_config(cfg: RunConfig):
    from peft import PromptTuningConfig, PromptTuningInit

    prompt = cfg.prompt
    init = {"vocab": PromptTuningInit.SAMPLE_VOCAB, "random": PromptTuningInit.RANDOM,
            "text": PromptTuningInit.TEXT}[prompt.init]
    extra = {}
    if prompt.init == "text":
        # PEFT tokenizes init_text with the base model's tokenizer and repeats/cuts it to num_virtual_tokens.
        extra = {"prompt_tuning_init_text": prompt.init_text, "tokenizer_name_or_path": resolve_model(cfg.model)}
    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prompt.num_virtual_tokens,
                              prompt_tuning_init=init, **extra)


def linear_module_names(model: torch.nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}


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

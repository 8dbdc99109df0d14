"""Load what `tuneforge train` wrote (or a plain base model) for generation: chat, generate, eval."""

from __future__ import annotations

from pathlib import Path

import torch

from tuneforge.errors import UserError
from tuneforge.method_registry import Method, find_method
from tuneforge.model.load import load_model, load_tokenizer
from tuneforge.model.vocabulary import grow_embeddings
from tuneforge.run_dir import META_FILE, read_meta

def load_for_inference(model_or_run: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer): a run directory (its adapter on its base, or a full model) or any base model."""
    meta = read_meta(Path(model_or_run)) if Path(model_or_run).is_dir() else None
    name = None if meta is None else meta.get("method")
    method = find_method(name)
    if name is not None and method is None:
        raise UserError(f"{model_or_run}: unknown method {name!r} in {model_or_run}/{META_FILE}")
    if method is None or method.saved_as == "model":
        model = load_model(model_or_run, dtype=dtype, device=device)
    else:
        model = _adapter_on_base(model_or_run, meta, method, device, dtype)
    tokenizer = load_tokenizer(model_or_run)
    model.eval()
    return model, tokenizer


def _adapter_on_base(run_dir: str, meta: dict, method: Method, device: str, dtype: torch.dtype):
    if method.quantized_base:  # the same 4-bit base the adapter was trained on (quantization is deterministic)
        from tuneforge.model.quantize import load_quantized_model, run_qlora_settings

        base = load_quantized_model(meta["base_model"], run_qlora_settings(Path(run_dir)), device)
    else:
        base = load_model(meta["base_model"], dtype=dtype, device=device)
    grow_embeddings(base, load_tokenizer(run_dir), fresh=False)  # a run's added tokens: rows the adapter fills
    return ADAPTER_LOADERS[method.saved_as](base, run_dir)


def _peft_adapter(base: torch.nn.Module, run_dir: str) -> torch.nn.Module:
    from peft import PeftModel

    from tuneforge.model.virtual_generation import use_virtual_token_generation

    return use_virtual_token_generation(PeftModel.from_pretrained(base, run_dir))


def _bottleneck_adapter(base: torch.nn.Module, run_dir: str) -> torch.nn.Module:
    from tuneforge.model.bottleneck import BottleneckModel

    return BottleneckModel.from_pretrained(base, run_dir)


# How each saved form of an adapter (method_registry.SAVED_AS) goes back onto its base.
ADAPTER_LOADERS = {"peft": _peft_adapter, "bottleneck": _bottleneck_adapter}

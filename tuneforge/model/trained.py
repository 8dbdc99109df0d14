"""Load what `tuneforge train` wrote (or a plain base model) for generation: chat, generate, eval."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tuneforge.errors import UserError
from tuneforge.model.load import load_model, load_tokenizer

# Written into every run directory: which base model and method produced the weights beside it.
RUN_META_FILE = "tuneforge.json"


def read_run_meta(run_dir: Path) -> dict | None:
    path = Path(run_dir) / RUN_META_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def load_for_inference(model_or_run: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer): a run directory (its adapter on its base, or a full model) or any base model."""
    meta = read_run_meta(Path(model_or_run)) if Path(model_or_run).is_dir() else None
    method = None if meta is None else meta.get("method")
    if method is None or method == "full":
        model = load_model(model_or_run, dtype=dtype, device=device)
    elif method in ADAPTER_METHODS:
        model = _adapter_on_base(model_or_run, meta, method, device, dtype)
    else:
        raise UserError(f"{model_or_run}: unknown method {method!r} in {model_or_run}/{RUN_META_FILE}")
    tokenizer = load_tokenizer(model_or_run)
    model.eval()
    return model, tokenizer


# Methods whose run directory holds only what was trained, to be put back onto the base model.
ADAPTER_METHODS = ("lora", "dora", "qlora", "prefix", "prompt", "adapter")


def _adapter_on_base(run_dir: str, meta: dict, method: str, device: str, dtype: torch.dtype):
    if method == "qlora":  # the same 4-bit base the adapter was trained on (quantization is deterministic)
        from tuneforge.model.quantize import load_quantized_model, run_qlora_settings

        base = load_quantized_model(meta["base_model"], run_qlora_settings(Path(run_dir)), device)
    else:
        base = load_model(meta["base_model"], dtype=dtype, device=device)
    if method == "adapter":
        from tuneforge.model.bottleneck import BottleneckModel

        return BottleneckModel.from_pretrained(base, run_dir)
    from peft import PeftModel

    from tuneforge.model.virtual_generation import use_virtual_token_generation

    return use_virtual_token_generation(PeftModel.from_pretrained(base, run_dir))

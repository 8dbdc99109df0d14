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
    """(model, tokenizer, label): a run directory (LoRA adapter on its base, or a full model) or any base model."""
    meta = read_run_meta(Path(model_or_run)) if Path(model_or_run).is_dir() else None
    if meta is None:
        model = load_model(model_or_run, dtype=dtype, device=device)
        tokenizer = load_tokenizer(model_or_run)
    elif meta["method"] == "lora":
        from peft import PeftModel

        base = load_model(meta["base_model"], dtype=dtype, device=device)
        model = PeftModel.from_pretrained(base, model_or_run)
        tokenizer = load_tokenizer(model_or_run)
    elif meta["method"] == "full":
        model = load_model(model_or_run, dtype=dtype, device=device)
        tokenizer = load_tokenizer(model_or_run)
    else:
        raise UserError(f"{model_or_run}: unknown method {meta['method']!r} in {model_or_run}/tuneforge.json")
    model.eval()
    return model, tokenizer

"""`tuneforge merge`: fold a LoRA-type run (method_registry `merges`) into its base as a plain Hugging Face model dir.

The result loads anywhere transformers does (vLLM, TGI, llama.cpp after `tuneforge export`), with no PEFT at
inference time and no adapter latency. A QLoRA adapter was trained against the 4-bit NF4 base, not the original
weights, so it is merged into that base dequantized: the merged model then computes what the trained model did.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tuneforge.errors import UserError
from tuneforge.method_registry import MERGEABLE_METHODS, find_method, saves_whole_model
from tuneforge.model.load import load_model, load_tokenizer
from tuneforge.model.stop_ids import keep_end_of_turn
from tuneforge.model.vocabulary import grow_embeddings
from tuneforge.run_dir import META_FILE, read_meta

log = logging.getLogger("tuneforge")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def run_meta_or_error(run_dir: Path) -> dict:
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a directory (expected a run directory written by tuneforge train)")
    meta = read_meta(run_dir)
    if meta is None:
        raise UserError(f"{run_dir}: no {META_FILE}; expected a run directory written by tuneforge train")
    return meta


def check_mergeable(run_dir: Path, meta: dict) -> None:
    name = meta.get("method")
    method = find_method(name)
    if method is None:
        raise UserError(f"{run_dir}: unknown method {name!r} in {META_FILE} "
                        f"(mergeable: {', '.join(MERGEABLE_METHODS)})")
    if method.saved_as == "model":
        raise UserError(f"{run_dir}: method {name!r} is already a complete model directory; nothing to merge")
    if not method.merges:
        raise UserError(
            f"{run_dir}: method {name!r} cannot be merged ({method.why_not_merged}); "
            f"use the run directly with tuneforge chat/generate/eval"
        )


def merged_model(run_dir: Path, meta: dict | None = None) -> torch.nn.Module:
    """The run's adapter folded into its base, in fp32, as a plain transformers model."""
    from peft import PeftModel

    meta = meta or run_meta_or_error(run_dir)
    check_mergeable(run_dir, meta)
    base = load_model(meta["base_model"], dtype=torch.float32)
    if find_method(meta["method"]).quantized_base:
        use_dequantized_4bit_weights(base, meta["base_model"], run_dir)
    grow_embeddings(base, load_tokenizer(str(run_dir)), fresh=False)  # added tokens: rows the adapter fills
    model = PeftModel.from_pretrained(base, str(run_dir))
    model = model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaN/Inf weights instead of writing them
    model.eval()
    return model


def load_source_model(source: str):
    """(fp32 model in eval mode, tokenizer, display name) of what an export starts from: a LoRA-type run merged in
    memory, anything else (full fine-tuning run, model directory, alias) loaded as it is."""
    path = Path(source)
    meta = read_meta(path) if path.is_dir() else None
    if meta is not None and not saves_whole_model(meta.get("method")):
        return merged_model(path, meta), load_tokenizer(source), path.resolve().name
    model = load_model(source, dtype=torch.float32)
    model.eval()
    name = path.resolve().name if path.exists() else source
    return model, load_tokenizer(source), name


def merge_run(run_dir: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write the merged model (safetensors, config, generation config, tokenizer, chat template) into `out_dir`."""
    from tuneforge.train.checkpoint import save_output

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise UserError(f"--dtype: got {dtype!r}, allowed: {', '.join(DTYPES)}")
    meta = run_meta_or_error(run_dir)
    check_mergeable(run_dir, meta)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"-o {out_dir}: already exists and is not an empty directory; choose a new path")
    model = merged_model(run_dir, meta)
    if dtype == "float16":
        refuse_float16_overflow(model)
    model = model.to(DTYPES[dtype])
    tokenizer = load_tokenizer(str(run_dir))
    if getattr(model.generation_config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    keep_end_of_turn(model.generation_config, tokenizer)
    merged_meta = {"base_model": meta["base_model"], "method": "full", "merged_from": str(run_dir),
                   "merged_method": meta["method"], "dtype": dtype}
    save_output(model, tokenizer, out_dir, merged_meta)
    log.info("merged %s (%s) into %s -> %s", run_dir, meta["method"], meta["base_model"], out_dir)
    return out_dir


FLOAT16_MAX = 65504.0


@torch.no_grad()
def refuse_float16_overflow(model: torch.nn.Module) -> None:
    """A weight beyond float16's range would become inf in the file, silently: refused, naming it."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and tensor.numel():
            peak = tensor.abs().max().item()
            if peak > FLOAT16_MAX:
                raise UserError(f"--dtype float16: {name} reaches |{peak:.4g}|, beyond float16's {FLOAT16_MAX:g} (it "
                                "would be written as inf); use --dtype bfloat16 or float32")


@torch.no_grad()
def use_dequantized_4bit_weights(model: torch.nn.Module, base_model: str, run_dir: Path) -> None:
    """Give `model` (the float32 base) the weights of the 4-bit base the QLoRA adapter was trained on, dequantized.

    The 4-bit base is loaded exactly as training and `load_for_inference` load it (same settings from the run's
    config.yaml, same layers left in full precision), so the merged model computes what the trained model did.
    """
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Linear4bit

    from tuneforge.model.quantize import load_quantized_model, run_qlora_settings

    quantized = load_quantized_model(base_model, run_qlora_settings(run_dir), "cpu")
    targets = dict(model.named_modules())
    for name, module in quantized.named_modules():
        if isinstance(module, Linear4bit):
            weight = dequantize_4bit(module.weight.data, module.weight.quant_state)
            targets[name].weight.data = weight.to(torch.float32).reshape(targets[name].weight.shape)

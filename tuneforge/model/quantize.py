"""QLoRA's frozen base: linear weights stored in 4 bits (bitsandbytes NF4 or FP4), dequantized for each matmul.

The base is quantized while it loads (transformers' bitsandbytes integration), so the full-precision model never sits
in memory whole. bitsandbytes runs 4-bit on CUDA and, from 0.47 on, on x86 CPUs with AVX2. The output head and the
embeddings stay in full precision, as in the QLoRA paper. Quantization is deterministic, so loading the same base with
the same settings later (`load_for_inference`) gives bit-identical weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tuneforge.config import QloraSettings
from tuneforge.errors import UserError
from tuneforge.model.load import config_and_attention, resolve_model
from tuneforge.run_dir import read_config

log = logging.getLogger("tuneforge")

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(settings: QloraSettings, device: str) -> torch.dtype:
    if settings.compute_dtype != "auto":
        return COMPUTE_DTYPES[settings.compute_dtype]
    # Matmuls in bf16 where the hardware does them natively; CPUs dequantize to fp32 (bf16 there is emulated, slower).
    return torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def load_quantized_model(name: str, settings: QloraSettings, device: str, trust_remote_code: bool = False):
    """The base model with every linear layer but the output head in 4 bits; logs its size before and after."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401  (transformers would report its absence less clearly)
    except ImportError as exc:
        raise UserError(f"method qlora: needs bitsandbytes ({exc}); install it: pip install bitsandbytes") from None
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.quant_type,
        bnb_4bit_use_double_quant=settings.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(settings, device),
    )
    try:
        path = resolve_model(name)
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=quantization, device_map={"": device}, dtype=torch.float32,
            **config_and_attention(path, trust_remote_code),
        )
    except OSError as exc:
        raise UserError(f"model: cannot load {name!r}: {str(exc).splitlines()[0]}") from None
    except (RuntimeError, ValueError, ImportError) as exc:
        raise UserError(f"method qlora: cannot load {name!r} in 4 bits on {device}: "
                        f"{str(exc).splitlines()[0]}") from None
    keep_training_arithmetic(model)
    before, after = weight_bytes(model)
    log.info("qlora: base model weights %.1f MB in float32 -> %.1f MB with %s linear layers (double quant %s)",
             before / 2**20, after / 2**20, settings.quant_type, "on" if settings.double_quant else "off")
    return model


def keep_training_arithmetic(model: torch.nn.Module) -> None:
    """Inference on the base uses the arithmetic training used. On CPUs with AVX512-BF16, bitsandbytes' Linear4bit
    switches itself, in eval mode without gradients, to a repacked layout with bf16 block scales (and back when it
    is saved): the adapter would then be evaluated, served and merged against a base a few bf16 ulps away from the
    one it was trained on, and a save in the middle rounds the scales again (reload logits off by ~4e-3 on such a
    machine). The fp32 dequantize path is kept everywhere instead."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes the weights would take in float32, bytes they take now incl. quantization scales); tied weights once."""
    import bitsandbytes as bnb

    full = now = 0
    for param in model.parameters():  # yields a tied (shared) weight once
        if isinstance(param, bnb.nn.Params4bit) and param.quant_state is not None:
            state = param.quant_state
            full += state.shape.numel() * 4
            now += param.numel() * param.element_size() + _scale_bytes(state)
        else:
            full += param.numel() * 4
            now += param.numel() * param.element_size()
    return full, now


def _scale_bytes(state) -> int:
    size = state.absmax.numel() * state.absmax.element_size()
    if getattr(state, "nested", False) and state.state2 is not None:
        size += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return size


def run_qlora_settings(run_dir: Path) -> QloraSettings:
    """The qlora settings a run was trained with (its resolved config.yaml), for reloading its base the same way."""
    section = (read_config(run_dir) or {}).get("qlora") or {}
    known = QloraSettings.__dataclass_fields__
    return QloraSettings(**{k: v for k, v in section.items() if k in known})

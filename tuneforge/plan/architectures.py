"""Model architectures without weights: bundled configs, any config.json, and models built on the meta device.

A model built under `torch.device("meta")` has every parameter's shape and dtype but no storage, so counting a 70B
model's parameters (or running its forward pass to see what autograd keeps, see `activations.py`) takes a second
and no memory. The bundled configs make the well-known models work offline under their short names and hub ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tuneforge.config import EMBEDDED_MODEL
from tuneforge.errors import UserError

CONFIG_DIR = Path(__file__).parent / "model_configs"


@dataclass(frozen=True)
class BundledModel:
    file: str  # JSON under model_configs/
    hub_ids: tuple[str, ...]  # names users know it by on the hub (base and instruct share an architecture)
    published_params: int | None  # total parameter count as the model's publishers report it (tests check ours)


BUNDLED: dict[str, BundledModel] = {
    "llama-2-7b": BundledModel("llama-2-7b.json", ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf"),
                               6_738_415_616),
    "llama-2-13b": BundledModel("llama-2-13b.json", ("meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-13b-chat-hf"),
                                13_015_864_320),
    "llama-2-70b": BundledModel("llama-2-70b.json", ("meta-llama/Llama-2-70b-hf", "meta-llama/Llama-2-70b-chat-hf"),
                                68_976_648_192),
    "llama-65b": BundledModel("llama-65b.json", ("huggyllama/llama-65b",), 65_285_660_672),
    "llama-3.1-8b": BundledModel("llama-3.1-8b.json", ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct",
                                                       "meta-llama/Meta-Llama-3.1-8B",
                                                       "meta-llama/Meta-Llama-3.1-8B-Instruct"), 8_030_261_248),
    "llama-3.1-70b": BundledModel("llama-3.1-70b.json", ("meta-llama/Llama-3.1-70B",
                                                         "meta-llama/Llama-3.1-70B-Instruct",
                                                         "meta-llama/Meta-Llama-3.1-70B",
                                                         "meta-llama/Meta-Llama-3.1-70B-Instruct"), 70_553_706_496),
    "mistral-7b": BundledModel("mistral-7b.json", ("mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.1"),
                               7_241_732_096),
    "qwen2.5-0.5b": BundledModel("qwen2.5-0.5b.json", ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct"),
                                 494_032_768),
    "qwen2.5-7b": BundledModel("qwen2.5-7b.json", ("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct"), 7_615_616_512),
    "smollm2-135m": BundledModel("smollm2-135m.json", (EMBEDDED_MODEL, "HuggingFaceTB/SmolLM2-135M",
                                                       "HuggingFaceTB/SmolLM2-135M-Instruct"), 134_515_008),
    "qwen3-8b": BundledModel("qwen3-8b.json", ("Qwen/Qwen3-8B", "Qwen/Qwen3-8B-Base"), 8_190_735_360),
    "gemma-2-9b": BundledModel("gemma-2-9b.json", ("google/gemma-2-9b", "google/gemma-2-9b-it"), 9_241_705_984),
    "gemma-3-1b": BundledModel("gemma-3-1b.json", ("google/gemma-3-1b-pt", "google/gemma-3-1b-it"), 999_885_952),
    # Gemma 3 from 4B up is multimodal (Gemma3ForConditionalGeneration): its published totals include the SigLIP
    # vision tower (~417M) and projector, which planning counts as frozen weights beside the trained language model.
    "gemma-3-4b": BundledModel("gemma-3-4b.json", ("google/gemma-3-4b-pt", "google/gemma-3-4b-it"), 4_300_079_472),
    "gemma-3-12b": BundledModel("gemma-3-12b.json", ("google/gemma-3-12b-pt", "google/gemma-3-12b-it"),
                                12_187_325_040),
    "gemma-3-27b": BundledModel("gemma-3-27b.json", ("google/gemma-3-27b-pt", "google/gemma-3-27b-it"),
                                27_432_406_640),
    # The 4k-context model; Phi-3-mini-128k has the same shapes but its own longrope scaling, not bundled.
    "phi-3-mini-4k": BundledModel("phi-3-mini-4k.json", ("microsoft/Phi-3-mini-4k-instruct",), 3_821_079_552),
    # GPT-3 175B's shapes (d_model 12288, 96 layers, d_ff 4 x d_model; GPT-3 paper, table 2.1) in the OPT layout,
    # which has separate q/k/v/out projections, so the LoRA paper's "Wq and Wv" can be named.
    "gpt3-175b": BundledModel("gpt3-175b.json", ("facebook/opt-175b",), None),
}


def bundled_name(name: str) -> str | None:
    """The bundled entry a model name refers to (short name or hub id, case-insensitive), or None."""
    lowered = name.lower()
    for short, entry in BUNDLED.items():
        if lowered == short or lowered in (h.lower() for h in entry.hub_ids):
            return short
    return None


def load_architecture(name: str, trust_remote_code: bool = False):
    """A transformers config for `name`: bundled (offline), a local dir with config.json, a .gguf file, or a hub id."""
    from transformers import AutoConfig

    short = bundled_name(name)
    if short is not None:
        raw = json.loads((CONFIG_DIR / BUNDLED[short].file).read_text(encoding="utf-8"))
        return AutoConfig.for_model(raw.pop("model_type"), **raw)
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model: GGUF file not found: {name}")
        from tuneforge.model.load import gguf_parsed_once

        with gguf_parsed_once():  # the same parse, several times faster (see there)
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model: {name} is a directory without config.json (not a Hugging Face model directory)")
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if path.exists() or name.startswith((".", "/")):
        raise UserError(f"model: {name} is neither a model directory nor a .gguf file")
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"model: cannot read the architecture of {name!r} ({str(exc).splitlines()[0]}); bundled for offline "
            f"use: {', '.join(BUNDLED)}; or give a local directory with a config.json"
        ) from None


def meta_model(config, dtype: torch.dtype = torch.float32, attn_implementation: str = "eager",
               trust_remote_code: bool = False) -> torch.nn.Module:
    """The causal LM of `config` on the meta device: real module tree and shapes, no storage.

    The default attention is "eager" because every family supports it (Gemma 2 refuses "sdpa": SDPA cannot softcap
    its scores) and shapes do not depend on it; tracing a forward pass passes the implementation training runs."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
            )
        except ValueError as exc:
            raise UserError(f"model: {config.model_type} is not a causal language model transformers can build "
                            f"({str(exc).splitlines()[0]})") from None


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters by how training treats them; tied weights counted once."""

    total: int
    linear: int  # weights of the body's nn.Linear layers: what 4-bit quantization replaces
    linear_tensors: tuple[int, ...]  # numel of each of those weights (4-bit constants are per 64-value block)
    embedding: int  # input embeddings (and the output head when tied to them)
    lm_head: int  # an untied output head
    other: int  # norms, biases, positional tables

    @property
    def unquantized(self) -> int:
        return self.total - self.linear


def count_parameters(model: torch.nn.Module) -> ParameterCounts:
    head = model.get_output_embeddings()
    head_weight = head.weight if head is not None else None
    seen: set[int] = set()
    linear: list[int] = []
    embedding = lm_head = other = 0
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head}
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        n = param.numel()
        if id(param) in embedding_weights:
            embedding += n
        elif head_weight is not None and param is head_weight:
            lm_head += n
        elif id(param) in linear_weights:
            linear.append(n)
        else:
            other += n
    total = sum(linear) + embedding + lm_head + other
    return ParameterCounts(total, sum(linear), tuple(linear), embedding, lm_head, other)

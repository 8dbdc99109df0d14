"""The model families tuneforge is tested on, by transformers' `model_type`.

Each listed family has a tiny random model in tests/families.py with its features switched on, and its training
loss and gradients are checked against transformers' own eager forward (tests/unit/test_families.py). A family
outside the list is tried, not refused: transformers runs its layers, and the run's log says it is untested.
"""

from __future__ import annotations

import re

TESTED = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2/2.5",
    "qwen3": "Qwen3",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3 (text)",
    "phi3": "Phi-3",
}


def text_config(config):
    """The language model's config: a multimodal config's text_config, or a text-only config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def family_line(config) -> str:
    """One line for the run's log: the family, or that it is untested and what that means."""
    model_type = getattr(text_config(config), "model_type", None) or config.model_type
    if model_type in TESTED:
        return f"model family: {TESTED[model_type]} ({model_type})"
    return (f"model family {model_type!r} is untested with tuneforge (tested: {', '.join(TESTED)}): training goes "
            "ahead with transformers' layers; compare a first loss with transformers' own before relying on it")


def freeze_beside_language_model(model) -> str | None:
    """Freeze what a multimodal checkpoint has beside its language model and head (Gemma 3 4B-27B's SigLIP vision
    tower and projector; nothing for a text-only causal LM), and return a PEFT `exclude_modules` pattern for them.

    Training on text never runs those modules: PEFT's "all-linear" (and names like q_proj) would otherwise put
    adapters on the vision tower that are saved but never learn, and full fine-tuning would count them as trained.
    The planner (plan/memory.py) uses the same split, so its counts are the run's."""
    if not hasattr(model, "get_decoder"):  # not a transformers model (nothing to tell apart)
        return None
    inside = {id(m) for m in model.get_decoder().modules()} | {id(model.get_output_embeddings())}
    beside: list[str] = []
    for name, module in model.named_modules():
        if id(module) in inside or any(name.startswith(f"{b}.") for b in beside):
            continue
        if not any(id(m) in inside for m in module.modules()):  # a whole subtree outside the language model
            beside.append(name)
    for name in beside:
        model.get_submodule(name).requires_grad_(False)
    return "|".join(rf"{re.escape(b)}(\..+)?" for b in beside) or None

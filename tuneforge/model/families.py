"""The model families tuneforge is tested on, by transformers' `model_type`.

Each listed family has a tiny random model in tests/families.py with its features switched on, and its training
loss and gradients are checked against transformers' own eager forward (tests/unit/test_families.py). A family
outside the list is tried, not refused: transformers runs its layers, and the run's log says it is untested.
"""

from __future__ import annotations

TESTED = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2/2.5",
    "qwen3": "Qwen3",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3 (text)",
    "phi3": "Phi-3",
}


def family_line(config) -> str:
    """One line for the run's log: the family, or that it is untested and what that means."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", None) or config.model_type
    if model_type in TESTED:
        return f"model family: {TESTED[model_type]} ({model_type})"
    return (f"model family {model_type!r} is untested with tuneforge (tested: {', '.join(TESTED)}): training goes "
            "ahead with transformers' layers; compare a first loss with transformers' own before relying on it")

"""Where a tuned model stops: the end-of-turn id its saved generation config must name."""

from __future__ import annotations


def keep_end_of_turn(generation_config, tokenizer) -> None:
    """A saved model (merged, or fully fine-tuned) stops where training taught it to: every answer ends with the eos
    token (the chat template's end of turn, tuneforge.data.tokenize), and a base's generation_config may name only
    its own end-of-text id (Llama 3's <|end_of_text|> beside the template's <|eot_id|>). Transformers and vLLM read the
    stop ids from here (the GGUF export names the same id as end of turn), so it is added to them, never removed."""
    end_of_turn = tokenizer.eos_token_id
    if end_of_turn is None:
        return
    current = generation_config.eos_token_id
    ids = [] if current is None else list(current) if isinstance(current, (list, tuple)) else [current]
    if end_of_turn not in ids:
        generation_config.eos_token_id = [*ids, end_of_turn] if ids else end_of_turn

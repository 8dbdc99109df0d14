"""Batched generation with the model's chat template (greedy by default)."""

from __future__ import annotations

import torch

from tuneforge.data.tokenize import ensure_chat_template, render_prompt


@torch.no_grad()
def generate_replies(
    model,
    tokenizer,
    conversations: list[list[dict[str, str]]],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> list[str]:
    """The assistant's next reply to each conversation (each ends on a user turn)."""
    ensure_chat_template(tokenizer)
    device = next(model.parameters()).device
    prompts = [render_prompt(tokenizer, conv) for conv in conversations]
    replies: list[str] = []
    # Left padding keeps every prompt's last token at the end of the row, where generation continues.
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
                "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
            new_tokens = out[:, enc["input_ids"].shape[1]:]
            replies += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return replies

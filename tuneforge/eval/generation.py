"""Batched generation: chat replies (with the model's chat template) and raw text continuations (code completion).

Greedy by default. Prompts are generated in batches of similar length (sorted by token count, results returned in
the caller's order), left-padded so that every prompt's last token sits at the end of its row. Prompt- and
prefix-tuned models generate behind their learned virtual tokens (tuneforge.model.virtual_generation) whether or not
the model object was loaded for inference: mid-training, PEFT's own `generate` would drop a prefix silently.
"""

from __future__ import annotations

import functools

import torch

from tuneforge.data.tokenize import ensure_chat_template, render_prompt
from tuneforge.eval.attention_guard import evaluating
from tuneforge.eval.settings import GENERATION
from tuneforge.model.virtual_generation import generate_with_virtual_tokens, prompt_learning_type


def generate_replies(
    model,
    tokenizer,
    conversations: list[list[dict[str, str]]],
    max_new_tokens: int = GENERATION.max_new_tokens,
    batch_size: int = GENERATION.batch_size,
    temperature: float = GENERATION.temperature,
    top_p: float = GENERATION.top_p,
) -> list[str]:
    """The assistant's next reply to each conversation (each ends on a user turn)."""
    ensure_chat_template(tokenizer)
    prompts = [render_prompt(tokenizer, conv) for conv in conversations]
    return generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size, temperature, top_p)


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = GENERATION.max_new_tokens,
    batch_size: int = GENERATION.batch_size,
    temperature: float = GENERATION.temperature,
    top_p: float = GENERATION.top_p,
    stop: list[str] | None = None,
    add_special_tokens: bool = False,
) -> list[str]:
    """What the model writes after each prompt string, stripped, cut before the first of `stop` (if any)."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]]
    # Similar lengths share a batch: less padding, and the result does not depend on which prompts share it.
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if stop:  # finished rows stop early inside generate; the text is still cut below (stop may end mid-token)
        sampling.update(stop_strings=list(stop), tokenizer=tokenizer)
    results: list[str] = [""] * len(prompts)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    generate = functools.partial(generate_with_virtual_tokens, model) if prompt_learning_type(model) else \
        model.generate
    try:
        with evaluating(model):
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                enc = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True,
                                add_special_tokens=add_special_tokens).to(device)
                out = generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                               **sampling)
                texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                for i, text in zip(chunk, texts):
                    results[i] = cut_at_stop(text, stop) if stop else text.strip()
    finally:
        tokenizer.padding_side = side
    return results


def cut_at_stop(text: str, stop: list[str]) -> str:
    """`text` up to (not including) the earliest stop sequence, trailing whitespace removed."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut].rstrip()

"""`tuneforge chat` (interactive) and `tuneforge generate` (one prompt) on a run or a base model."""

from __future__ import annotations

import sys

from tuneforge.eval.generation import generate_replies
from tuneforge.model.trained import load_for_inference


def generate_once(model_or_run: str, prompt: str, system: str | None, max_new_tokens: int, temperature: float) -> str:
    model, tokenizer = load_for_inference(model_or_run)
    conversation = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return generate_replies(model, tokenizer, [conversation], max_new_tokens=max_new_tokens, temperature=temperature)[0]


def chat_loop(model_or_run: str, system: str | None, max_new_tokens: int, temperature: float) -> None:
    model, tokenizer = load_for_inference(model_or_run)
    history = [{"role": "system", "content": system}] if system else []
    print(f"chatting with {model_or_run} — empty line or Ctrl-D to quit, /reset to clear the history", file=sys.stderr)
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        if text == "/reset":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": text})
        reply = generate_replies(model, tokenizer, [history], max_new_tokens=max_new_tokens, temperature=temperature)[0]
        history.append({"role": "assistant", "content": reply})
        print(f"model> {reply}", flush=True)

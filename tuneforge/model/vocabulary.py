"""`added_tokens`: special tokens a run adds to its tokenizer (format or tool-call markers), and the embedding rows
that hold them.

The rows must survive everything after training, which is where other tools lose them: the run's tokenizer keeps
the tokens, LoRA-type runs train and save the rows (PEFT's trainable tokens, in the adapter file, input and
output rows alike, one row for both where the embeddings are tied), and whatever loads the run back grows its
base the same way before the adapter goes on, so merge, GGUF export, eval and serve see the trained rows.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("tuneforge")


def add_tokens(tokenizer, tokens: list[str]) -> list[int]:
    """Add `tokens` as special tokens (never split, never merged with neighbours); their ids, in order."""
    if not tokens:
        return []
    known = [t for t in tokens if t in tokenizer.get_vocab()]
    if known:
        log.info("added_tokens: %s already in the tokenizer; their rows train all the same", ", ".join(known))
    tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(list(tokens))


def grow_embeddings(model: torch.nn.Module, tokenizer, fresh: bool) -> None:
    """Give `model` a row for every token of `tokenizer`. `fresh` (training): new rows start at the mean of the
    others (transformers' mean resizing), a neutral start; loading a run: the rows' values come from the run."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=fresh)


def trainable_token_modules(model: torch.nn.Module, token_ids: list[int]) -> dict[str, list[int]]:
    """PEFT trainable_token_indices for the added rows: the input embedding, and the output head unless it is the
    same matrix (tied; PEFT's ensure_weight_tying then keeps one row for both)."""
    names = {id(module): name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    modules = {names[id(inputs)]: list(token_ids)}
    if outputs is not None and outputs.weight is not inputs.weight:
        modules[names[id(outputs)]] = list(token_ids)
    return modules


def ties_embeddings(model: torch.nn.Module) -> bool:
    outputs = model.get_output_embeddings()
    return outputs is not None and outputs.weight is model.get_input_embeddings().weight

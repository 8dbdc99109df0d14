"""The forgetting check: perplexity of the base and the tuned model on general text, side by side.

A fine-tune that teaches one task can cost general ability (catastrophic forgetting); its first visible sign is that
the tuned model finds ordinary text less likely than its base did. Any file `tuneforge.eval.perplexity` reads works:
plain .txt (paragraphs), or instruction/chat/completion rows (answer tokens scored, as in validation loss), or
`builtin:general`, the general instruction set that ships with tuneforge (the one data mixing uses).
"""

from __future__ import annotations

from tuneforge.eval.perplexity import Perplexity, answer_perplexity, load_text_or_rows
from tuneforge.eval.settings import GENERATION


def general_perplexity(model, tokenizer, path: str, max_rows: int | None = None,
                       batch_size: int = GENERATION.batch_size,
                       max_length: int | None = None) -> Perplexity:
    """Perplexity of one loaded model on a general text file (its first `max_rows` rows when given)."""
    from tuneforge.config import BUILTIN_DATA

    rows = load_text_or_rows(str(BUILTIN_DATA.get(path, path)))
    return answer_perplexity(model, tokenizer, rows[:max_rows] if max_rows else rows, batch_size, max_length)


def forgetting_scores(base: Perplexity, tuned: Perplexity) -> dict[str, float]:
    """Both perplexities and the relative change (+0.10: the tuned model finds general text 10% less likely)."""
    return {"general_perplexity_base": base.perplexity, "general_perplexity_tuned": tuned.perplexity,
            "general_perplexity_change": tuned.perplexity / base.perplexity - 1.0}


def forgetting_check(tuned, base, path: str, max_rows: int | None = None,
                     batch_size: int = GENERATION.batch_size) -> dict[str, float]:
    """`forgetting_scores` for two models, each a loaded (model, tokenizer) pair or anything `load_for_inference`
    takes (run directory, alias, hub id, model directory). Loaded one at a time, so peak memory is one model."""
    results = []
    for which in (base, tuned):
        if isinstance(which, (tuple, list)):
            model, tokenizer = which
            results.append(general_perplexity(model, tokenizer, path, max_rows, batch_size))
            continue
        from tuneforge.model.trained import load_for_inference

        model, tokenizer = load_for_inference(str(which))
        results.append(general_perplexity(model, tokenizer, path, max_rows, batch_size))
        del model
    return forgetting_scores(*results)

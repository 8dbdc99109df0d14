"""Label masking per format and per turn, the end-of-turn token, and the truncation policy."""

from __future__ import annotations

from tuneforge.data.formats import Example, normalise_row
from tuneforge.data.tokenize import (
    PLAIN_CHAT_TEMPLATE,
    fit_to_length,
    render_prompt,
    tokenize_all,
    tokenize_example,
)


def target_text(tokenizer, tokenized) -> list[str]:
    """Decoded runs of consecutive target tokens."""
    runs, current = [], []
    for token, is_target in zip(tokenized.input_ids, tokenized.target):
        if is_target:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_instruction_row_trains_only_the_answer_through_end_of_turn(tokenizer):
    ex = normalise_row({"instruction": "Add", "input": "2 and 3", "output": "5"}, "instruction", "f:1")
    tok = tokenize_example(tokenizer, ex)
    assert target_text(tokenizer, tok) == ["5<|im_end|>"]
    # The tokens are exactly the template's rendering of the conversation.
    full = tokenizer.apply_chat_template(list(ex.messages), tokenize=False)
    assert tokenizer.decode(tok.input_ids) == full
    # The prompt part is what inference would feed: render with the generation prompt.
    prompt = render_prompt(tokenizer, ex.messages[:-1])
    assert full.startswith(prompt)
    assert ex.messages[0] == {"role": "user", "content": "Add\n\n2 and 3"}


def test_every_assistant_turn_is_a_target_in_multi_turn_chat(tokenizer):
    row = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]}
    tok = tokenize_example(tokenizer, normalise_row(row, "chat", "f:1"))
    assert target_text(tokenizer, tok) == ["Hello!<|im_end|>", "Paris.<|im_end|>"]


def test_sharegpt_maps_onto_chat(tokenizer):
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]}
    ex = normalise_row(row, "sharegpt", "f:1")
    assert ex.messages == ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"})
    assert target_text(tokenizer, tokenize_example(tokenizer, ex)) == ["Hey<|im_end|>"]


def test_completion_trains_on_all_text_and_eos(tokenizer):
    tok = tokenize_example(tokenizer, Example(source="f:1", text="The sky is blue."))
    assert tok.target[0] is False and all(tok.target[1:])
    assert tok.input_ids[-1] == tokenizer.eos_token_id


def test_train_on_prompt_targets_everything(tokenizer):
    ex = normalise_row({"instruction": "Say hi", "output": "hi"}, "instruction", "f:1")
    tok = tokenize_example(tokenizer, ex, train_on_prompt=True)
    assert tok.target[0] is False and all(tok.target[1:])


def test_plain_template_for_tokenizers_without_one(tokenizer):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = PLAIN_CHAT_TEMPLATE
    ex = normalise_row({"instruction": "Q", "output": "A"}, "instruction", "f:1")
    tok = tokenize_example(plain, ex)
    assert target_text(plain, tok) == ["A<|im_end|>"]


def _long_example(tokenizer, prompt_words: int, answer_words: int):
    row = {"instruction": " ".join(f"word{i}" for i in range(prompt_words)),
           "output": " ".join(f"ans{i}" for i in range(answer_words))}
    return tokenize_example(tokenizer, normalise_row(row, "instruction", "f:7"))


def test_truncation_cuts_the_prompt_middle_and_keeps_the_answer(tokenizer):
    tok = _long_example(tokenizer, 200, 10)
    answer = target_text(tokenizer, tok)
    fitted = fit_to_length(tok, 64, "truncate")
    assert len(fitted.input_ids) == 64
    assert target_text(tokenizer, fitted) == answer  # the whole answer survives
    # The template's header (system turn) and the generation prompt survive; the middle of the question does not.
    text = tokenizer.decode(fitted.input_ids)
    assert text.startswith("<|im_start|>system") and "<|im_start|>assistant\n" in text
    assert "word100" not in text


def test_answer_too_long_is_dropped_and_drop_policy(tokenizer):
    assert fit_to_length(_long_example(tokenizer, 5, 200), 64, "truncate") is None
    assert fit_to_length(_long_example(tokenizer, 200, 5), 64, "drop") is None


def test_tokenize_all_reports_counts(tokenizer):
    examples = [
        normalise_row({"instruction": "short", "output": "ok"}, "instruction", "f:1"),
        normalise_row({"instruction": "x " * 300, "output": "ok"}, "instruction", "f:2"),
        normalise_row({"instruction": "y", "output": "z " * 300}, "instruction", "f:3"),
    ]
    kept, report = tokenize_all(tokenizer, examples, 64, "truncate", False)
    assert len(kept) == 2 and report.truncated == 1 and report.dropped == 1
    assert report.dropped_sources == ["f:3"]

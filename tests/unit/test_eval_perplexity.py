"""Perplexity on answer tokens agrees with validation loss and with transformers' own masked-label loss."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import write_jsonl
from tuneforge.data.formats import Example, load_examples
from tuneforge.data.tokenize import tokenize_all
from tuneforge.errors import DataError
from tuneforge.eval.perplexity import answer_perplexity, load_text_or_rows
from tuneforge.model.attention import PACKED_ATTENTION, use_packed_attention
from tuneforge.train.validate import validation_loss

ROWS = [
    {"instruction": "Extract the city.", "input": "Ana moved to Lisbon last May.", "output": "Lisbon"},
    {"instruction": "Say hello in French.", "output": "Bonjour !"},
    {"instruction": "Count to five.", "output": "one, two, three, four, five"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there."},
                  {"role": "user", "content": "bye"}, {"role": "assistant", "content": "Goodbye, take care."}]},
]


def examples(tmp_path, rows):
    return load_examples(str(write_jsonl(tmp_path / "rows.jsonl", rows)))


def hf_masked_loss(model, tokenizer, exs) -> float:
    """transformers' own causal-LM loss with non-answer labels set to -100, token-weighted over examples."""
    tokenized, _ = tokenize_all(tokenizer, exs, 1024, "truncate", train_on_prompt=False)
    total, count = 0.0, 0
    for ex in tokenized:
        ids = torch.tensor([ex.input_ids])
        labels = torch.tensor([[t if is_target else -100 for t, is_target in zip(ex.input_ids, ex.target)]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss
        n = sum(ex.target[1:])
        total, count = total + float(loss) * n, count + n
    return total / count


def test_answer_perplexity_matches_transformers_loss_and_validation_loss(tiny_model, tokenizer, tmp_path):
    instruction = examples(tmp_path, ROWS[:3])
    result = answer_perplexity(tiny_model, tokenizer, instruction, batch_size=2)
    assert result.loss == pytest.approx(hf_masked_loss(tiny_model, tokenizer, instruction), rel=1e-5)
    tokenized, _ = tokenize_all(tokenizer, instruction, 1024, "truncate", train_on_prompt=False)
    packed_val = validation_loss(tiny_model, tokenized, 2, packing=False, pad_id=tokenizer.pad_token_id, device="cpu")
    assert result.loss == pytest.approx(packed_val, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss))
    assert result.tokens == sum(ex.num_targets for ex in tokenized) and result.examples == 3


def test_chat_rows_score_every_assistant_turn(tiny_model, tokenizer, tmp_path):
    chat = examples(tmp_path, ROWS[3:])
    result = answer_perplexity(tiny_model, tokenizer, chat)
    assert result.loss == pytest.approx(hf_masked_loss(tiny_model, tokenizer, chat), rel=1e-5)


def test_completion_rows_score_the_whole_text(tiny_model, tokenizer):
    text = "The river runs through the valley and into the sea."
    result = answer_perplexity(tiny_model, tokenizer, [Example(source="t:1", text=text)])
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        expected = tiny_model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert result.tokens == len(ids) - 1
    assert result.loss == pytest.approx(float(expected), rel=1e-5)


def test_batch_size_does_not_change_the_result(tiny_model, tokenizer, tmp_path):
    instruction = examples(tmp_path, ROWS[:3])
    one = answer_perplexity(tiny_model, tokenizer, instruction, batch_size=1).loss
    assert answer_perplexity(tiny_model, tokenizer, instruction, batch_size=3).loss == pytest.approx(one, rel=1e-5)


def test_a_model_mid_training_with_packed_attention_is_scored_correctly_and_restored(tiny_model, tokenizer, tmp_path):
    instruction = examples(tmp_path, ROWS[:3])
    expected = answer_perplexity(tiny_model, tokenizer, instruction, batch_size=3).loss
    use_packed_attention(tiny_model)
    tiny_model.train()
    assert answer_perplexity(tiny_model, tokenizer, instruction, batch_size=3).loss == pytest.approx(expected, rel=1e-5)
    assert tiny_model.config._attn_implementation == PACKED_ATTENTION and tiny_model.training


def test_plain_text_files_become_completion_rows(tmp_path):
    path = tmp_path / "general.txt"
    path.write_text("First paragraph.\n\nSecond one.\n\n\n", encoding="utf-8")
    rows = load_text_or_rows(str(path))
    assert [r.text for r in rows] == ["First paragraph.\n\nSecond one."]
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty.txt: no text"):
        load_text_or_rows(str(tmp_path / "empty.txt"))


def test_forgetting_check_compares_base_and_tuned_on_general_text(tiny_model, tiny_model_dir, tokenizer):
    from tests.conftest import ROOT
    from tuneforge.eval.forgetting import forgetting_check, general_perplexity

    general = str(ROOT / "tests" / "fixtures" / "eval" / "general.txt")
    base = general_perplexity(tiny_model, tokenizer, general)
    assert base.perplexity == pytest.approx(answer_perplexity(tiny_model, tokenizer, load_text_or_rows(general))
                                            .perplexity)
    from transformers import LlamaForCausalLM

    tuned = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        tuned.get_output_embeddings().weight.mul_(3)  # sharper, wrong predictions: general text gets less likely
    scores = forgetting_check((tuned, tokenizer), str(tiny_model_dir), general)  # a loaded pair, and a path
    assert scores["general_perplexity_base"] == pytest.approx(base.perplexity)
    assert scores["general_perplexity_tuned"] > scores["general_perplexity_base"]
    assert scores["general_perplexity_change"] == pytest.approx(
        scores["general_perplexity_tuned"] / scores["general_perplexity_base"] - 1)


def test_forgetting_check_reads_the_bundled_general_set(tiny_model, tokenizer):
    from tuneforge.config import BUILTIN_DATA
    from tuneforge.eval.forgetting import general_perplexity

    bundled = general_perplexity(tiny_model, tokenizer, "builtin:general", max_rows=4)
    direct = answer_perplexity(tiny_model, tokenizer, load_examples(str(BUILTIN_DATA["builtin:general"]))[:4])
    assert bundled.examples == 4 and bundled.loss == pytest.approx(direct.loss)

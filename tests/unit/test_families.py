"""Every model family's training loss and gradients equal transformers' own forward (eager attention, `labels`, each
example alone), for tuneforge's packed rows with the chunked head and for its padded batches.

Three examples of 6, 13 and 21 tokens: two are longer than the tiny families' sliding window (tests/families.py), so
the window shapes attention; Gemma 2's two softcaps and Gemma 3's final softcap bend the logits. The second test
shows those features change the loss by far more than the tolerance: an implementation that ignored one would fail.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.families import FAMILIES, WINDOW, tiny_model
from tuneforge.data.batching import collate_packed, collate_padded
from tuneforge.data.tokenize import TokenizedExample
from tuneforge.model.attention import attention_paths, use_packed_attention, use_standard_attention
from tuneforge.train.forward import batch_loss_sum

VOCAB = 512
TOLERANCE = 1e-5


def examples() -> list[TokenizedExample]:
    generator = torch.Generator().manual_seed(3)
    made = []
    for length, prompt in ((6, 3), (13, 5), (21, 9)):
        ids = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        made.append(TokenizedExample(ids, [False] * prompt + [True] * (length - prompt), source="test"))
    assert max(len(e.input_ids) for e in made) > 2 * WINDOW
    return made


def transformers_loss_sum(model, rows: list[TokenizedExample]) -> torch.Tensor:
    """Transformers' own loss: each example alone through the model's forward with labels (mean x count = sum)."""
    total = torch.zeros(())
    for row in rows:
        ids = torch.tensor([row.input_ids])
        labels = torch.where(torch.tensor([row.target]), ids, torch.full_like(ids, -100))
        total = total + model(input_ids=ids, labels=labels, use_cache=False).loss * row.num_targets
    return total


def loss_and_grads(model, loss_of) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    rows = examples()
    loss = loss_of(model, rows) / sum(r.num_targets for r in rows)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def packed_loss_sum(model, rows):
    return batch_loss_sum(model, collate_packed(rows))


def padded_loss_sum(model, rows):
    return batch_loss_sum(model, collate_padded(rows, pad_id=0))


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_training_loss_and_gradients_equal_transformers_eager(family, layout):
    model = tiny_model(family, VOCAB)
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    ref_loss, ref_grads = loss_and_grads(reference, transformers_loss_sum)
    if layout == "packed":
        use_packed_attention(model)
    else:
        use_standard_attention(model)
    print(attention_paths(model.config, packed=layout == "packed"))
    loss, grads = loss_and_grads(model, packed_loss_sum if layout == "packed" else padded_loss_sum)
    assert abs(loss - ref_loss) < TOLERANCE, (loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    worst = max((grads[n] - ref_grads[n]).abs().max().item() for n in grads)
    assert worst < TOLERANCE, worst


def all_full(family):
    return {"layer_types": ["full_attention"] * tiny_model(family, VOCAB).config.num_hidden_layers}


# Each feature, and the config change that switches it off.
FEATURES = {
    ("mistral", "sliding window"): {"sliding_window": None},
    ("phi3", "sliding window"): {"sliding_window": None},
    ("qwen2", "sliding window"): "all_full",
    ("qwen3", "sliding window"): "all_full",
    ("gemma2", "sliding window"): "all_full",
    ("gemma3", "sliding window"): "all_full",
    ("gemma2", "attention softcap"): {"attn_logit_softcapping": None},
    ("gemma2", "final softcap"): {"final_logit_softcapping": None},
    ("gemma3", "final softcap"): {"final_logit_softcapping": None},
    ("llama", "llama3 rope scaling"): {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
}


@pytest.mark.parametrize("family, feature", list(FEATURES), ids=[f"{f}-{k}" for f, k in FEATURES])
def test_each_family_feature_changes_the_loss(family, feature):
    changes = FEATURES[family, feature]
    with_it = tiny_model(family, VOCAB)
    without = tiny_model(family, VOCAB, **(all_full(family) if changes == "all_full" else changes))
    without.load_state_dict(with_it.state_dict())
    for model in (with_it, without):
        model.set_attn_implementation("eager")
    with torch.no_grad():
        change = abs(transformers_loss_sum(with_it, examples()) - transformers_loss_sum(without, examples())).item()
    assert change > 1000 * TOLERANCE, change


def test_attention_paths_name_what_runs():
    gemma2 = tiny_model("gemma2", VOCAB).config
    line = attention_paths(gemma2, packed=True)
    assert f"sliding window {WINDOW} on 1/2 layers" in line
    assert "softcap 2 (eager per example" in line and "final logit softcap 3" in line
    assert attention_paths(gemma2, packed=False).startswith("attention: padded (eager)")
    assert attention_paths(tiny_model("llama", VOCAB).config, packed=True) == "attention: packed (per-example SDPA)"


def test_the_run_log_names_the_family_and_its_attention_path(tmp_path, tokenizer, caplog):
    import logging

    from tests.conftest import write_jsonl
    from tuneforge.config import load_config
    from tuneforge.train.loop import train

    model_dir = tmp_path / "gemma2"
    tiny_model("gemma2", len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "Say hi.", "output": "hi"}] * 4)
    with caplog.at_level(logging.INFO, logger="tuneforge"):
        train(load_config(None, [f"model={model_dir}", f"data.train={data}", f"output_dir={tmp_path / 'run'}",
                                 "train.max_steps=1", "data.val_split=0"]), show_progress=False)
    lines = [r.getMessage() for r in caplog.records]
    assert "model family: Gemma 2 (gemma2)" in lines
    assert any(line.startswith("attention: packed") and "softcap 2" in line for line in lines)


def test_a_family_outside_the_list_is_tried_and_logged_as_untested():
    from transformers import GPT2Config

    from tuneforge.model.families import family_line

    line = family_line(GPT2Config())
    assert "'gpt2' is untested" in line and "training goes ahead" in line

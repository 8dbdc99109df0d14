"""End to end on the embedded default (SmolLM2-135M-Instruct): a short LoRA run (the session's shared `demo_run`,
tests/conftest.py) teaches the demo task's answer format.

Held-out exact match goes from near 0 (untuned) to high, and the adapter on disk loads with plain PEFT and gives the
same logits as tuneforge's in-memory model.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import EMBEDDED, ROOT, write_jsonl
from tuneforge.eval.compare import evaluate_model, prompts_and_references

pytestmark = pytest.mark.e2e

TEST = ROOT / "examples" / "demo" / "test.jsonl"


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    rows = [json.loads(line) for line in TEST.read_text().splitlines()][:20]
    path = write_jsonl(tmp_path_factory.mktemp("held") / "test.jsonl", rows)
    return prompts_and_references(str(path))


def test_lora_raises_held_out_exact_match(demo_run, held_out):
    prompts, references = held_out
    base = evaluate_model(EMBEDDED, prompts, references, max_new_tokens=24, batch_size=10)
    tuned = evaluate_model(str(demo_run.run_dir), prompts, references, max_new_tokens=24, batch_size=10)
    print(f"held-out exact match: base {base.scores['exact_match']:.2f} -> tuned {tuned.scores['exact_match']:.2f}")
    assert base.scores["exact_match"] <= 0.1
    assert tuned.scores["exact_match"] >= 0.7


def test_adapter_loads_with_plain_peft_and_matches(demo_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    meta = json.loads((demo_run.run_dir / "tuneforge.json").read_text())
    assert meta["method"] == "lora" and meta["base_model"] == EMBEDDED
    adapter_cfg = json.loads((demo_run.run_dir / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(adapter_cfg["base_model_name_or_path"], dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, demo_run.run_dir).eval()
    ids = torch.tensor([[1, 4093, 198, 19556, 260, 1345, 30, 2, 198, 1, 520, 9531, 198]])
    with torch.no_grad():
        diff = (plain(input_ids=ids).logits - demo_run.model(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-4

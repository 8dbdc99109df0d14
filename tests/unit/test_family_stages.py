"""Every model family through the stages after training: `all-linear` LoRA finds every projection (Phi-3's fused
qkv_proj and gate_up_proj included), the adapter tuneforge saves reloads with plain PEFT to the trained model's
logits, and `merge` equals the adapter on its base.

Each family is a tiny random model (tests/families.py) with the embedded tokenizer, trained by tuneforge's own loop
for three packed steps whose rows are longer than the sliding window.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import write_jsonl
from tests.families import FAMILIES, tiny_model
from tuneforge.config import load_config
from tuneforge.train.loop import train

IDS = torch.tensor([[1, 520, 9531, 198, 42, 2, 198, 1, 4093, 77, 310, 5021, 61, 198, 905, 12]])


def rows(n=12):
    return [{"instruction": f"Count from {i} to {i + 6} in words, then stop.", "output": " ".join(
        ["one", "two", "three", "four", "five", "six", "seven"][: 3 + i % 4])} for i in range(n)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("family-data") / "train.jsonl", rows())


@pytest.fixture(scope="module", params=FAMILIES)
def family_run(request, tokenizer, data_file, tmp_path_factory):
    family = request.param
    folder = tmp_path_factory.mktemp(f"family-{family}")
    tiny_model(family, len(tokenizer)).save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    result = train(load_config(None, [f"model={folder / 'base'}", f"data.train={data_file}",
                                      f"output_dir={folder / 'run'}", "method=lora", "lora.dropout=0",
                                      "lora.r=4", "train.batch_size=4", "train.max_steps=3", "train.lr=1e-2",
                                      "train.warmup_ratio=0", "train.save_every=0", "data.val_split=0"]),
                   show_progress=False)
    return family, folder / "base", result


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def test_all_linear_lora_targets_every_projection(family_run):
    import json

    family, base_dir, result = family_run
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    layer = base.get_decoder().layers[0]
    projections = {name.rsplit(".", 1)[-1] for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    if family == "phi3":
        assert projections == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    else:
        assert projections == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    saved = json.loads((result.run_dir / "adapter_config.json").read_text())["target_modules"]
    targeted = {name.rsplit(".", 1)[-1] for name in saved}  # PEFT saves all-linear as the modules it found
    assert targeted == projections
    wrapped = {name.rsplit(".", 1)[-1] for name, m in result.model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == projections


def test_adapter_reloads_with_plain_peft_and_merge_equals_it(family_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneforge.deploy.merge import merge_run

    _, base_dir, result = family_run
    trained = logits(result.model)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                      result.run_dir)
    on_base = logits(plain)
    assert (on_base - trained).abs().max().item() < 1e-5
    untouched = logits(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32))
    assert (untouched - on_base).abs().max().item() > 1e-3  # the adapter learned something, so the checks bite
    merged_dir = merge_run(result.run_dir, tmp_path / "merged")
    merged = logits(AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32))
    assert (merged - on_base).abs().max().item() < 1e-4


# The tiny Gemmas scale queries by query_pre_attn_scalar 24, not their head size 16 (and Gemma 3's has 2 local : 1
# global layers and a final softcap): llama.cpp would run other models. Exports that it runs as trained:
# test_export_gguf.py::test_other_llama_family_architectures.
@pytest.mark.parametrize("family, reason", [
    ("gemma2", r"query_pre_attn_scalar 24 \(llama.cpp uses 16\)"),
    ("gemma3", r"query_pre_attn_scalar 24 \(llama.cpp uses 16\); layer_types other than 5 sliding : 1 full.*; "
               r"final_logit_softcapping 3.0")])
def test_gguf_export_llama_cpp_would_run_differently_is_one_line_and_writes_nothing(family, reason, tokenizer,
                                                                                   tmp_path):
    from tuneforge.deploy.gguf_export import export_gguf
    from tuneforge.errors import UserError

    source = tmp_path / "model"
    tiny_model(family, len(tokenizer)).save_pretrained(source)
    tokenizer.save_pretrained(source)
    with pytest.raises(UserError, match=f"cannot run in llama.cpp as trained: {reason}") as err:
        export_gguf(str(source), tmp_path / "out.gguf", "f32")
    assert "\n" not in str(err.value) and "tuneforge merge" in str(err.value)
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".*.gguf*"))


def test_serve_answers_with_the_adapter_as_load_for_inference_greedy_does(family_run):
    from fastapi.testclient import TestClient

    from tests.unit.test_serve import AUTH, KEY, Reference, chat_body
    from tuneforge.deploy.server import ServeSettings, build_app, load_server

    _, base_dir, result = family_run
    settings = ServeSettings(api_key=KEY, max_tokens_limit=16, max_model_len=128, max_concurrent=2, max_batch=2)
    served = load_server(str(base_dir), [("tuned", str(result.run_dir))], settings)
    try:
        with TestClient(build_app(served)) as client:
            reply = client.post("/v1/chat/completions", headers=AUTH, json=chat_body("tuned", "Count to three.", 6))
    finally:
        served.engine.close()
    assert reply.status_code == 200, reply.text
    text, count = Reference().chat(str(result.run_dir), "Count to three.", 6)
    body = reply.json()
    assert body["choices"][0]["message"]["content"] == text and body["usage"]["completion_tokens"] == count


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_multimodal_gemma3_checkpoint_trains_its_language_model_only(method, tokenizer, data_file, tmp_path):
    """Gemma 3 4B-27B ship as Gemma3ForConditionalGeneration, with a SigLIP vision tower that text rows never run.
    `all-linear` LoRA must not put adapters on it (they would be saved and never learn), full fine-tuning must not
    count it as trained, and the planner's trainable count is the run's."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    from tuneforge.model.methods import count_parameters
    from tuneforge.plan.memory import MemorySpec, estimate_memory

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=tiny_model("gemma3", len(tokenizer)).config.to_dict(),
                          vision_config=vision.to_dict(), mm_tokens_per_image=4)
    torch.manual_seed(0)
    base = tmp_path / "base"
    Gemma3ForConditionalGeneration(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    result = train(load_config(None, [f"model={base}", f"data.train={data_file}", f"output_dir={tmp_path / 'run'}",
                                      f"method={method}", "lora.r=4", "train.batch_size=4", "train.max_steps=2",
                                      "train.save_every=0", "data.val_split=0"]), show_progress=False)
    trained = {name for name, p in result.model.named_parameters() if p.requires_grad}
    assert trained and not [name for name in trained if "vision_tower" in name or "multi_modal_projector" in name]
    if method == "lora":
        assert all("lora_" in name for name in trained)
        assert {name.split(".")[-4] for name in trained} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"}
    planned = estimate_memory(MemorySpec(model=str(base), method=method, lora_r=4, lora_alpha=16.0,
                                         example_lengths=(32,)))
    assert planned.trainable_params == count_parameters(result.model)[0]

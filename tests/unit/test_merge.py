"""`tuneforge merge`: merged weights compute what adapter-on-base computes; unmergeable methods are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import read_gguf, run_cli

IDS = torch.tensor([[1, 520, 9531, 198, 42, 2, 198, 1, 4093, 17, 305]])


def make_lora_run(base_dir: Path, out: Path, method: str = "lora", seed: int = 0, **lora) -> Path:
    """A run directory as `tuneforge train` writes it, with a random (non-zero) LoRA so outputs visibly change."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    settings = dict(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False,
                    use_dora=method == "dora")
    settings.update(lora)
    model = get_peft_model(base, LoraConfig(**settings))
    with torch.no_grad():  # scale the random B up so the adapter changes greedy answers, not just the 4th decimal
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(20)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    (out / "tuneforge.json").write_text(json.dumps({"base_model": str(base_dir), "method": method}))
    return out


def adapter_logits(base_dir: Path, run: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, run).eval()(input_ids=IDS).logits


def merged_logits(out: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(input_ids=IDS).logits


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_model_matches_adapter_on_base(tiny_model_dir, tmp_path, method):
    from transformers import AutoModelForCausalLM

    from tuneforge.deploy.merge import merge_run

    run = make_lora_run(tiny_model_dir, tmp_path / "run", method)
    out = merge_run(run, tmp_path / "merged")
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "chat_template.jinja", "tuneforge.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("adapter_*"))  # a plain model: no PEFT needed to load it
    expected = adapter_logits(tiny_model_dir, run)
    assert (merged_logits(out) - expected).abs().max() < 1e-4
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)(input_ids=IDS).logits
    assert (base - expected).abs().max() > 1e-2  # the adapter really changed the model, so the merge was tested
    meta = json.loads((out / "tuneforge.json").read_text())
    assert meta["method"] == "full" and meta["merged_method"] == method


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_qlora_merges_into_the_dequantized_base(tiny_model_dir, tmp_path, quant_type, double_quant):
    from tuneforge.deploy.merge import merge_run
    from tuneforge.model.trained import load_for_inference

    run = make_lora_run(tiny_model_dir, tmp_path / "run", "qlora")
    (run / "config.yaml").write_text(f"qlora:\n  quant_type: {quant_type}\n  double_quant: {str(double_quant).lower()}\n")
    out = merge_run(run, tmp_path / "merged")
    merged = merged_logits(out)
    # Exact fold: the adapter on the 4-bit base's dequantized weights (bitsandbytes' own dequantize_4bit).
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Linear4bit
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trained, _ = load_for_inference(str(run))  # the adapter on the real 4-bit base, as training saw it
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    targets = dict(base.named_modules())
    quantized_layers = [(name.removesuffix(".base_layer"), m) for name, m in trained.get_base_model().named_modules()
                        if isinstance(m, Linear4bit)]  # PEFT wraps each one: q_proj.base_layer is the 4-bit layer
    assert len(quantized_layers) == 2 * 7  # every linear layer but the output head
    with torch.no_grad():
        for name, module in quantized_layers:
            targets[name].weight.data = dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        on_dequantized = PeftModel.from_pretrained(base, run).eval()(input_ids=IDS).logits
        runtime = trained(input_ids=IDS).logits.float()
    assert (merged - on_dequantized).abs().max() < 1e-4
    # bitsandbytes' 4-bit CPU matmul rounds on its own (about 1e-3 relative per layer), so against the 4-bit runtime
    # the merge is close, and far closer than a merge into the original full-precision weights would be.
    to_runtime = (merged - runtime).abs().max()
    assert to_runtime < 5e-3 and to_runtime < 0.2 * (adapter_logits(tiny_model_dir, run) - runtime).abs().max()
    # ...and not into the original full-precision weights, which the adapter never saw in training.
    assert (merged - adapter_logits(tiny_model_dir, run)).abs().max() > 1e-3


def test_merge_dtype_bfloat16(tiny_model_dir, tmp_path):
    from safetensors import safe_open

    from tuneforge.deploy.merge import merge_run

    out = merge_run(make_lora_run(tiny_model_dir, tmp_path / "run"), tmp_path / "merged", dtype="bfloat16")
    with safe_open(out / "model.safetensors", "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.bfloat16}


@pytest.mark.parametrize("method", ["adapter", "prefix", "prompt", "full"])
def test_unmergeable_methods_are_refused_in_one_line(tiny_model_dir, tmp_path, method):
    run = tmp_path / "run"
    run.mkdir()
    (run / "tuneforge.json").write_text(json.dumps({"base_model": str(tiny_model_dir), "method": method}))
    result = run_cli("merge", str(run), "-o", str(tmp_path / "merged"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("tuneforge: error: ") and f"'{method}'" in result.stderr
    assert not (tmp_path / "merged").exists()


def test_merge_cli_refuses_non_runs_and_existing_outputs(tiny_model_dir, tmp_path):
    result = run_cli("merge", str(tiny_model_dir), "-o", str(tmp_path / "merged"))
    assert result.returncode == 2 and "tuneforge.json" in result.stderr
    run = make_lora_run(tiny_model_dir, tmp_path / "run")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    result = run_cli("merge", str(run), "-o", str(taken))
    assert result.returncode == 2 and "already exists" in result.stderr
    assert (taken / "keep.txt").read_text() == "mine"
    result = run_cli("merge", str(run), "-o", str(tmp_path / "merged"), "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def base_stopping_at_1(tiny_model_dir, tmp_path) -> Path:
    import shutil

    from transformers import GenerationConfig

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    config = GenerationConfig.from_pretrained(base)
    config.eos_token_id = 1
    config.save_pretrained(base)
    return base


def test_full_fine_tuning_saves_the_end_of_turn_id(tiny_model_dir, tmp_path):
    from transformers import GenerationConfig

    from tests.conftest import write_jsonl
    from tuneforge.config import load_config
    from tuneforge.train.loop import train

    data = write_jsonl(tmp_path / "rows.jsonl", [{"instruction": f"Say {i}.", "output": str(i)} for i in range(4)])
    run = train(load_config(None, [f"model={base_stopping_at_1(tiny_model_dir, tmp_path)}", "method=full",
                                   f"data.train={data}", f"output_dir={tmp_path / 'run'}", "train.max_steps=1"]),
                show_progress=False).run_dir
    assert GenerationConfig.from_pretrained(run).eos_token_id == [1, 2]


def test_merge_keeps_the_end_of_turn_id_for_every_runtime(tiny_model_dir, tmp_path):
    """A base whose generation_config names only its own end-of-text id (1 here, as Llama 3's names
    <|end_of_text|>) while training ended every answer with the tokenizer's end of turn (<|im_end|>, id 2): the
    merged model's generation_config stops at both (transformers, vLLM), and its GGUF names 2 as end of turn."""
    from transformers import GenerationConfig

    from tuneforge.deploy.gguf_export import export_gguf
    from tuneforge.deploy.merge import merge_run

    base = base_stopping_at_1(tiny_model_dir, tmp_path)
    out = merge_run(make_lora_run(base, tmp_path / "run"), tmp_path / "merged")
    assert GenerationConfig.from_pretrained(out).eos_token_id == [1, 2]
    gguf_file = export_gguf(str(out), tmp_path / "m.gguf", "f32")
    field = read_gguf(gguf_file).fields["tokenizer.ggml.eot_token_id"]
    assert int(field.parts[field.data[0]][0]) == 2


def test_merge_to_float16_refuses_weights_it_would_write_as_inf(tiny_model_dir, tmp_path):
    from safetensors import safe_open

    from tuneforge.deploy.merge import merge_run
    from tuneforge.errors import UserError

    out = merge_run(make_lora_run(tiny_model_dir, tmp_path / "run"), tmp_path / "merged", dtype="float16")
    with safe_open(out / "model.safetensors", "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.float16}
        assert all(torch.isfinite(fh.get_tensor(k)).all() for k in fh.keys())
    big = make_lora_run(tiny_model_dir, tmp_path / "big")
    from safetensors.torch import load_file, save_file

    weights = load_file(big / "adapter_model.safetensors")
    save_file({k: v * 1e6 if "lora_B" in k else v for k, v in weights.items()}, big / "adapter_model.safetensors")
    with pytest.raises(UserError, match=r"--dtype float16: .*proj.weight reaches \|.*\|, beyond float16's 65504"):
        merge_run(big, tmp_path / "big-merged", dtype="float16")
    assert not (tmp_path / "big-merged").exists()

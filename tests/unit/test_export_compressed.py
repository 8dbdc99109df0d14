"""`tuneforge export --format gptq|awq` on the tiny model: the files are what they claim (int4 groups of the chosen
size, read back by plain transformers and compressed-tensors, not by us), the quantizer really ran (GPTQ and AWQ
reconstruct the model's outputs on the calibration rows better than round-to-nearest of the same grid, computed
here independently), it calibrates on the run's own training rows by default, `tuneforge serve` and `tuneforge
eval` use the result, and bad requests are refused in one line with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from tests.conftest import run_cli
from tests.unit.test_merge import make_lora_run

ROWS = [{"instruction": "Extract the city.", "input": f"{name} moved to {city} in {year}.", "output": city}
        for name, city, year in [("Ana", "Lisbon", 2019), ("Bo", "Oslo", 2020), ("Cy", "Quito", 2021),
                                 ("Di", "Hanoi", 2018), ("Ed", "Accra", 2022), ("Fay", "Perth", 2017),
                                 ("Gus", "Lyon", 2016), ("Hal", "Cork", 2023)]]


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA run directory with the config.yaml `tuneforge train` leaves, naming its training file."""
    root = tmp_path_factory.mktemp("compressed")
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    run = make_lora_run(tiny_model_dir, root / "run")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": str(tiny_model_dir), "method": "lora",
                                                     "data": {"train": str(train)}}))
    return run


@pytest.fixture(scope="module")
def exports(lora_run, tmp_path_factory) -> dict[str, Path]:
    from tuneforge.deploy.compressed_export import export_compressed

    root = tmp_path_factory.mktemp("compressed-out")
    # float32 beside the quantized weights: the comparisons below then measure the quantizer, not bf16 rounding
    return {fmt: export_compressed(str(lora_run), root / fmt, fmt, dtype="float32") for fmt in ("gptq", "awq")}


def calibration_ids(tokenizer, run: Path) -> list[torch.Tensor]:
    """The run's training rows as the export renders them: the whole conversation, chat template included."""
    from tuneforge.data.formats import load_examples
    from tuneforge.data.tokenize import fit_to_template

    train = yaml.safe_load((run / "config.yaml").read_text())["data"]["train"]
    out = []
    for row in load_examples(train):
        text = tokenizer.apply_chat_template(fit_to_template(tokenizer, list(row.messages)), tokenize=False)
        out.append(torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]]))
    assert len(out) == len(ROWS)
    return out


def logits_on(model, batches: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=ids).logits[0] for ids in batches])


def round_to_nearest(model, group_size: int) -> None:
    """Each linear weight but the head replaced by plain round-to-nearest symmetric int4 of the same group grid
    (scale = the group's largest magnitude / 7.5, levels -8..7)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
                w = module.weight.reshape(module.out_features, -1, group_size)
                scale = w.abs().amax(-1, keepdim=True) / 7.5
                module.weight.copy_((torch.clamp(torch.round(w / scale), -8, 7) * scale).reshape_as(module.weight))


def merged(lora_run):
    from tuneforge.deploy.merge import merged_model

    return merged_model(lora_run)


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_the_export_is_int4_groups_that_plain_transformers_loads(exports, lora_run, fmt):
    from transformers import AutoModelForCausalLM

    out = exports[fmt]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert (weights["num_bits"], weights["group_size"], weights["strategy"]) == (4, 64, "group")
    assert weights["symmetric"] is True and config["ignore"] == ["lm_head"]

    source = merged(lora_run)
    linears = [name for name, m in source.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        for name in linears:
            assert f.get_tensor(f"{name}.weight_packed").dtype == torch.int32  # 8 values per int32: 4-bit
            scale = f.get_tensor(f"{name}.weight_scale")
            assert scale.shape == (source.get_submodule(name).out_features,
                                   source.get_submodule(name).in_features // 64)
    assert not any(key.endswith(".weight") and key.rsplit(".", 1)[0] in linears for key in keys)

    # Plain transformers (with compressed-tensors) decompresses the file: every group holds at most 16 levels
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    loaded(input_ids=torch.tensor([[1, 2, 3]]))  # compressed-tensors decompresses on the first forward
    for name in linears:
        w = loaded.get_submodule(name).weight.detach().reshape(-1, 64)
        levels = torch.tensor([len(torch.unique(group)) for group in w])
        assert levels.max() <= 16, name
    meta = json.loads((out / "tuneforge.json").read_text())
    assert meta["quantization"] == {"format": fmt, "bits": 4, "group_size": 64, "calibration":
                                    f"{lora_run}'s training data", "samples": len(ROWS), "dtype": "float32"}


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_the_quantizer_beats_round_to_nearest_on_its_calibration_rows(exports, lora_run, tokenizer, fmt):
    """GPTQ (error-compensating rounding) and AWQ (activation-aware scaling) each exist to do better than plain
    rounding to the same grid on the inputs they calibrated on; the export must show it."""
    from transformers import AutoModelForCausalLM

    batches = calibration_ids(tokenizer, lora_run)
    source = merged(lora_run)
    reference = logits_on(source, batches)
    round_to_nearest(source, 64)
    rtn_error = (logits_on(source, batches) - reference).pow(2).mean().item()
    loaded = AutoModelForCausalLM.from_pretrained(exports[fmt], dtype=torch.float32)
    error = (logits_on(loaded, batches) - reference).pow(2).mean().item()
    # measured: GPTQ 0.44 of round-to-nearest's error, AWQ 0.80
    assert error < {"gptq": 0.7, "awq": 0.9}[fmt] * rtn_error, (fmt, error, rtn_error)


def test_the_export_keeps_the_end_of_turn_and_serves_and_evaluates(exports, tokenizer, tmp_path):
    from fastapi.testclient import TestClient
    from transformers import AutoModelForCausalLM

    from tuneforge.deploy.server import ServeSettings, build_app, load_server

    out = exports["gptq"]
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert tokenizer.eos_token_id in (eos if isinstance(eos, list) else [eos])

    messages = [{"role": "user", "content": "Extract the city.\n\nIda moved to Riga in 2015."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        expected = plain.generate(**ids, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    expected_text = tokenizer.decode(expected[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    server = load_server(str(out), [], ServeSettings())
    with TestClient(build_app(server)) as client:
        reply = client.post("/v1/chat/completions", json={"model": str(out), "messages": messages,
                                                          "max_tokens": 8, "temperature": 0})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"].strip() == expected_text.strip() != ""

    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS[:3]))
    result = run_cli("eval", str(out), "--data", str(data), "--metrics", "exact_match,perplexity",
                     "--max-new-tokens", "8", "--out", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr
    scores = next(iter(json.loads((tmp_path / "eval" / "summary.json").read_text())["models"].values()))["scores"]
    assert "exact_match" in scores
    # Perplexity runs the decoder alone (the chunked head): on the export loaded decompressed it equals plain
    # transformers' whole forward of the compressed model, answer tokens only.
    from tuneforge.data.formats import load_examples
    from tuneforge.data.tokenize import tokenize_example

    losses = []
    for example in load_examples(str(data)):
        tokens = tokenize_example(tokenizer, example)
        with torch.no_grad():
            logits = plain(input_ids=torch.tensor([tokens.input_ids])).logits[0].float()
        at = [i - 1 for i, target in enumerate(tokens.target) if target]
        losses.append(torch.nn.functional.cross_entropy(logits[at], torch.tensor(tokens.input_ids)[[i + 1 for i in at]],
                                                        reduction="none"))
    expected_ppl = float(torch.exp(torch.cat(losses).mean()))
    assert abs(scores["perplexity"] - expected_ppl) < 1e-3 * expected_ppl, (scores["perplexity"], expected_ppl)


def test_group_size_divides_every_layer_or_is_refused():
    from tuneforge.deploy.compressed_export import choose_group_size
    from tuneforge.errors import UserError

    smollm2 = {"model.layers.0.self_attn.q_proj": 576, "model.layers.0.mlp.down_proj": 1536}
    assert choose_group_size(smollm2, None) == (64, "128 does not divide the 576-wide input of "
                                                    "model.layers.0.self_attn.q_proj")
    assert choose_group_size({"a": 4096, "b": 11008}, None)[0] == 128
    assert choose_group_size(smollm2, 32) == (32, "as requested")
    with pytest.raises(UserError, match="--group-size 128 does not divide the 576-wide input of model.layers.0."
                                        "self_attn.q_proj; sizes that divide every layer: 64, 32"):
        choose_group_size(smollm2, 128)
    with pytest.raises(UserError, match="no group size of 128, 64, 32 divides the 100-wide input of odd"):
        choose_group_size({"odd": 100}, None)


def test_bad_requests_are_refused_in_one_line_with_nothing_written(tiny_model_dir, lora_run, tmp_path):
    cases = [
        (["--format", "gptq", "--group-size", "128"], "--group-size 128 does not divide the 64-wide input"),
        (["--format", "awq", "--quant", "q4_k_m"], "--quant: not an option of --format awq"),
        (["--format", "gguf", "--bits", "4"], "--bits: not an option of --format gguf"),
        (["--format", "gptq", "--bits", "3"], "--bits: got 3, allowed for gptq: 4, 8"),
        (["--format", "gptq", "--calibration", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
    ]
    for options, message in cases:
        out = tmp_path / "out"
        result = run_cli("export", str(lora_run), *options, "-o", str(out))
        assert result.returncode == 2 and message in result.stderr, (options, result.stderr)
        assert result.stderr.strip().count("\n") == 0, result.stderr
        assert not out.exists() and not list(tmp_path.glob(".out.*"))
    result = run_cli("export", str(tiny_model_dir), "--format", "gptq", "-o", str(tmp_path / "plain"))
    assert result.returncode == 2 and "not a tuneforge run" in result.stderr and "--calibration" in result.stderr
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("mine")
    result = run_cli("export", str(lora_run), "--format", "gptq", "-o", str(taken))
    assert result.returncode == 2 and "already exists" in result.stderr
    assert (taken / "mine.txt").read_text() == "mine"

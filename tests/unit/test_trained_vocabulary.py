"""What other tools lose in the merge, kept: added special tokens with their trained rows (`added_tokens`) and
modules trained in full (`lora.modules_to_save`), on the tiny model whose input and output embeddings are tied.
Each is checked against plain PEFT on a plain transformers base (the reference), through `tuneforge merge` (the
merged directory read back by plain transformers) and into the GGUF file (read by gguf-py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.conftest import read_gguf, run_cli, write_jsonl
from tuneforge.config import load_config
from tuneforge.train.loop import train

TOKENS = ["<tool_call>", "</tool_call>"]


def tool_rows(n):
    return [{"instruction": f"Call the tool for {i % 5}.", "output": f"<tool_call>lookup({i % 5})</tool_call>"}
            for i in range(n)]


def run_with(tiny_model_dir, tmp_path, name, *extra):
    data = write_jsonl(tmp_path / "tools.jsonl", tool_rows(32))
    cfg = load_config(None, [f"model={tiny_model_dir}", f"data.train={data}", f"output_dir={tmp_path / name}",
                             "train.epochs=1", "train.batch_size=8", "train.lr=1e-2", "lora.dropout=0", *extra])
    return train(cfg, show_progress=False).run_dir


def reference_logits(tiny_model_dir, run, ids) -> torch.Tensor:
    """Plain PEFT on a plain transformers base grown to the run's tokenizer (new rows left at zero: every trained
    value must come from the adapter file)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base.resize_token_embeddings(len(AutoTokenizer.from_pretrained(run)), mean_resizing=False)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, run).eval()(input_ids=ids).logits


def merged_logits(merged_dir, ids) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def gguf_embeddings(path) -> np.ndarray:
    reader = read_gguf(path)
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return np.asarray(tensor.data).reshape(-1, tensor.shape[0]), [
        bytes(reader.fields["tokenizer.ggml.tokens"].parts[i]).decode()
        for i in reader.fields["tokenizer.ggml.tokens"].data]


def test_added_tokens_keep_their_trained_rows_through_merge_and_gguf(tiny_model_dir, tokenizer, tmp_path):
    from transformers import AutoTokenizer

    run = run_with(tiny_model_dir, tmp_path, "tools", f"added_tokens={json.dumps(TOKENS)}")
    run_tokenizer = AutoTokenizer.from_pretrained(run)
    ids = run_tokenizer.convert_tokens_to_ids(TOKENS)
    assert ids == [len(tokenizer), len(tokenizer) + 1]
    assert run_tokenizer("<tool_call>lookup(3)</tool_call>", add_special_tokens=False)["input_ids"][0] == ids[0]
    with safe_open(run / "adapter_model.safetensors", "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys() if "lora_" not in k}
    # the added rows only (no whole embedding matrices), once: the output head is tied to them
    assert list(saved) == ["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    [rows] = saved.values()
    assert rows.shape == (2, 64)

    prompt = torch.tensor([[1, 520, 9531, ids[0], 42, ids[1], 2]])
    expected = reference_logits(tiny_model_dir, run, prompt)
    result = run_cli("merge", str(run), "-o", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr
    assert (merged_logits(tmp_path / "merged", prompt) - expected).abs().max() < 1e-4
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        merged_embed = f.get_tensor("model.embed_tokens.weight")
    assert merged_embed.shape[0] == len(tokenizer) + 2
    assert torch.equal(merged_embed[ids], rows)  # the trained rows, not a fresh initialisation

    result = run_cli("export", str(run), "--quant", "f32", "-o", str(tmp_path / "tools.gguf"))
    assert result.returncode == 0, result.stderr
    embeddings, tokens = gguf_embeddings(tmp_path / "tools.gguf")
    assert [tokens[i] for i in ids] == TOKENS
    assert np.array_equal(embeddings[ids], rows.numpy())

    # A shared serving base has no rows for one adapter's tokens: refused in one line, pointing at merge
    from tuneforge.deploy.adapters import attach
    from tuneforge.errors import UserError
    from tuneforge.model.load import load_model

    with pytest.raises(UserError, match="adds 2 tokens to its base .*serve it merged"):
        attach(load_model(str(tiny_model_dir)), "tools", run)


def test_modules_to_save_on_tied_embeddings_survive_the_merge(tiny_model_dir, tmp_path):
    run = run_with(tiny_model_dir, tmp_path, "saved", 'lora.modules_to_save=["embed_tokens", "lm_head"]')
    prompt = torch.tensor([[1, 520, 9531, 198, 42, 2, 198, 1, 4093]])
    expected = reference_logits(tiny_model_dir, run, prompt)
    result = run_cli("merge", str(run), "-o", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr
    assert (merged_logits(tmp_path / "merged", prompt) - expected).abs().max() < 1e-4
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        trained = f.get_tensor("model.embed_tokens.weight")
    with safe_open(tiny_model_dir / "model.safetensors", "pt") as f:
        base = f.get_tensor("model.embed_tokens.weight")
    assert (trained - base).abs().max() > 1e-3  # the embeddings trained, and the merge kept them

    result = run_cli("export", str(tmp_path / "merged"), "--quant", "f32", "-o", str(tmp_path / "saved.gguf"))
    assert result.returncode == 0, result.stderr
    embeddings, _ = gguf_embeddings(tmp_path / "saved.gguf")
    assert np.array_equal(embeddings, trained.numpy())


def test_vocabulary_settings_are_refused_where_they_cannot_hold(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "tools.jsonl", tool_rows(8))
    run_file = tmp_path / "run.yaml"
    run_file.write_text(f"model: {tiny_model_dir}\ndata:\n  train: {data}\noutput_dir: {tmp_path / 'refused'}\n")
    cases = [
        (["method=prompt", f"added_tokens={json.dumps(TOKENS)}"], "added_tokens: not supported with method 'prompt'"),
        (['added_tokens=["<a>", "<a>"]'], "added_tokens: '<a>' is listed twice"),
        (['added_tokens=[" <a>"]'], "added_tokens: got ' <a>'"),
        (["method=full", 'lora.modules_to_save=["lm_head"]'], "lora.modules_to_save: only with lora"),
        (['lora.modules_to_save=["embed_in"]'], "lora.modules_to_save: embed_in not found"),
    ]
    for overrides, message in cases:
        result = run_cli("train", str(run_file), *overrides)
        errors = [line for line in result.stderr.splitlines() if "error:" in line]
        assert result.returncode == 2 and len(errors) == 1 and message in errors[0], (overrides, result.stderr)


def test_full_fine_tuning_saves_the_grown_vocabulary(tiny_model_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = run_with(tiny_model_dir, tmp_path, "full", "method=full", "train.lr=1e-3",
                   f"added_tokens={json.dumps(TOKENS)}")
    model = AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(run).convert_tokens_to_ids(TOKENS)
    assert model.config.vocab_size == len(tokenizer) + 2 and ids == [len(tokenizer), len(tokenizer) + 1]
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied

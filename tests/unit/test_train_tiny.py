"""The whole `train` path on a tiny random Llama: LoRA and full, outputs on disk, PEFT parity, early stopping."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_cli, write_jsonl
from tuneforge.config import load_config
from tuneforge.train.loop import train


def task_rows(n):
    return [{"instruction": f"Repeat the number {i % 7}.", "output": f"{i % 7} {i % 7} {i % 7}"} for i in range(n)]


@pytest.fixture()
def data_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", task_rows(48))


def config(tiny_model_dir, data_file, tmp_path, *extra):
    return load_config(None, [f"model={tiny_model_dir}", f"data.train={data_file}", "data.val_split=0.125",
                              f"output_dir={tmp_path / 'run'}", "train.epochs=2", "train.batch_size=8",
                              "train.lr=3e-3", "train.eval_every=3", *extra])


def test_lora_run_writes_peft_adapter_and_plain_peft_matches(tiny_model_dir, data_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = train(config(tiny_model_dir, data_file, tmp_path), show_progress=False)
    run = result.run_dir
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "config.yaml",
                 "metrics.jsonl", "loss.png", "tuneforge.json"):
        assert (run / name).is_file(), name
    assert not list(run.glob("*.bin")) and not list(run.glob("*.pt"))  # never pickle
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == result.steps == 12 and losses[-1] < losses[0]
    assert sum("val_loss" in m for m in metrics) == 4  # steps 3, 6, 9, 12

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, run).eval()
    ids = torch.tensor([[1, 520, 9531, 198, 42, 2, 198, 1, 4093]])
    with torch.no_grad():
        diff = (plain(input_ids=ids).logits - result.model(input_ids=ids).logits).abs().max()
    assert diff < 1e-4


def test_full_fine_tuning_saves_an_hf_model(tiny_model_dir, data_file, tmp_path):
    from transformers import AutoModelForCausalLM

    result = train(config(tiny_model_dir, data_file, tmp_path, "method=full", "train.lr=1e-3"), show_progress=False)
    assert (result.run_dir / "model.safetensors").is_file() and (result.run_dir / "config.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(result.run_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 4093, 198, 42]])
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - result.model(input_ids=ids).logits).abs().max() < 1e-5
    assert result.train_loss < 10


def test_early_stopping_keeps_best_weights(tiny_model_dir, data_file, tmp_path):
    # A huge learning rate makes validation loss worse after the first evaluation.
    cfg = config(tiny_model_dir, data_file, tmp_path, "train.lr=0.5", "train.eval_every=1", "train.epochs=5",
                 "train.early_stopping_patience=2", "train.warmup_ratio=0", "train.max_grad_norm=0")
    result = train(cfg, show_progress=False)
    assert result.stopped_early and result.steps < 30
    assert result.val_loss == pytest.approx(result.best_val_loss)


def test_cli_train_and_generate(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "cli-run"
    run_file = tmp_path / "run.yaml"
    run_file.write_text(f"model: {tiny_model_dir}\ndata:\n  train: {data_file}\ntrain:\n  max_steps: 3\n"
                        f"output_dir: {out}\n")
    # Overrides may come before or after the options; a stray word that is no override is still refused.
    refused = run_cli("train", str(run_file), "--quiet", "train.max_steps=2", "stray")
    assert refused.returncode == 2 and "unrecognized arguments: train.max_steps=2 stray" in refused.stderr
    result = run_cli("train", str(run_file), "train.lr=1e-3", "--quiet", "train.max_steps=2")
    assert result.returncode == 0, result.stderr
    assert "done: 2 steps" in result.stdout
    # The memory estimate is for the micro-batches this data forms once tokenized, printed before the model loads.
    estimate = [line for line in result.stderr.splitlines() if line.startswith("memory estimate: peak")]
    assert len(estimate) == 1 and "tokenized examples form" in estimate[0], result.stderr
    gen = run_cli("generate", str(out), "--prompt", "Repeat the number 3.", "--max-new-tokens", "4")
    assert gen.returncode == 0, gen.stderr


def _step_losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_packing_changes_nothing_that_is_learned(tiny_model_dir, data_file, tmp_path):
    """Same optimizer steps and the same token-mean loss per step, packed or padded."""
    common = ["data.val_split=0", "lora.dropout=0", "train.grad_accum=2", "train.batch_size=4"]
    packed = train(config(tiny_model_dir, data_file, tmp_path / "p", *common), show_progress=False)
    padded = train(config(tiny_model_dir, data_file, tmp_path / "u", *common, "data.packing=false",
                          "data.group_by_length=false"), show_progress=False)
    a, b = _step_losses(packed.run_dir), _step_losses(padded.run_dir)
    assert packed.steps == padded.steps == len(a) == len(b) == 12
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5


def test_micro_batches_sized_by_tokens_give_the_same_steps(tiny_model_dir, data_file, tmp_path):
    """A step's examples in one packed row, in rows of at most 60 tokens, or in its planned micro-batches: the same
    step losses and the same trained weights."""
    from safetensors.torch import load_file

    common = ["data.val_split=0", "lora.dropout=0", "train.grad_accum=3", "train.batch_size=2", "train.lr=1e-3",
              "train.adam_eps=1e-6"]  # why not 1e-8: see tests/unit/test_distributed.py
    runs = {budget: train(config(tiny_model_dir, data_file, tmp_path / str(budget), *common,
                                 f"train.micro_batch_tokens={budget}"), show_progress=False).run_dir
            for budget in (0, 60, "auto")}
    records = {budget: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
               for budget, run in runs.items()}
    passes = {budget: [r["micro_batches"] for r in recs if "micro_batches" in r] for budget, recs in records.items()}
    assert set(passes[0]) == {3} and set(passes["auto"]) == {1}  # as planned / the whole step in one row
    assert max(passes[60]) > 1 and passes[60] != passes[0]  # rows of ~3 examples under 60 tokens: re-split
    losses = {budget: _step_losses(run) for budget, run in runs.items()}
    weights = {budget: load_file(run / "adapter_model.safetensors") for budget, run in runs.items()}
    for budget in (60, "auto"):
        assert len(losses[budget]) == len(losses[0]) == 16  # 48 rows, 6 a step, 2 epochs
        assert max(abs(x - y) for x, y in zip(losses[budget], losses[0])) < 1e-5
        assert max((weights[budget][n] - w).abs().max().item() for n, w in weights[0].items()) < 1e-5


@pytest.mark.parametrize("extra", [["train.tokens_per_batch=200"],
                                   ["train.tokens_per_batch=200", "data.packing=false"],
                                   ["data.packing=false"]], ids=["tokens-packed", "tokens-padded", "grouped"])
def test_token_budget_and_length_grouped_runs_train(tiny_model_dir, data_file, tmp_path, extra):
    result = train(config(tiny_model_dir, data_file, tmp_path, "data.val_split=0", *extra), show_progress=False)
    losses = _step_losses(result.run_dir)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == result.steps and losses[-1] < losses[0]
    if "train.tokens_per_batch=200" in extra and "data.packing=false" not in extra:
        assert all(r["tokens"] <= 200 for r in records if "tokens" in r)


def test_gradient_checkpointing_recomputes_the_layers_and_changes_no_loss(tiny_model_dir, data_file, tmp_path,
                                                                        monkeypatch):
    """The decoder layers train in training mode, so train.gradient_checkpointing really recomputes them (the base
    model arrives from from_pretrained in eval mode, where checkpointing is skipped silently)."""
    import transformers.modeling_layers as layers

    calls = {"checkpointed": 0, "plain": 0}
    original = layers.GradientCheckpointingLayer.__call__

    def counting(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if hidden.device.type != "meta":  # not the planner's memory probe
            calls["checkpointed" if self.gradient_checkpointing and self.training else "plain"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(layers.GradientCheckpointingLayer, "__call__", counting)
    common = ["data.val_split=0", "lora.dropout=0", "train.epochs=1", "train.max_steps=2"]
    plain = train(config(tiny_model_dir, data_file, tmp_path / "p", *common), show_progress=False)
    assert calls["checkpointed"] == 0 and calls["plain"] > 0
    calls.update(checkpointed=0, plain=0)
    recomputed = train(config(tiny_model_dir, data_file, tmp_path / "c", *common,
                              "train.gradient_checkpointing=true"), show_progress=False)
    assert calls["checkpointed"] > 0 and calls["plain"] == 0
    a, b = _step_losses(plain.run_dir), _step_losses(recomputed.run_dir)
    assert len(a) == len(b) == 2 and max(abs(x - y) for x, y in zip(a, b)) < 1e-6


def test_compiled_layers_give_the_same_losses(tiny_model_dir, data_file, tmp_path):
    common = ["data.val_split=0", "lora.dropout=0", "train.epochs=1", "train.max_steps=4"]  # compile time dominates
    eager = train(config(tiny_model_dir, data_file, tmp_path / "e", *common), show_progress=False)
    from torch._dynamo.utils import guard_failures

    guard_failures.clear()
    compiled = train(config(tiny_model_dir, data_file, tmp_path / "c", *common, "train.compile=true"),
                     show_progress=False)
    a, b = _step_losses(eager.run_dir), _step_losses(compiled.run_dir)
    assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    # One compiled layer serves every layer: none is compiled again because its input's requires_grad differs.
    reasons = [reason for failures in guard_failures.values() for reason in failures]
    assert not [reason for reason in reasons if "requires_grad" in reason], reasons


def test_eval_metric_is_logged_and_early_stopping_can_follow_it(tmp_path, tiny_model_dir):
    import json as _json

    from tests.conftest import write_jsonl as _write
    from tuneforge.config import load_config as _load
    from tuneforge.train.loop import train as _train

    rows = [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(24)]
    data = _write(tmp_path / "d.jsonl", rows)
    result = _train(_load(overrides=[
        f"model={tiny_model_dir}", f"data.train={data}", f"output_dir={tmp_path / 'run'}", "data.val_split=0.25",
        "train.batch_size=4", "train.epochs=4", "train.eval_every=2", "train.lr=1e-2", "train.eval_metric=exact_match",
        "train.eval_metric_sample=4", "train.eval_metric_max_new_tokens=4", "train.early_stopping_patience=1",
        "train.early_stopping_metric=eval_metric"]), show_progress=False)
    records = [_json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_exact_match" in r]
    # A random tiny model never answers right: exact match stays 0, so the second evaluation is "no improvement"
    # and the run stops there with the first evaluation's weights, although its validation loss kept falling.
    assert [r["val_exact_match"] for r in evals] == [0.0, 0.0]
    assert result.stopped_early and result.steps == 4
    assert evals[1]["val_loss"] < evals[0]["val_loss"]
    assert abs(result.val_loss - evals[0]["val_loss"]) < 1e-9

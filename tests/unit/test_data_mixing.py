"""Data mixing against forgetting: weighted sources, per-source validation loss, resumable draws, the guard."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import write_jsonl
from tests.unit import fault_driver
from tuneforge.config import BUILTIN_DATA, DataSource, load_config, validate_for_training
from tuneforge.data.batching import StepPlan, epoch_steps
from tuneforge.data.mixing import epoch_pool, plan_shares
from tuneforge.data.prepare import read_raw, tokenize_data
from tuneforge.errors import ConfigError
from tuneforge.train.loop import train
from tuneforge.train.validate import validation_loss


def task_rows(n=40):
    rng = random.Random(3)
    return [{"instruction": f"Code for item {rng.randint(0, 999)}?", "output": f"CODE-{i:03d}-X"} for i in range(n)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mix")
    general = [json.loads(line) for line in BUILTIN_DATA["builtin:general"].read_text().splitlines()]
    return {"task": write_jsonl(tmp / "task.jsonl", task_rows()),
            "general_train": write_jsonl(tmp / "general_train.jsonl", general[:120]),
            "general_val": write_jsonl(tmp / "general_val.jsonl", general[200:240]),
            "task_val": write_jsonl(tmp / "task_val.jsonl", task_rows(60)[40:])}


# ---------------------------------------------------------------------------------------------------------------------
# Draws


def test_epoch_draws_follow_the_weights_and_are_a_function_of_seed_and_epoch():
    sources = [DataSource(path="a", name="a", weight=3.0), DataSource(path="b", name="b", weight=1.0)]
    origins = ["a"] * 100 + ["b"] * 300  # the small source is oversampled, the large one subsampled
    shares = plan_shares(sources, origins)
    assert [s.count for s in shares] == [300, 100]
    pool = epoch_pool(shares, seed=7, epoch=0)
    counts = Counter(origins[i] for i in pool)
    assert counts == {"a": 300, "b": 100}
    assert Counter(i for i in pool if origins[i] == "a") == {i: 3 for i in range(100)}  # 3 whole passes
    assert epoch_pool(shares, 7, 0) == pool  # resumable: the same draw again
    assert epoch_pool(shares, 7, 1) != pool  # a fresh sample of b every epoch
    seen_b = set().union(*(set(epoch_pool(shares, 7, e)) for e in range(12))) - set(range(100))
    assert len(seen_b) > 0.95 * 300  # over epochs the subsampled source is seen almost whole
    # Within an epoch the shuffled steps carry the mix: every window of 20 micro-batches is close to 75% a.
    plan = StepPlan(batch_size=4, grad_accum=1, seed=7, packing=True)
    steps = epoch_steps([10] * len(origins), plan, 0, pool)
    share_a = [sum(origins[i] == "a" for mb in steps[k : k + 20] for batch in mb for i in batch) / 80
               for k in range(0, len(steps) - 19, 20)]
    assert all(0.6 < s < 0.9 for s in share_a), share_a  # binomial(80, 0.75): sd 0.05, so +-3 sd


def test_epochs_and_max_rows(files, tokenizer):
    cfg = load_config(overrides=[
        f"data.train=[{{path: {files['task']}, epochs: 2}}, {{path: {files['general_train']}, name: g, epochs: 0.5, "
        f"max_rows: 50}}]"])
    train_rows, _ = read_raw(cfg.data, 42)
    assert Counter(r.origin for r in train_rows) == {"task": 40, "g": 50}
    from tuneforge.config import data_sources

    shares = plan_shares(data_sources(cfg.data.train), [r.origin for r in train_rows])
    assert [(s.name, s.count) for s in shares] == [("task", 80), ("g", 25)]


@pytest.mark.parametrize("override, message", [
    ("data.train=[{path: TASK, weight: 1}, {path: TASK, name: b}]", "has no weight; give every source a weight"),
    ("data.train=[{path: TASK, weight: 1, epochs: 2}]", "give weight or epochs, not both"),
    ("data.train=[{path: TASK}, {path: TASK}]", "two sources are named 'task'"),
    ("data.train=[{pth: TASK}]", "data.train[0].pth: unknown key"),
    ("data.train=[{path: missing.jsonl}]", "data.train[0].path: file not found"),
    ("train.guard.source=general", "no such validation source"),
])
def test_bad_mixing_configs_are_one_line_errors(files, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_for_training(load_config(overrides=[f"data.train={files['task']}",
                                                     override.replace("TASK", str(files["task"]))]))


# ---------------------------------------------------------------------------------------------------------------------
# Runs on the tiny model


def mixed(tiny_model_dir, files, out, *extra):
    return [f"model={tiny_model_dir}", f"output_dir={out}", "lora.dropout=0.1", "train.batch_size=4", "train.lr=5e-3",
            f"data.train=[{{path: {files['task']}, weight: 0.7}}, {{path: {files['general_train']}, name: general, "
            f"weight: 0.3}}]",
            f"data.val=[{{path: {files['task_val']}, name: task}}, {{path: {files['general_val']}, name: general}}]",
            "train.epochs=1", "train.eval_every=5", *extra]


def test_per_source_validation_losses_equal_separate_evaluations(tmp_path, tiny_model_dir, files, tokenizer):
    # 10 of the epoch's 40 steps, validated at 5 and 10: enough for two sets of per-source losses.
    result = train(load_config(overrides=mixed(tiny_model_dir, files, tmp_path / "run", "train.max_steps=10")),
                   show_progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    start = records[0]
    assert start["examples_per_epoch_by_source"] == {"task": 112, "general": 48}  # 0.7 / 0.3 of 40 + 120
    last = [r for r in records if "val_loss_by_source" in r][-1]
    assert last["step"] == result.steps
    cfg = load_config(overrides=mixed(tiny_model_dir, files, tmp_path / "run"))
    _, val_rows = read_raw(cfg.data, 42)
    data = tokenize_data(cfg.data, tokenizer, val_rows[:1], val_rows)
    model = result.model
    for name in ("task", "general"):
        alone = validation_loss(model, [ex for ex in data.val if ex.origin == name], 4, True,
                                tokenizer.pad_token_id, "cpu")
        assert abs(alone - last["val_loss_by_source"][name]) < 1e-5
    assert abs(last["val_loss"] - validation_loss(model, data.val, 4, True, tokenizer.pad_token_id, "cpu")) < 1e-5


def test_a_killed_mixed_run_resumes_the_same_sample_stream(tmp_path, tiny_model_dir, files):
    # 12 of the epoch's 40 steps: the kill (micro-batch 8) lands mid-epoch, after the step-6 checkpoint, so the
    # resumed run must redraw the same epoch's mixed sample and continue it at the right position.
    short = ("train.eval_every=0", "train.max_steps=12")
    reference = train(load_config(overrides=mixed(tiny_model_dir, files, tmp_path / "ref", *short)),
                      show_progress=False)
    args = mixed(tiny_model_dir, files, tmp_path / "run", *short, "train.save_every=3")
    killed = fault_driver.run("microbatch", 8, args)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = fault_driver.run("slow", 0, [*args, "train.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    got = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) < 1e-6
    assert reference.steps == 12 and (tmp_path / "run" / "checkpoints" / "step-00000006").is_dir()


# ---------------------------------------------------------------------------------------------------------------------
# The forgetting guard


@pytest.fixture(scope="module")
def generalist(tmp_path_factory, tiny_model_dir, files):
    """The tiny model after full fine-tuning on general data: a base with something to forget."""
    out = tmp_path_factory.mktemp("generalist")
    train(load_config(overrides=[f"model={tiny_model_dir}", "method=full", f"output_dir={out}",
                                 f"data.train={files['general_train']}", "train.epochs=6", "train.lr=3e-3",
                                 "train.batch_size=8", "train.eval_every=0"]), show_progress=False)
    return out


def guarded(generalist, files, out, *extra):
    return [f"model={generalist}", f"output_dir={out}", "lora.dropout=0.0", "train.batch_size=4", "train.epochs=3",
            f"data.val=[{{path: {files['task_val']}, name: task}}, {{path: {files['general_val']}, name: general}}]",
            "train.eval_every=3", "train.guard.source=general", "train.guard.max_increase=0.05", *extra]


def test_guard_stops_a_run_made_to_forget_and_keeps_the_best_weights(tmp_path, generalist, files):
    # A narrow task alone at a high learning rate: general ability falls apart.
    result = train(load_config(overrides=guarded(generalist, files, tmp_path / "run", f"data.train={files['task']}",
                                                 "train.lr=5e-2", "lora.r=32")), show_progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    baseline = records[1]["val_loss_by_source"]["general"]
    assert records[1]["step"] == 0
    stop = next(r for r in records if "guard_stop" in r)
    assert stop["guard_loss"] > baseline * 1.05 and result.stopped_early and result.steps == stop["step"]
    assert result.steps < 30  # stopped, not run to the end
    # The saved weights are the best evaluation's that stayed within the guard (possibly the untouched base).
    kept = [r for r in records if "val_loss_by_source" in r and r["val_loss_by_source"]["general"] <= baseline * 1.05]
    assert abs(result.val_loss - min(r["val_loss"] for r in kept)) < 1e-6


def test_guard_keeps_a_mixed_gentle_run(tmp_path, generalist, files):
    result = train(load_config(overrides=guarded(
        generalist, files, tmp_path / "run", "train.lr=5e-4", "train.epochs=1",
        f"data.train=[{{path: {files['task']}, weight: 0.5}}, {{path: {files['general_train']}, name: g, "
        f"weight: 0.5}}]")), show_progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not result.stopped_early and not any("guard_stop" in r for r in records)
    evaluations = [r["val_loss_by_source"] for r in records if "val_loss_by_source" in r]
    assert evaluations[-1]["task"] < evaluations[0]["task"]  # the task was learned


def test_builtin_general_set_ships_and_loads():
    cfg = load_config(overrides=["data.train=[{path: builtin:general}]"])
    validate_for_training(cfg)
    rows, _ = read_raw(cfg.data, 0)
    assert len(rows) > 200 and rows[0].origin == "general"
    assert Path(BUILTIN_DATA["builtin:general"]).is_file()

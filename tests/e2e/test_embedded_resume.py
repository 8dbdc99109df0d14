"""Kill -9 at a random step of a (shortened) demo run on the embedded default model, resume, and get the same adapter.

The reliability suite proves this on the tiny model in every situation; this proves it once on the real one, where
dropout, the GGUF-converted weights and the real tokenizer all take part.
"""

from __future__ import annotations

import json
import random
import signal

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, write_jsonl
from tests.unit.test_reliability import run_driver, step_records
from tuneforge.config import load_config
from tuneforge.train.loop import train

pytestmark = pytest.mark.e2e

STEPS = 6


def demo_overrides(tmp_path, out):
    rows = [json.loads(line) for line in (ROOT / "examples" / "demo" / "train.jsonl").read_text().splitlines()]
    data = write_jsonl(tmp_path / "train.jsonl", rows[: STEPS * 2])
    # The demo config, cut to 6 steps of 2 rows so the three runs together stay around a minute.
    return ["--config", str(ROOT / "configs" / "demo.yaml"), f"data.train={data}", f"output_dir={out}",
            "data.val_split=0", "train.eval_every=0", "train.epochs=1", "train.batch_size=2", "train.save_every=1",
            "train.keep_last=2"]


def test_kill_9_at_a_random_step_of_the_demo_then_resume(tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    args = demo_overrides(tmp_path, straight)
    config_file, straight_overrides = args[1], args[2:]
    train(load_config(config_file, straight_overrides), show_progress=False)

    broken_overrides = [a if not a.startswith("output_dir=") else f"output_dir={broken}" for a in straight_overrides]
    kill_at = random.Random().randint(2, STEPS)  # a micro-batch of steps 2..6: at least one checkpoint exists
    killed = run_driver("microbatch", kill_at, ["--config", config_file, *broken_overrides])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    train(load_config(config_file, broken_overrides + ["train.resume=auto"]), show_progress=False)

    a, b = step_records(broken), step_records(straight)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1)), f"killed at micro-batch {kill_at}"
    for step in b:
        assert a[step]["lr"] == b[step]["lr"] and abs(a[step]["loss"] - b[step]["loss"]) < 1e-6, step
    wa, wb = load_file(broken / "adapter_model.safetensors"), load_file(straight / "adapter_model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wb) < 1e-6, f"killed at micro-batch {kill_at}"
    assert all(torch.isfinite(t).all() for t in wa.values())

"""`tuneforge recommend`: the decision tree's branches, the fitted batch split, and a run file `load_config` accepts."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from tests.conftest import ROOT
from tuneforge.config import load_config
from tuneforge.errors import UserError
from tuneforge.plan.memory import estimate_memory
from tuneforge.plan.recommend import recommend, render_yaml

GIB = 2**30


@pytest.mark.parametrize("examples, gpu_mem, shift, method", [
    (5_000, 80, "somewhat", "lora"),  # too few examples for full; LoRA fits
    (200_000, 400, "somewhat", "full"),  # lots of data and room for full
    (20_000, 400, "very", "full"),  # a very different domain with a solid dataset
    (200_000, 80, "somewhat", "lora"),  # full wanted, does not fit: LoRA
    (5_000, 24, "somewhat", "qlora"),  # LoRA on the fp32 base (~29 GiB) does not fit 24 GiB: QLoRA
])
def test_method_branches(examples, gpu_mem, shift, method):
    rec = recommend("llama-2-7b", examples, gpu_mem, shift, seq_len=512)
    assert rec.value("method") == method
    assert rec.estimate.peak <= gpu_mem * GIB


def test_nothing_fits_is_one_line():
    with pytest.raises(UserError, match=r"^recommend: llama-2-70b does not fit in 8 GiB even with QLoRA"):
        recommend("llama-2-70b", 1_000, 8, seq_len=512)


@pytest.mark.parametrize("shift, examples, r", [
    ("none", 5_000, 8), ("style", 5_000, 8), ("somewhat", 5_000, 16), ("very", 5_000, 64),
    ("very", 500, 8),  # under 1,000 examples the rank is capped
    ("style", 60_000, 32),  # with 50,000+ examples it is raised
])
def test_rank_by_domain_shift_and_size(shift, examples, r):
    rec = recommend("smollm2-135m", examples, 16, shift, seq_len=128)
    assert rec.value("lora.r") == r and rec.value("lora.alpha") == 2 * r


@pytest.mark.parametrize("examples, epochs, effective", [(300, 5, 32), (5_000, 3, 32), (50_000, 2, 64),
                                                         (500_000, 1, 128), (12, 5, 8)])
def test_epochs_and_effective_batch_by_size(examples, epochs, effective):
    rec = recommend("smollm2-135m", examples, 16, seq_len=128)
    assert rec.value("train.epochs") == epochs
    assert rec.value("train.batch_size") * rec.value("train.grad_accum") == effective


def test_micro_batch_is_the_largest_that_fits():
    rec = recommend("qwen2.5-0.5b", 5_000, 12, "somewhat", seq_len=1024)
    batch = rec.value("train.batch_size")
    assert 1 <= batch < 32 and rec.estimate.peak <= 12 * GIB
    double = dataclasses.replace(rec.estimate.spec, example_lengths=(1024,) * (2 * batch),
                                 grad_accum=max(1, 32 // (2 * batch)))
    assert estimate_memory(double).peak > 12 * GIB


def test_checkpointing_only_when_nothing_fits_without_it():
    roomy = recommend("qwen2.5-0.5b", 5_000, 40, seq_len=1024)
    assert not any(c.key == "train.gradient_checkpointing" for c in roomy.choices)
    tight = recommend("llama-2-7b", 5_000, 10, seq_len=2048)  # QLoRA's 2,048-token activations alone exceed 10 GiB
    assert tight.value("method") == "qlora" and tight.value("train.gradient_checkpointing") is True


def test_run_file_loads_and_says_why_for_every_value(tmp_path):
    rec = recommend("llama-2-7b", 5_000, 24, "style", seq_len=512)
    text = render_yaml(rec)
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    cfg = load_config(path)
    assert (cfg.model, cfg.method, cfg.lora.r, cfg.train.lr) == ("llama-2-7b", "qlora", 8, 2e-4)
    assert cfg.train.batch_size * cfg.train.grad_accum == 32
    values = [line for line in text.splitlines() if line and not line.lstrip().startswith("#") and
              not line.endswith(":")]
    assert values and all("  # " in line and line.split("  # ", 1)[1].strip() for line in values)
    assert yaml.safe_load(text)["data"]["max_length"] == 512


def test_cli_with_data_file_writes_a_trainable_run(tmp_path, capsys):
    from tuneforge.cli import main
    from tuneforge.config import validate_for_training

    out = tmp_path / "RUN.yaml"
    data = ROOT / "examples" / "demo" / "train.jsonl"
    assert main(["recommend", "--data", str(data), "--gpu-mem", "8", "--domain-shift", "style", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "data: 320 examples" in printed and f"wrote {out}" in printed
    cfg = load_config(out)
    validate_for_training(cfg)  # the file names real data: `tuneforge train RUN.yaml` would start
    assert cfg.data.train == str(data) and cfg.train.epochs == 5 and cfg.method == "lora"
    assert cfg.data.max_length == 128  # the demo's longest example is 80 tokens, rounded up to a multiple of 64


def test_cli_rejects_bad_input_in_one_line(capsys):
    from tuneforge.cli import main

    assert main(["recommend", "--examples", "0", "--gpu-mem", "8"]) == 2
    assert capsys.readouterr().err.strip() == "tuneforge: error: --examples: got 0, need at least 1 example"

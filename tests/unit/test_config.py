"""Config schema: defaults, YAML + dotted overrides, and one clear line with exit code 2 for every bad config."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli, write_jsonl
from tuneforge.config import RunConfig, load_config, validate_for_training
from tuneforge.errors import ConfigError


def test_defaults_live_in_the_schema():
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.model == "smollm2-135m-instruct" and cfg.method == "lora"
    assert cfg.lora.target_modules == "all-linear" and cfg.train.scheduler == "cosine"
    assert cfg.train.max_grad_norm == 1.0 and cfg.data.train_on_prompt is False


def test_yaml_then_overrides(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("method: full\ntrain:\n  lr: 1e-4\n  epochs: 2\nlora:\n  target_modules: [q_proj, v_proj]\n")
    cfg = load_config(run, ["train.lr=3e-5", "lora.r=8", "data.packing=false", "output_dir=out/x"])
    assert cfg.method == "full"
    assert cfg.train.lr == pytest.approx(3e-5) and cfg.train.epochs == 2
    assert cfg.lora.r == 8 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.packing is False and cfg.output_dir == "out/x"


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["train.lrr=1"], "train.lrr: unknown key"),
        (["train.epochs=three"], "train.epochs: got 'three' (str), expected an integer"),
        (["train.lr=-1"], "train.lr: got -1.0, must be > 0"),
        (["train.warmup_ratio=1.5"], "train.warmup_ratio: got 1.5, must be <= 1"),
        (["method=qlorax"], "method: got 'qlorax', allowed:"),
        (["data.packing=maybe"], "data.packing: got 'maybe' (str), expected true or false"),
        (["lora.target_modules=5"], "lora.target_modules: got 5 (int), expected"),
        (["train=3"], "train: expected a mapping"),
        (["nonsense"], "expected key=value"),
    ],
)
def test_schema_errors_name_key_value_and_allowed(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_data_file_is_a_config_error(tmp_path):
    cfg = load_config(None, [f"data.train={tmp_path / 'nope.jsonl'}"])
    with pytest.raises(ConfigError, match=r"data.train: file not found: .*nope.jsonl"):
        validate_for_training(cfg)


BAD_CONFIGS = {
    "unknown key": ("train:\n  lr: 1e-4\n  epoch: 3\n", "train.epoch: unknown key", "did you mean 'epochs'"),
    "wrong type": ("train:\n  batch_size: eight\n", "train.batch_size: got 'eight' (str), expected an integer", ""),
    "out of range": ("lora:\n  r: 0\n", "lora.r: got 0, must be >= 1", ""),
    "bad choice": ("train:\n  scheduler: step\n", "train.scheduler: got 'step', allowed: cosine, linear, constant, exponential", ""),
    "missing data file": ("data:\n  train: no/such/file.jsonl\n", "data.train: file not found: no/such/file.jsonl", ""),
    "invalid yaml": ("train: [unclosed\n", "invalid YAML", ""),
    "not a mapping": ("- just\n- a list\n", "a run file must be a YAML mapping", ""),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_cli_bad_config_one_line_exit_2(tmp_path, case):
    text, fragment, extra = BAD_CONFIGS[case]
    write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    if "data:" not in text and "unclosed" not in text and "- just" not in text:
        text += f"data:\n  train: {tmp_path / 'd.jsonl'}\n"
    run = tmp_path / "run.yaml"
    run.write_text(text)
    result = run_cli("train", str(run), f"output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tuneforge: error: ") and fragment in lines[0] and extra in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # nothing written for a config that does not validate


def test_cli_bad_override_exit_2(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    run = tmp_path / "run.yaml"
    run.write_text(f"data:\n  train: {tmp_path / 'd.jsonl'}\n")
    result = run_cli("train", str(run), "train.max_grad_norm=-0.5")
    assert result.returncode == 2
    assert result.stderr.strip() == "tuneforge: error: train.max_grad_norm: got -0.5, must be >= 0"


def test_missing_config_file_exit_2(tmp_path):
    result = run_cli("train", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("tuneforge: error: config file not found:")

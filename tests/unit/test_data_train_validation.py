"""`tuneforge train` validates its data like `data check` before any model loads; `data.on_error: fail | skip`."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, write_jsonl
from tuneforge.config import load_config
from tuneforge.data.prepare import read_raw
from tuneforge.errors import ConfigError, DataError


def broken_file(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"Say {i}.", "output": str(i)} for i in range(6)])
    lines = path.read_text().splitlines()
    lines[2] = '{"instruction": "Say 2.", "output": '  # line 3: cut off mid-row
    lines[4] = '{"instruction": "Say 4.", "output": 4}'  # line 5: a number where text is expected
    path.write_text("\n".join(lines) + "\n")
    return path


def test_train_fails_on_a_broken_line_before_loading_any_model(tmp_path):
    path = broken_file(tmp_path)
    # The model path does not exist: had training got as far as loading a tokenizer or model, the error would be
    # about the model. It must be about the data, naming file and line, with exit code 2 and no run directory.
    run_file = tmp_path / "run.yaml"
    run_file.write_text(f"model: {tmp_path / 'no-such-model'}\ndata:\n  train: {path}\n"
                        f"output_dir: {tmp_path / 'run'}\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    # -X importtime lists every module the process imports (on stderr): torch must not be among them, which proves
    # that no model (nor tokenizer) was loaded.
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "tuneforge", "train", "--quiet", str(run_file)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - started
    assert result.returncode == 2, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"tuneforge: error: {path}:3: malformed JSON"), result.stderr[-2000:]
    assert "and 1 more bad rows, at 5" in error and "model" not in error.split("data check")[0]
    assert not (tmp_path / "run").exists()
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "tuneforge.data.formats" in imported  # the import log is there...
    assert not {"torch", "transformers.modeling_utils", "tuneforge.model.load"} & imported  # ...and no model stack
    assert wall < 5.0, f"took {wall:.1f} s"  # the bound; it takes about 1.5 s on a 2-core CPU


def test_on_error_fail_names_the_first_bad_row_and_the_count(tmp_path):
    cfg = load_config(None, [f"data.train={broken_file(tmp_path)}"])
    with pytest.raises(DataError) as info:
        read_raw(cfg.data, seed=0)
    assert str(info.value).startswith(f"{cfg.data.train}:3: malformed JSON")
    assert "(and 1 more bad rows, at 5;" in str(info.value)


def test_on_error_skip_drops_bad_rows_and_logs_which(tmp_path, caplog):
    cfg = load_config(None, [f"data.train={broken_file(tmp_path)}", "data.on_error=skip", "data.val_split=0.25"])
    with caplog.at_level(logging.WARNING, logger="tuneforge"):
        train, val = read_raw(cfg.data, seed=0)
    assert len(train) + len(val) == 4
    assert sorted(int(ex.source.rsplit(":", 1)[1]) for ex in train + val) == [1, 2, 4, 6]
    summary, first, second = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert summary == f"data: skipped 2 bad rows of {cfg.data.train} (data.on_error=skip): lines 3, 5"
    assert first.startswith(f"data: skipped {cfg.data.train}:3: malformed JSON")
    assert second == f"data: skipped {cfg.data.train}:5: field 'output' must be text, got int"


def test_on_error_skip_with_nothing_left_is_an_error(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"instruction": "a"}\n')
    cfg = load_config(None, [f"data.train={path}", "data.on_error=skip"])
    with pytest.raises(DataError, match="no usable rows"):
        read_raw(cfg.data, seed=0)


def test_on_error_only_accepts_fail_or_skip():
    with pytest.raises(ConfigError, match="data.on_error: got 'ignore', allowed: fail, skip"):
        load_config(None, ["data.on_error=ignore"])

"""`train.report_to` and status.json: every tracker gets the same numbers as metrics.jsonl; the status says how the
run ended (finished / failed / stopped), and a resumed run continues the same tracker runs."""

from __future__ import annotations

import json
import os
import struct

import pytest

from tests.conftest import write_jsonl
from tests.unit.test_train_tiny import task_rows
from tuneforge.config import load_config
from tuneforge.errors import ConfigError, TrainingStopped
from tuneforge.train.loop import train
from tuneforge.run_dir import read_metrics, read_status


def _config(tiny_model_dir, tmp_path, *extra):
    data = write_jsonl(tmp_path / "train.jsonl", task_rows(32))
    return load_config(None, [f"model={tiny_model_dir}", f"data.train={data}", "data.val_split=0.25",
                              f"output_dir={tmp_path / 'run'}", "train.max_steps=4", "train.batch_size=8",
                              "train.lr=3e-3", "train.eval_every=2", *extra])


def _tensorboard_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def _mlflow_history(run_dir, metric):
    from mlflow.tracking import MlflowClient

    run_id = json.loads((run_dir / "tracker_ids.json").read_text())["mlflow"]
    client = MlflowClient(f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
    return client, run_id, {m.step: m.value for m in client.get_metric_history(run_id, metric)}


def _wandb_history(run_dir):
    """Every history row of the offline W&B run, read back from its transaction log (LevelDB-style log: a 7-byte
    file header, then records in 32 KiB blocks, each piece behind a 7-byte crc/length/type header)."""
    from wandb.proto import wandb_internal_pb2

    (log_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = log_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, piece, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        piece += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a FULL record, or the LAST piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(piece)
            piece = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_every_tracker_gets_the_metrics_jsonl_numbers(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc W&B login: the run must go offline by itself
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _config(tiny_model_dir, tmp_path, "train.report_to=[tensorboard, wandb, mlflow]")
    result = train(cfg, show_progress=False)
    records = read_metrics(result.run_dir)
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert sorted(losses) == [1, 2, 3, 4] and sorted(val) == [2, 4]

    assert _tensorboard_scalars(result.run_dir, "loss") == pytest.approx(losses, rel=1e-6)
    assert _tensorboard_scalars(result.run_dir, "val_loss") == pytest.approx(val, rel=1e-6)

    client, run_id, history = _mlflow_history(result.run_dir, "loss")
    assert history == pytest.approx(losses, rel=1e-12)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["lora.r"] == str(cfg.lora.r)

    rows = _wandb_history(result.run_dir)
    wandb_losses = {row["_step"]: row["loss"] for row in rows if "loss" in row}
    assert wandb_losses == pytest.approx(losses, rel=1e-12)
    assert {row["_step"]: row["val_loss"] for row in rows if "val_loss" in row} == pytest.approx(val, rel=1e-12)

    status = read_status(result.run_dir)
    assert status["state"] == "finished" and status["step"] == 4 and status["pid"] == os.getpid()


def test_a_missing_tracker_package_fails_before_training(tiny_model_dir, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train.report_to: 'wandb' needs the wandb package; install it"):
        train(_config(tiny_model_dir, tmp_path, "train.report_to=[wandb]"), show_progress=False)
    assert not (tmp_path / "run").exists()  # nothing was started


def test_unknown_tracker_is_a_config_error(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"train.report_to\[0\]: got 'neptune', allowed: tensorboard, wandb, mlflow"):
        _config(tiny_model_dir, tmp_path, "train.report_to=[neptune]")


def test_status_says_failed_with_the_error_line(tiny_model_dir, tmp_path):
    # A loss spike stop is a training failure the user must see on the dashboard, with its reason.
    cfg = _config(tiny_model_dir, tmp_path, "train.max_steps=12", "train.loss_spike_factor=0.5",
                  "train.loss_spike_patience=1", "train.eval_every=0")
    with pytest.raises(TrainingStopped) as raised:
        train(cfg, show_progress=False)
    status = read_status(tmp_path / "run")
    assert status["state"] == "failed" and status["error"] == str(raised.value).splitlines()[0]


def test_an_error_before_the_run_starts_keeps_the_earlier_status(tiny_model_dir, tmp_path):
    cfg = _config(tiny_model_dir, tmp_path)
    train(cfg, show_progress=False)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(cfg, show_progress=False)  # resume=never refuses a used output_dir before anything starts
    assert read_status(tmp_path / "run")["state"] == "finished"


def test_resume_continues_the_same_tracker_runs(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = _config(tiny_model_dir, tmp_path, "train.report_to=[tensorboard, mlflow]", "train.save_every=2")
    train(first, show_progress=False)
    ids = json.loads((tmp_path / "run" / "tracker_ids.json").read_text())
    resumed = _config(tiny_model_dir, tmp_path, "train.report_to=[tensorboard, mlflow]", "train.save_every=2",
                      "train.max_steps=6", "train.resume=auto")
    train(resumed, show_progress=False)
    assert json.loads((tmp_path / "run" / "tracker_ids.json").read_text()) == ids
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert _mlflow_history(tmp_path / "run", "loss")[2] == pytest.approx(losses, rel=1e-12)
    assert _tensorboard_scalars(tmp_path / "run", "loss") == pytest.approx(losses, rel=1e-6)

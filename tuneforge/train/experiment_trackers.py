"""Experiment trackers next to metrics.jsonl: `train.report_to: [tensorboard, wandb, mlflow]`.

Each tracker is imported only when a run asks for it, so none of them is a dependency of training. They receive the
same records as metrics.jsonl, under the same names (`loss`, `val_loss`, `val_loss_by_source/<name>`), so a curve
means the same thing in every tool. A resumed run continues the same tracker run instead of starting a second one.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import netrc
import os
import secrets
import time
from pathlib import Path

from tuneforge.config import dotted_items
from tuneforge.errors import ConfigError

log = logging.getLogger("tuneforge")

# What each tracker imports, and the pip packages that provide it.
PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow-skinny sqlalchemy alembic"),
}
IDS_FILE = "tracker_ids.json"  # the W&B / MLflow run ids, so that --resume logs into the same tracker run
NOT_METRICS = {"time", "step", "event"}


def check_available(names: list[str]) -> None:
    """Before any model loads: a tracker that cannot be imported fails the run in seconds, saying what to install."""
    for name in names:
        module, pip_names = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.report_to: {name!r} needs the {module} package; install it with "
                              f"pip install {pip_names} (or pip install 'tuneforge[trackers]')")


def numeric_fields(record: dict) -> dict[str, float]:
    """The record's numbers, nested mappings flattened as `outer/inner`; text, flags and events are left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in NOT_METRICS:
            continue
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in numeric_fields(value).items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def flat_config(tree: dict) -> dict[str, str]:
    """Dotted keys with text values: what TensorBoard's text panel and MLflow's parameters take."""
    return {k: json.dumps(v) if isinstance(v, (list, tuple)) else str(v) for k, v in dotted_items(tree).items()}


class TensorBoardTracker:
    def __init__(self, run_dir: Path, config: dict, start_step: int, ids: dict):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events a killed attempt wrote after the resumed checkpoint (step > start_step) are dropped, as
        # in metrics.jsonl.
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        if not start_step:
            self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in flat_config(config).items()))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, config: dict, start_step: int, ids: dict):
        import wandb

        # Offline unless the user has a W&B login: a run must never hang on a network it cannot reach. WANDB_MODE
        # set by the user wins either way. An offline run uploads later with `wandb sync <run>/wandb/offline-run-*`.
        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_login_present() else "offline")
        ids.setdefault("wandb", secrets.token_hex(4))  # W&B run ids are short lowercase alphanumerics
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tuneforge"), name=run_dir.name,
                              id=ids["wandb"], resume="allow", dir=str(run_dir), config=config, mode=mode)
        if mode == "offline":
            log.info("wandb: offline run in %s (upload later with `wandb sync`)", run_dir / "wandb")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, run_dir: Path, config: dict, start_step: int, ids: dict):
        import mlflow

        # MLFLOW_TRACKING_URI (a server) wins; otherwise a SQLite store inside the run directory (MLflow's file store
        # is deprecated). View it with `mlflow ui --backend-store-uri sqlite:///<run>/mlflow.db`.
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.client = mlflow.tracking.MlflowClient(uri)
        if "mlflow" not in ids:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "tuneforge")
            found = self.client.get_experiment_by_name(name)
            experiment = found.experiment_id if found else self.client.create_experiment(name)
            run = self.client.create_run(experiment, run_name=run_dir.name)
            ids["mlflow"] = run.info.run_id
            params = flat_config(config)
            for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
                batch = list(params.items())[i:i + 100]
                self.client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in batch])
        self.run_id = ids["mlflow"]
        self.metric = mlflow.entities.Metric

    def log(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.metric(k, v, now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


def start_trackers(names: list[str], run_dir: Path, config: dict, start_step: int) -> list:
    """The trackers a run asked for, started (or continued, on resume) in `run_dir`."""
    if not names:
        return []
    ids_path = run_dir / IDS_FILE
    ids = json.loads(ids_path.read_text(encoding="utf-8")) if start_step and ids_path.is_file() else {}
    trackers = [TRACKERS[name](run_dir, config, start_step, ids) for name in names]
    ids_path.write_text(json.dumps(ids) + "\n", encoding="utf-8")
    return trackers


def _wandb_login_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False

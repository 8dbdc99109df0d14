"""Writing trained weights: the final output of a run (and, later, periodic checkpoints).

Outputs are written into a staging directory beside their destination, fsynced, then moved into place with
os.replace, so a crash mid-write never leaves a half-written file under a name a loader would trust.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from tuneforge.errors import UserError
from tuneforge.model.trained import RUN_META_FILE


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def assert_finite(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.requires_grad and not torch.isfinite(p).all():
            raise UserError(f"refusing to save: trainable weight {name} contains NaN or Inf")


def save_output(model: torch.nn.Module, tokenizer, run_dir: Path, meta: dict) -> None:
    """Final weights (PEFT adapter or full HF model), tokenizer and run metadata into `run_dir`."""
    assert_finite(model)
    run_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".output-", dir=run_dir))
    try:
        model.save_pretrained(staging)  # PEFT writes adapter_*; transformers writes model.safetensors + config
        tokenizer.save_pretrained(staging)
        (staging / RUN_META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _fsync_tree(staging)
        for item in sorted(staging.iterdir()):
            destination = run_dir / item.name
            if destination.is_dir():
                shutil.rmtree(destination)
            os.replace(item, destination)
        _fsync_dir(run_dir)
    except OSError as exc:
        raise UserError(f"cannot write the output to {run_dir}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

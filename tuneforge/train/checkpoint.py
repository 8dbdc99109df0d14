"""Checkpoints and final outputs, written so that a crash at any instant loses at most the step in flight.

Every write goes into a staging directory beside its destination; files are fsynced, then the directory is renamed
into place (os.replace is atomic). A checkpoint directory therefore exists under its final name only when complete,
and `.tmp-*` leftovers of an interrupted write are removed on the next start. The previous checkpoint is pruned only
after the new one is in place, so a full disk or a kill during a write leaves the last good one loadable.

Only safetensors and JSON are ever read back: no pickle, so a tampered checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tuneforge import run_dir as layout
from tuneforge.errors import OutputWriteError, TrainingStopped, UserError

STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint (with the rename)
WEIGHTS_FILE = "trainable.safetensors"
BEST_WEIGHTS_FILE = "best_trainable.safetensors"
OPTIMIZER_TENSORS_FILE = "optimizer.safetensors"
OPTIMIZER_META_FILE = "optimizer.json"
RNG_FILE = "rng.safetensors"


# ---------------------------------------------------------------------------------------------------------------------
# Trainable weights in memory.


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [name for name in params if params[name].requires_grad and name not in state]
    unknown = [name for name in state if name not in params]
    if missing or unknown:
        raise UserError(f"checkpoint weights do not fit the model: missing {missing[:3]}, unexpected {unknown[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def assert_finite(tensors: dict[str, torch.Tensor] | torch.nn.Module, what: str = "weights") -> None:
    """Never write NaN/Inf weights: they would poison every later load."""
    items = tensors.items() if isinstance(tensors, dict) else (
        (n, p) for n, p in tensors.named_parameters() if p.requires_grad)
    for name, value in items:
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise TrainingStopped(f"refusing to save {what}: {name} contains NaN or Inf")


# ---------------------------------------------------------------------------------------------------------------------
# Periodic checkpoints: weights, optimizer, schedule position, data position, RNG, config.


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = layout.checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def remove_partial_checkpoints(run_dir: Path) -> None:
    root = layout.checkpoints_dir(run_dir)
    if root.is_dir():
        for leftover in root.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def save_checkpoint(
    run_dir: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    config_text: str,
    keep_last: int,
    best_state: dict[str, torch.Tensor] | None = None,
    rank_rng: dict[str, torch.Tensor] | None = None,
) -> Path:
    """`weights`: the full trainable weights; `optimizer_state`: torch's `optimizer.state_dict()` format; `rank_rng`:
    the other ranks' RNG states of a distributed run."""
    weights = {name: t.contiguous() for name, t in weights.items()}
    assert_finite(weights)
    root = layout.checkpoints_dir(run_dir)
    target = layout.checkpoint_dir(run_dir, step)
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=root))
        save_file(weights, staging / WEIGHTS_FILE)
        if best_state is not None:
            save_file({n: t.contiguous() for n, t in best_state.items()}, staging / BEST_WEIGHTS_FILE)
        opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
        save_file(opt_tensors, staging / OPTIMIZER_TENSORS_FILE)
        _write_text(staging / OPTIMIZER_META_FILE, json.dumps(opt_meta))
        save_file({**_torch_rng_tensors(), **(rank_rng or {})}, staging / RNG_FILE)
        layout.write_config(staging, config_text)
        state = {**trainer_state, "python_rng": _python_rng_state(), "numpy_rng": _numpy_rng_state()}
        _write_text(staging / STATE_FILE, json.dumps(state))
        _fsync_tree(staging)
        if target.exists():  # a checkpoint of the same step from an earlier attempt: replace it whole
            _remove_dir(target)
        os.replace(staging, target)
        _fsync_dir(root)
    except (OSError, SafetensorError) as exc:
        if "staging" in locals():
            shutil.rmtree(staging, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        kept = f"; the last complete checkpoint {previous} is intact" if previous else ""
        raise OutputWriteError(f"cannot write checkpoint {target}: {_io_reason(exc)}{kept}") from None
    for old in complete_checkpoints(run_dir)[:-keep_last]:
        if old != target:
            _remove_dir(old)
    return target


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Everything `save_checkpoint` wrote, read from safetensors and JSON only."""
    path = Path(path)
    loaded = {
        "weights": _load_safetensors(path / WEIGHTS_FILE),
        "optimizer": _unflatten_optimizer(_load_safetensors(path / OPTIMIZER_TENSORS_FILE),
                                          json.loads((path / OPTIMIZER_META_FILE).read_text())),
        "rng": _load_safetensors(path / RNG_FILE),
        "state": read_trainer_state(path),
        "config_text": layout.config_path(path).read_text(encoding="utf-8"),
        "best_weights": _load_safetensors(path / BEST_WEIGHTS_FILE) if (path / BEST_WEIGHTS_FILE).exists() else None,
    }
    return loaded


def read_trainer_state(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer state alone (small JSON): what a resume checks before loading any tensor."""
    return json.loads((Path(path) / STATE_FILE).read_text())


def restore_rng(rng_tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    torch.set_rng_state(rng_tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda_states = [rng_tensors[k] for k in sorted(rng_tensors) if k.startswith("torch_cuda_")]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy_rng"]))


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a valid safetensors file ({exc}); refusing to load it") from None


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def _torch_rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return tensors


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_rng_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), pos, has_gauss, cached]


def _remove_dir(path: Path) -> None:
    # Rename first (atomic), then delete: a kill mid-delete leaves a `.tmp-*` leftover, never a damaged checkpoint
    # under a name that would be trusted.
    doomed = path.parent / f".tmp-delete-{path.name}"
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# Final output: what users load (PEFT adapter or HF model), tokenizer, run metadata.


def save_output(model: torch.nn.Module, tokenizer, run_dir: Path, meta: dict,
                state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Final weights (PEFT adapter or full HF model), tokenizer and run metadata into `run_dir`. `state_dict`: the
    model's full weights when its own parameters are shards (FSDP), gathered by the caller."""
    assert_finite(state_dict if state_dict is not None else model)
    run_dir.mkdir(parents=True, exist_ok=True)
    staging = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=".output-", dir=run_dir))
        # PEFT writes adapter_*; transformers writes model.safetensors + config.
        model.save_pretrained(staging, **({"state_dict": state_dict} if state_dict is not None else {}),
                              **_embedding_layers_option(model))
        tokenizer.save_pretrained(staging)
        _write_text(staging / layout.META_FILE, layout.meta_text(meta))
        _fsync_tree(staging)
        for item in sorted(staging.iterdir()):
            destination = run_dir / item.name
            if destination.is_dir():
                shutil.rmtree(destination)
            os.replace(item, destination)
        _fsync_dir(run_dir)
    except (OSError, SafetensorError) as exc:
        raise OutputWriteError(f"cannot write the output to {run_dir}: {_io_reason(exc)}") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _embedding_layers_option(model: torch.nn.Module) -> dict:
    """PEFT saves whole embedding matrices into the adapter once the vocabulary grew (added_tokens): hundreds of MB
    that hold nothing trained, since an added token's rows are saved as trainable tokens and every other row is the
    base's. Kept where LoRA itself is on an embedding (its update is relative to the rows the base had here)."""
    config = getattr(model, "peft_config", {}).get("default")
    if config is None or not hasattr(config, "target_modules"):
        return {}
    targets = config.target_modules
    targets = [targets] if isinstance(targets, str) else list(targets or [])
    if any(name in ("embed_tokens", "lm_head", "wte", "embed_in") for name in targets):
        return {}
    return {"save_embedding_layers": False}


def _io_reason(exc: Exception) -> str:
    # safetensors wraps the OS error in its own exception ("Error while serializing: I/O error: No space left on
    # device (os error 28)"); users need the OS reason on one line either way.
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split()).removeprefix("Error while serializing: I/O error: ")


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


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

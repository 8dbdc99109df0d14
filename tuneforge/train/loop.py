"""THE training loop: one function for every method, readable top to bottom.

config -> data (validated before any model loads) -> model (load -> method) -> steps -> output in the run directory.
Each optimizer step's loss is the mean over all answer tokens of the step, however the step is split into
micro-batches: every micro-batch's summed loss is divided by the step's total target count before backward.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tuneforge import __version__
from tuneforge.config import RunConfig, save_config, validate_for_training
from tuneforge.data.batching import collate, epoch_steps, steps_per_epoch
from tuneforge.data.prepare import read_raw, tokenize_data
from tuneforge.model.attention import use_packed_attention, use_standard_attention
from tuneforge.model.load import load_model, load_tokenizer, native_bf16, pick_device
from tuneforge.model.methods import apply_method, parameter_report
from tuneforge.train.checkpoint import load_trainable_state, save_output, trainable_state
from tuneforge.train.forward import batch_loss_sum
from tuneforge.train.optim import build_optimizer, lr_at, set_lr
from tuneforge.train.tracking import METRICS_FILE, Tracker, plot_losses
from tuneforge.train.validate import validation_loss

log = logging.getLogger("tuneforge")


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    train_loss: float
    val_loss: float | None
    best_val_loss: float | None
    stopped_early: bool
    model: torch.nn.Module  # the trained model in memory (what was saved)


def train(cfg: RunConfig, show_progress: bool = True) -> TrainResult:
    validate_for_training(cfg)
    # Data first: a broken row fails in seconds, before the model is loaded.
    train_rows, val_rows = read_raw(cfg.data, cfg.train.seed)
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / METRICS_FILE).unlink(missing_ok=True)  # a fresh run starts a fresh metrics file
    seed_everything(cfg.train.seed)

    device = pick_device(cfg.train.device)
    autocast_dtype = torch.bfloat16 if _use_bf16(cfg.train.dtype, device) else None
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    data = tokenize_data(cfg.data, tokenizer, train_rows, val_rows)
    log.info("data: %s", data.summary())

    model = load_model(cfg.model, dtype=torch.float32, device=device, trust_remote_code=cfg.trust_remote_code)
    model = apply_method(model, cfg)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # frozen embeddings would otherwise cut the gradient path
    if cfg.data.packing:
        use_packed_attention(model)
    log.info("%s", parameter_report(model))
    optimizer = build_optimizer(model, cfg.train)
    trainable = [p for p in model.parameters() if p.requires_grad]

    t = cfg.train
    per_epoch = steps_per_epoch(len(data.train), t.batch_size, t.grad_accum)
    total_steps = t.max_steps or t.epochs * per_epoch
    pad_id = tokenizer.pad_token_id
    tracker = Tracker(run_dir, total_steps, show_progress=show_progress)
    tracker.log({"event": "start", "total_steps": total_steps, "train_examples": len(data.train),
                 "val_examples": len(data.val), "device": device, "method": cfg.method})

    step, epoch = 0, 0
    last_loss, val_loss, best_val, best_state, evals_without_gain = math.nan, None, math.inf, None, 0
    stopped_early = False
    model.train()
    while step < total_steps and not stopped_early:
        for micro_batches in epoch_steps(len(data.train), t.batch_size, t.grad_accum, t.seed, epoch):
            if step >= total_steps:
                break
            started = time.perf_counter()
            lr = lr_at(step, total_steps, t)
            set_lr(optimizer, lr)
            batches = [collate([data.train[i] for i in mb], cfg.data.packing, pad_id) for mb in micro_batches]
            step_loss, step_targets = accumulate_gradients(model, batches, device, autocast_dtype)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last_loss = step_loss
            elapsed = time.perf_counter() - started
            tokens = sum(b.num_tokens for b in batches)
            tracker.step(step_loss, lr, tokens / elapsed)
            if step % t.log_every == 0 or step == total_steps:
                tracker.log({"step": step, "epoch": epoch, "loss": step_loss, "lr": lr, "grad_norm": float(grad_norm),
                             "tokens": tokens, "target_tokens": step_targets, "tokens_per_s": tokens / elapsed,
                             "step_time_s": elapsed})

            if data.val and (step == total_steps or (t.eval_every and step % t.eval_every == 0)):
                val_loss = validation_loss(model, data.val, t.batch_size, cfg.data.packing, pad_id, device,
                                           autocast_dtype)
                tracker.log({"step": step, "val_loss": val_loss})
                tracker.message(f"step {step}: val_loss {val_loss:.4f}")
                if val_loss < best_val:
                    best_val, evals_without_gain = val_loss, 0
                    if t.early_stopping_patience:
                        best_state = trainable_state(model)
                else:
                    evals_without_gain += 1
                    if t.early_stopping_patience and evals_without_gain >= t.early_stopping_patience:
                        tracker.message(f"early stopping at step {step}: no val improvement in "
                                        f"{evals_without_gain} evaluations; keeping the best weights")
                        stopped_early = True
                        break
        epoch += 1
    tracker.close()

    if stopped_early and best_state is not None:
        load_trainable_state(model, best_state)
        val_loss = best_val
    if cfg.data.packing:
        use_standard_attention(model)  # what is saved must generate with ordinary attention
    meta = {"base_model": cfg.model, "method": cfg.method, "tuneforge_version": __version__, "steps": step,
            "val_loss": val_loss, "train_loss": last_loss}
    save_output(model, tokenizer, run_dir, meta)
    tracker.log({"event": "end", "step": step, "final_val_loss": val_loss, "stopped_early": stopped_early})
    plot_losses(run_dir)
    log.info("saved %s output to %s", cfg.method, run_dir)
    best = None if best_val == math.inf else best_val
    return TrainResult(run_dir, step, last_loss, val_loss, best, stopped_early, model.eval())


def accumulate_gradients(model, batches, device: str, autocast_dtype) -> tuple[float, int]:
    """Backward over a step's micro-batches; returns (the step's answer-token mean loss, its target count)."""
    step_targets = sum(b.num_targets for b in batches)
    step_loss = 0.0
    for batch in batches:
        with torch.autocast(device_type=device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            # Divide by the whole step's target count, not the micro-batch's: the step's loss is a mean over all its
            # answer tokens, so splitting a step into more micro-batches cannot change the gradient.
            loss = batch_loss_sum(model, batch.to(device)) / step_targets
        loss.backward()
        step_loss += loss.item()
    return step_loss, step_targets


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _use_bf16(requested: str, device: str) -> bool:
    if requested == "bfloat16":
        return True
    return requested == "auto" and native_bf16(device)

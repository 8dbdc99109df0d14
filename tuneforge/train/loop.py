"""THE training loop: one for every method, in named phases that read top to bottom.

    train ─► set_up ─► take_guard_baseline ─► train_epoch (optimizer_step ─► record_step ─► evaluate ─►
             save_checkpoint) ... ─► finish

`set_up` builds a `Run`: what every phase shares (config, data, model, optimizer, step plan, run log) and the one
thing that changes, `run.state` (what a checkpoint saves besides tensors). Each phase is a plain function of it.

config -> data (validated before any model loads) -> model (load -> method) -> steps -> output in the run directory.
Each optimizer step's loss is the mean over all answer tokens of the step, however the step is split into
micro-batches: every micro-batch's summed loss is divided by the step's total target count before backward.

A run can be killed at any instant and continued with `--resume` as if nothing happened: a checkpoint holds the
trainable weights, optimizer state, step and data position, best-so-far bookkeeping and every RNG state, and the
data order of an epoch is a pure function of (seed, epoch). The schema says which settings must match on resume.

Under torchrun the same loop runs in every process (train/distributed.py): each rank takes its share of every global
step's micro-batches, and only rank 0 writes metrics, checkpoints and the output.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml

from tuneforge import run_dir as layout
from tuneforge.config import RunConfig, data_sources, resume_differences, validate_for_training
from tuneforge.data.batching import (Batch, StepPlan, collate, collate_pairs, collate_unpaired, epoch_steps,
                                     merge_micro_batches, steps_in_epochs)
from tuneforge.data.fingerprint import changed_data_files, data_file_hashes
from tuneforge.data.formats import Example
from tuneforge.data.mixing import describe, epoch_pool, plan_shares
from tuneforge.data.prepare import PreparedData, read_raw, tokenize_data
from tuneforge.errors import ConfigError, DataError, OutputWriteError, Preempted, TrainingStopped, UserError
from tuneforge.model.attention import attention_paths, use_packed_attention, use_standard_attention
from tuneforge.model.families import family_line
from tuneforge.model.fused_lora import FusedGroup, fuse_lora, unfuse_lora
from tuneforge.model.load import load_tokenizer, native_bf16, pick_device
from tuneforge.method_registry import saves_whole_model
from tuneforge.model.methods import apply_method, load_base_model, parameter_report
from tuneforge.model.vocabulary import add_tokens, grow_embeddings
from tuneforge.model.stop_ids import keep_end_of_turn
from tuneforge.train import checkpoint as ckpt
from tuneforge.train import distributed
from tuneforge.train.experiment_trackers import check_available, start_trackers
from tuneforge.train.forward import AnswerTokenLossSum, causal_lm_of
from tuneforge.train.micro_batch_size import largest_row, micro_batch_tokens
from tuneforge.train.optim import build_optimizer, lr_at, set_lr
from tuneforge.train.run_log import RunLog, plot_losses
from tuneforge.train.selection import Evaluation, judge
from tuneforge.train.signals import StopRequests
from tuneforge.train.preference import PreferenceLossSum, attach_reference, objective_of, set_kl, stats_record
from tuneforge.train.validate import validation_by_source, validation_pairs
from tuneforge.version import __version__

log = logging.getLogger("tuneforge")

SPIKE_WINDOW = 50  # steps in the running mean that loss spikes are measured against


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs; saved as JSON in each checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    step_in_epoch: int = 0  # steps of the current epoch done (the data position)
    last_loss: float = math.nan
    val_loss: float | None = None
    best_val: float | None = None  # validation loss at the best evaluation
    best_score: float | None = None  # what "best" follows (lower is better): val loss, or -eval_metric
    evals_without_gain: int = 0
    bad_steps: int = 0  # consecutive non-finite steps
    spike_steps: int = 0  # consecutive spiking steps
    recent_losses: list[float] = field(default_factory=list)
    world_size: int = 1  # processes that trained it: a step's data depends on it
    guard_baseline: float | None = None  # the guarded source's validation loss at step 0
    data_files: dict[str, str] = field(default_factory=dict)  # sha256 of each data file: edits refuse a resume


@dataclass
class Run:
    """What the phases share. Built once by `set_up`; `state`, `best_weights` and `stopped_early` change."""

    cfg: RunConfig
    run_dir: Path
    world: distributed.World
    device: str
    autocast_dtype: torch.dtype | None
    tokenizer: object
    data: PreparedData
    model: torch.nn.Module  # the (wrapped) model: saving and generation use it
    fused: list[FusedGroup]  # LoRA projections running fused (train.fuse_lora), undone by `finish`
    loss_module: torch.nn.Module  # what forward/backward go through: DDP/FSDP-wrapped AnswerTokenLossSum (or the
    # preference objective's PreferenceLossSum)
    collate_fn: Callable[[list], Batch]  # a micro-batch's examples (or pairs) -> the model's inputs
    optimizer: torch.optim.Optimizer
    trainable: list[torch.nn.Parameter]
    lengths: list[int]
    step_plan: StepPlan
    micro_batch_tokens: int  # each rank's share of a step is re-laid out in packed rows of at most this; 0 = as planned
    pool_of: Callable[[int], list[int]] | None  # a data mix's examples of an epoch; None: every example once
    total_steps: int
    config_text: str
    resumed_from: Path | None
    log: RunLog
    state: TrainerState
    best_weights: dict[str, torch.Tensor] | None = None  # the best evaluation's trainable weights, when kept
    first_step: int = 0  # the step this attempt started at
    stopped_early: bool = False


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    tokens: int  # all tokens of the global step
    targets: int  # answer tokens of the global step (pairs, for a preference objective)
    seconds: float
    stop_requested: bool  # any rank got SIGTERM/SIGINT
    preference: dict[str, float] | None = None  # rewards, reward accuracy, margin, log-probabilities (step means)
    passes: int = 0  # forward/backward passes each rank made (micro-batches after train.micro_batch_tokens)

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    train_loss: float
    val_loss: float | None
    best_val_loss: float | None
    stopped_early: bool
    model: torch.nn.Module  # the trained model in memory (what was saved)


def train(cfg: RunConfig, show_progress: bool = True,
          rows: tuple[list[Example], list[Example]] | None = None,
          preflight: Callable[[list[int], tuple[int, ...]], None] | None = None) -> TrainResult:
    """`rows`: train and validation rows the caller already read with `read_raw` (the CLI does, before torch is
    imported); read here otherwise. `preflight`: called on the main process with the tokenized training examples'
    lengths and those of the largest micro-batch the run will form, before the model loads (the CLI prints its
    memory estimate for it)."""
    validate_for_training(cfg)
    check_available(cfg.train.report_to)
    # Data first: a broken row fails in seconds, before the model is loaded.
    train_rows, val_rows = rows if rows is not None else read_raw(cfg.data, cfg.train.seed, cfg.objective)
    device = pick_device(cfg.train.device)
    world = distributed.start(cfg.train.distributed, cfg.train.distributed_timeout_s, device)
    try:
        run = set_up(cfg, show_progress and world.is_main, train_rows, val_rows, device, world, preflight)
        with StopRequests() as stop, run.log:  # the log closes (W&B and MLflow runs end) however the loop ends
            take_guard_baseline(run)
            while run.state.step < run.total_steps and not run.stopped_early:
                train_epoch(run, stop)
        return finish(run)
    except BaseException as exc:
        if world.is_main:
            _record_failed_attempt(Path(cfg.output_dir), exc)
        raise
    finally:
        distributed.stop(world)


# ---------------------------------------------------------------------------------------------------------------------
# Set up: run directory, data, model, optimizer, step plan; the checkpoint's state on resume.


def set_up(cfg: RunConfig, show_progress: bool, train_rows: list[Example], val_rows: list[Example], device: str,
           world: distributed.World, preflight: Callable[[list[int], tuple[int, ...]], None] | None = None) -> Run:
    run_dir = Path(cfg.output_dir)
    data_files = data_file_hashes(cfg.data)
    resume_from = find_resume_point(cfg, run_dir, data_files)
    config_text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    if world.is_main:
        layout.write_config(run_dir, config_text)
        ckpt.remove_partial_checkpoints(run_dir)
    seed_everything(cfg.train.seed)  # the same on every rank: identical initial weights everywhere

    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    added_ids = add_tokens(tokenizer, cfg.added_tokens)  # before tokenizing: the data may use them
    data = tokenize_data(cfg.data, tokenizer, train_rows, val_rows, cfg.objective)
    if world.is_main:
        log.info("data: %s", data.summary())
    guard = cfg.train.guard.source
    if guard and not any(ex.origin == guard for ex in data.val):
        raise DataError(f"train.guard.source: no validation examples of {guard!r} are left after tokenization")
    t = cfg.train
    lengths = [ex.packed_length for ex in data.train]
    # One plan for the whole world: a global step is grad_accum micro-batches per rank.
    step_plan = StepPlan(t.batch_size, t.grad_accum * world.size, t.tokens_per_batch, cfg.data.packing,
                         cfg.data.group_by_length, t.seed)
    row_tokens, row_line = micro_batch_tokens(cfg, lengths, step_plan, world.size)
    # Each rank measured its own free memory: all take the smallest budget, so all make the same passes.
    row_tokens = distributed.all_reduce_min(world, row_tokens)
    if world.is_main:
        log.info("%s", row_line)
        if preflight is not None:
            preflight(lengths, tuple(lengths[i] for i in largest_row(lengths, step_plan, world.size, row_tokens)))

    autocast_dtype = torch.bfloat16 if _use_bf16(t.dtype, device) else None
    model, fused = _prepare_model(cfg, device, world, tokenizer, added_ids)
    reference_s = None
    if cfg.objective == "sft":
        loss, collate_fn = AnswerTokenLossSum(model), partial(collate, packing=cfg.data.packing,
                                                              pad_id=tokenizer.pad_token_id)
    else:
        objective = objective_of(cfg)
        if objective.uses_reference:  # the model as it starts, before any checkpoint's weights go in
            reference_s = attach_reference(cfg, run_dir, model, data.train, data.val, device, world, autocast_dtype)
        loss = PreferenceLossSum(model, objective)
        collate_fn = collate_unpaired if cfg.objective == "kto" else partial(collate_pairs,
                                                                             prompt_targets=objective.nll)
    loaded = None
    if resume_from is not None:
        loaded = ckpt.load_checkpoint(resume_from)
        # Into the whole model, before FSDP shards it: every rank reads the same checkpoint.
        ckpt.load_trainable_state(model, loaded["weights"])
    loss_module = distributed.wrap(world, loss, device)
    # Training mode for every module: from_pretrained hands the base model over in eval mode, and its decoder layers
    # only recompute activations (train.gradient_checkpointing) and drop out in training mode. Validation and
    # generation switch to eval mode and back.
    loss_module.train()
    optimizer = build_optimizer(model, cfg.train)  # after wrapping: under FSDP it holds the shards

    pool_of, shares = None, []
    if isinstance(cfg.data.train, list):
        shares = plan_shares(data_sources(cfg.data.train), [ex.origin for ex in data.train])
        pool_of = lambda epoch: epoch_pool(shares, t.seed, epoch)  # noqa: E731
        if world.is_main:
            log.info("data mix per epoch: %s", describe(shares))
    total_steps = t.max_steps or steps_in_epochs(lengths, step_plan, t.epochs, pool_of)

    state, best_weights = TrainerState(), None
    if loaded is not None:
        state, best_weights = _restore(loaded, resume_from, world, loss_module, optimizer)
        if world.is_main:
            layout.truncate_metrics(run_dir, state.step)
            log.info("resuming from %s (step %d of %d)", resume_from, state.step, total_steps)
    elif world.is_main:
        layout.start_metrics(run_dir)
    state.world_size, state.data_files = world.size, data_files
    if world.is_main:
        layout.write_status(run_dir, "running", new_attempt=True, step=state.step, total_steps=total_steps)
    run_log = RunLog(run_dir, total_steps, start_step=state.step, show_progress=show_progress, write=world.is_main,
                     trackers=start_trackers(t.report_to, run_dir, cfg.to_dict(), state.step) if world.is_main else [])
    run_log.log({"event": "resume" if resume_from else "start", "step": state.step, "total_steps": total_steps,
                 "train_examples": len(data.train), "val_examples": len(data.val), "device": device,
                 "method": cfg.method, "objective": cfg.objective, "processes": world.size,
                 "distributed": world.mode,
                 **({"examples_per_epoch_by_source": {s.name: s.count for s in shares}} if pool_of else {}),
                 **({"reference_pass_s": round(reference_s, 3)} if reference_s else {})})
    return Run(cfg, run_dir, world, device, autocast_dtype, tokenizer, data, model, fused, loss_module, collate_fn,
               optimizer, [p for p in model.parameters() if p.requires_grad], lengths, step_plan, row_tokens,
               pool_of, total_steps, config_text, resume_from, run_log, state, best_weights, first_step=state.step)


def _prepare_model(cfg: RunConfig, device: str, world: distributed.World, tokenizer,
                   added_ids: list[int]) -> tuple[torch.nn.Module, list[FusedGroup]]:
    """load -> rows for added tokens -> method -> memory and speed options: the model the optimizer will train, and
    its fused LoRA groups (undone before the output is saved)."""
    model = load_base_model(cfg, device)  # 4-bit for qlora, float32 otherwise
    if added_ids:
        grow_embeddings(model, tokenizer, fresh=True)
    model = apply_method(model, cfg, added_ids)
    # FSDP replaces each module's weights by shards of its own: a fused buffer of several modules cannot follow.
    fused = fuse_lora(model) if cfg.train.fuse_lora and cfg.train.distributed != "fsdp" else []
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # frozen embeddings would otherwise cut the gradient path
    if cfg.data.packing:
        use_packed_attention(model)
    if cfg.train.compile:
        # Per decoder layer, in place: parameter names and saving stay as they are, and one compiled graph serves
        # every layer. dynamic=True because packed rows change length every step. With frozen embeddings the first
        # layer's input would not require grad and every later one's would: dynamo guards on that and compiles the
        # first layer again (13 s of the test's 56 on the tiny model); a grad on the embeddings' output costs one
        # layer's input gradient.
        if not cfg.train.gradient_checkpointing:  # else done above
            model.enable_input_require_grads()
        for layer in causal_lm_of(model).get_decoder().layers:
            layer.compile(dynamic=True)
    if world.is_main:
        log.info("%s", family_line(model.config))
        log.info("%s", attention_paths(model.config, cfg.data.packing))
        log.info("%s", parameter_report(model))
        if fused:
            log.info("LoRA: %d projections run as %d fused groups (train.fuse_lora)",
                     sum(len(g.members) for g in fused), len(fused))
    return model, fused


def find_resume_point(cfg: RunConfig, run_dir: Path, data_files: dict[str, str]) -> Path | None:
    """The checkpoint to continue, or None for a fresh start; refused (one line naming the key or the file) when
    this run's settings or data would not continue the checkpoint's run."""
    latest = ckpt.latest_checkpoint(run_dir)
    if cfg.train.resume == "never":
        if latest is not None:
            raise ConfigError(
                f"output_dir {run_dir} already holds checkpoints of an earlier run ({latest.name}); pass --resume "
                f"(train.resume=auto) to continue it, or choose another output_dir")
        return None
    if latest is None:
        log.info("no checkpoint in %s: starting from step 0", run_dir)
        return None
    refused, allowed = resume_differences(layout.read_config(latest) or {}, cfg.to_dict())
    if refused:
        key, before, now = refused[0]
        raise ConfigError(f"resume: {key} is {now!r} but checkpoint {latest.name} was trained with {before!r}; "
                          f"use the same {key} or another output_dir")
    edited = changed_data_files(ckpt.read_trainer_state(latest).get("data_files", {}), data_files)
    if edited:
        raise ConfigError(f"resume: data file {edited[0]} changed since checkpoint {latest.name} was written (its "
                          f"content hash differs); restore it, or train afresh in another output_dir")
    for key, before, now in allowed:
        log.info("resume: %s changed from %r to %r (allowed)", key, before, now)
    return latest


def _restore(loaded: dict, path: Path, world: distributed.World, loss_module,
             optimizer) -> tuple[TrainerState, dict | None]:
    """The optimizer, schedule and data position, RNG and best-so-far of a checkpoint (weights are already in)."""
    saved_world = loaded["state"].get("world_size", 1)
    if saved_world != world.size:
        raise ConfigError(f"resume: checkpoint {path.name} was trained by {saved_world} process(es), this run has "
                          f"{world.size}; a step's data depends on it, so resume with {saved_world}")
    distributed.load_optimizer(world, loss_module, optimizer, loaded["optimizer"])
    fields = {k: v for k, v in loaded["state"].items() if k in TrainerState.__dataclass_fields__}
    ckpt.restore_rng(loaded["rng"], loaded["state"])
    distributed.restore_rng(world, loaded["rng"])
    return TrainerState(**fields), loaded["best_weights"]


def take_guard_baseline(run: Run) -> None:
    """The forgetting guard measures against the model before any update; that model is also the fallback "best".
    A resumed run has its baseline in the checkpoint."""
    guard = run.cfg.train.guard.source
    if not guard or run.state.guard_baseline is not None:
        return
    baseline = evaluate(run)
    run.state.best_val, run.state.best_score = baseline.val_loss, baseline.score
    run.state.guard_baseline = baseline.by_source[guard]
    run.best_weights = distributed.gather_trainable(run.world, run.model, run.loss_module)


# ---------------------------------------------------------------------------------------------------------------------
# The steps of one epoch.


def train_epoch(run: Run, stop: StopRequests) -> None:
    """The rest of the current epoch's steps (all of them, unless resumed mid-epoch), each followed by the
    evaluations and checkpoints that are due; ends early at the last step, at early stopping or at a stop signal."""
    state, t = run.state, run.cfg.train
    plan = epoch_steps(run.lengths, run.step_plan, state.epoch, run.pool_of(state.epoch) if run.pool_of else None)
    # On resume the first `step_in_epoch` steps of this epoch were already taken: the data position.
    for micro_batches in plan[state.step_in_epoch:]:
        if state.step >= run.total_steps:
            return
        result = optimizer_step(run, micro_batches, stop)
        record_step(run, result)
        if run.data.val and (state.step == run.total_steps or (t.eval_every and state.step % t.eval_every == 0)):
            _act_on_evaluation(run, evaluate(run))
        save_due = state.step == run.total_steps or (t.save_every and state.step % t.save_every == 0)
        if save_due or run.stopped_early or result.stop_requested:
            saved = save_checkpoint(run)
        if result.stop_requested:
            run.log.close()
            raise Preempted(f"stopped by signal at step {state.step}; checkpoint {saved}; "
                            f"continue with: tuneforge train {layout.config_path(run.run_dir)} --resume")
        if run.stopped_early:
            return
    state.epoch, state.step_in_epoch = state.epoch + 1, 0


def optimizer_step(run: Run, micro_batches: list[list[int]], stop: StopRequests) -> StepResult:
    """One optimizer step over a global step's micro-batches: forward/backward on this rank's share, clip, update
    (skipped when the loss or gradient is not finite)."""
    world, state, t = run.world, run.state, run.cfg.train
    started = time.perf_counter()
    lr = lr_at(state.step, run.total_steps, t)
    set_lr(run.optimizer, lr)
    # Each rank's share of the step, re-laid out in as few packed rows as the micro-batch budget allows; every rank
    # knows every share, so all make as many passes as the largest (DDP's and FSDP's collectives line up).
    shares = [merge_micro_batches(share, run.lengths, run.micro_batch_tokens)
              for share in distributed.shares(world, micro_batches)]
    batches = [run.collate_fn([run.data.train[i] for i in mb]) for mb in shares[world.rank]]
    # The loss divisor: answer tokens (pairs) of the whole global step, summed over ranks before any backward.
    step_targets, nll_targets = distributed.all_reduce_sum(
        world, [sum(b.divisor_count for b in batches), sum(b.num_nll_targets for b in batches)])
    step_targets = int(step_targets)
    for batch in batches:  # ORPO: its NLL term is a token mean over the step, inside a mean over pairs
        batch.nll_scale = step_targets / nll_targets if nll_targets else 0.0
    passes = max(len(share) for share in shares)
    # A rank left without micro-batches in a short last step still runs a pass (weighted 0).
    filler = batches[0] if batches else run.collate_fn([run.data.train[i] for i in micro_batches[0]])
    if run.cfg.objective == "kto":  # its KL term: one estimate over the whole step, before any of its losses
        set_kl(run.loss_module, batches, passes, world, run.device, run.autocast_dtype, filler)
    stats: list[torch.Tensor] = []
    step_loss = accumulate_gradients(run.loss_module, batches, run.device, run.autocast_dtype, step_targets, passes,
                                     world, filler, stats)
    max_norm = t.max_grad_norm if t.max_grad_norm > 0 else math.inf
    grad_norm = distributed.total_norm(torch.nn.utils.clip_grad_norm_(run.trainable, max_norm))
    # One all-reduce per step: the step's loss over all ranks, whether any rank got a stop signal, the preference
    # statistics (every rank has one sum per statistic: a rank without micro-batches adds zeros).
    stat_sums = torch.stack(stats).sum(0).tolist() if stats else []
    step_loss, stop_votes, *stat_sums = distributed.all_reduce_sum(world, [step_loss, float(stop.requested),
                                                                           *stat_sums])
    result = StepResult(step_loss, grad_norm, lr, sum(b.num_tokens for b in batches) * world.size, step_targets,
                        0.0, stop_votes > 0,  # tokens: this rank's, scaled to the world
                        stats_record(stat_sums, kto=run.cfg.objective == "kto") if stat_sums else None, passes)
    if result.finite:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if state.step == run.first_step:  # optimizer state exists from the first update on
        run.log.log({"step": state.step + 1,
                     "memory_per_process": distributed.memory_per_rank(world, run.model, run.optimizer)})
    state.step, state.step_in_epoch = state.step + 1, state.step_in_epoch + 1
    result.seconds = time.perf_counter() - started
    return result


def accumulate_gradients(loss_module, batches, device: str, autocast_dtype, step_targets: int | None = None,
                         passes: int | None = None, world: distributed.World | None = None,
                         filler=None, stats: list | None = None) -> float:
    """Backward over this rank's micro-batches of a step; returns its part of the step's answer-token mean loss.

    `step_targets`: answer tokens (pairs) in the whole (global) step; `passes`: forward/backward passes every rank
    makes (ranks with fewer micro-batches run `filler` with weight 0, so that DDP's and FSDP's collectives line up).
    `stats`: a preference objective's statistics of each micro-batch are appended to it (zeros for a filler)."""
    world = world or distributed.World("none")
    step_targets = step_targets if step_targets is not None else sum(b.divisor_count for b in batches)
    passes = passes if passes is not None else len(batches)
    # DDP and FSDP average gradients over ranks; the world-size factor turns that average back into the sum.
    scale = world.size / step_targets
    step_loss = 0.0
    for i in range(passes):
        real = i < len(batches)
        batch = batches[i] if real else filler
        with distributed.gradient_sync(world, loss_module, last_micro_batch=i == passes - 1), torch.autocast(
                device_type=device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            # Divide by the whole step's target count, not the micro-batch's: the step's loss is a mean over all its
            # answer tokens, so splitting a step into more micro-batches (or ranks) cannot change the gradient.
            out = loss_module(batch.to(device))
            loss, batch_stats = out if isinstance(out, tuple) else (out, None)
            loss = loss * (scale if real else 0.0)
            loss.backward()
        if batch_stats is not None and stats is not None:
            stats.append(batch_stats.cpu() * float(real))
        if real:
            step_loss += loss.item() / world.size
    return step_loss


def record_step(run: Run, result: StepResult) -> None:
    """The step's metrics line and progress bar; the NaN guard and the loss-spike guard."""
    state, t = run.state, run.cfg.train
    run.log.step(result.loss, result.lr, result.tokens / result.seconds)
    if result.finite:
        state.bad_steps, state.last_loss = 0, result.loss
        _check_loss_spike(state, result.loss, t, run.run_dir)
        if state.step % t.log_every == 0 or state.step == run.total_steps:
            counted = {"pairs": result.targets, **result.preference} if result.preference is not None else \
                {"target_tokens": result.targets}
            run.log.log({"step": state.step, "epoch": state.epoch, "loss": result.loss, "lr": result.lr,
                         "grad_norm": result.grad_norm, "tokens": result.tokens, **counted,
                         "micro_batches": result.passes, "tokens_per_s": result.tokens / result.seconds,
                         "step_time_s": result.seconds})
        return
    # A NaN/Inf step changes nothing: its update is skipped, the data and schedule move on.
    state.bad_steps += 1
    run.log.log({"step": state.step, "skipped_step": True, "loss": _json_float(result.loss),
                 "grad_norm": _json_float(result.grad_norm), "lr": result.lr})
    run.log.message(f"step {state.step}: non-finite loss or gradient norm, update skipped ({state.bad_steps} in a "
                    f"row)")
    if state.bad_steps > t.max_bad_steps:
        raise TrainingStopped(
            f"stopped at step {state.step}: {state.bad_steps} non-finite steps in a row "
            f"(train.max_bad_steps={t.max_bad_steps}); no NaN weights were saved; last checkpoint: "
            f"{ckpt.latest_checkpoint(run.run_dir) or 'none'}")


def _check_loss_spike(state: TrainerState, loss: float, t, run_dir: Path) -> None:
    if t.loss_spike_factor > 0 and len(state.recent_losses) >= 5:
        mean = sum(state.recent_losses) / len(state.recent_losses)
        state.spike_steps = state.spike_steps + 1 if loss > t.loss_spike_factor * mean else 0
        if state.spike_steps >= t.loss_spike_patience:
            raise TrainingStopped(
                f"stopped at step {state.step}: loss {loss:.4f} stayed above {t.loss_spike_factor}x its running mean "
                f"{mean:.4f} for {state.spike_steps} steps; last checkpoint: "
                f"{ckpt.latest_checkpoint(run_dir) or 'none'}")
        if state.spike_steps:
            return  # spiking losses do not pull the running mean up
    state.recent_losses = (state.recent_losses + [loss])[-SPIKE_WINDOW:]


# ---------------------------------------------------------------------------------------------------------------------
# Evaluate and checkpoint.


def evaluate(run: Run) -> Evaluation:
    """Validation loss (overall and per source; a preference objective's loss, rewards and reward accuracy over the
    held-out pairs), the generation metric if asked for, and the score that "best" follows (lower is better)."""
    t, state = run.cfg.train, run.state
    if run.cfg.objective == "sft":
        overall, by_source = validation_by_source(run.model, run.data.val, t.batch_size, run.cfg.data.packing,
                                                  run.tokenizer.pad_token_id, run.device, run.autocast_dtype,
                                                  run.world, run.loss_module, run.micro_batch_tokens)
        record = {"step": state.step, "val_loss": overall,
                  **({"val_loss_by_source": by_source} if len(by_source) > 1 or t.guard.source else {})}
        shown = "".join(f", {name} {loss:.4f}" for name, loss in by_source.items()) if len(by_source) > 1 else ""
        score = overall
    else:
        overall, sums = validation_pairs(run.loss_module, run.data.val, t.batch_size, run.collate_fn, run.device,
                                         run.autocast_dtype, run.world)
        by_source = {}
        record = {"step": state.step, "val_loss": overall, **stats_record(sums, "val_", run.cfg.objective == "kto")}
        shown = f", reward accuracy {record['val_reward_accuracy']:.3f}, margin {record['val_reward_margin']:.4f}"
        score = -record["val_reward_accuracy"] if t.early_stopping_metric == "reward_accuracy" else overall
    if t.eval_metric:
        # What the model writes, not only how well it predicts the reference: the two can disagree. (The one place
        # the loop reaches into eval/: generation and metrics live there for `tuneforge eval` too.)
        from tuneforge.eval.during_training import sample_metric

        value = sample_metric(run.model, run.tokenizer, run.data.val_rows, t.eval_metric, t.eval_metric_sample,
                              t.eval_metric_max_new_tokens, seed=t.seed, batch_size=t.batch_size)
        record[f"val_{t.eval_metric}"] = value
        shown += f", {t.eval_metric} {value:.4f}"
        if t.early_stopping_metric == "eval_metric":
            score = -value
    run.log.log(record)
    run.log.message(f"step {state.step}: val_loss {overall:.4f}{shown}")
    return Evaluation(state.step, overall, by_source, score)


def _act_on_evaluation(run: Run, evaluation: Evaluation) -> None:
    """What `judge` decided: keep these weights as the best, and whether the run stops here."""
    run.state.val_loss = evaluation.val_loss
    verdict = judge(run.state, evaluation, run.cfg.train)
    if verdict.record:
        run.log.log(verdict.record)
    if verdict.stop_message:
        run.log.message(verdict.stop_message)
        run.stopped_early = True
    if verdict.improved and (run.cfg.train.early_stopping_patience or run.cfg.train.guard.source):
        run.best_weights = distributed.gather_trainable(run.world, run.model, run.loss_module)


def save_checkpoint(run: Run) -> Path:
    """Every rank takes part in gathering (FSDP shards, RNG states); rank 0 writes; the others wait for it."""
    world, state = run.world, run.state
    weights = distributed.gather_trainable(world, run.model, run.loss_module)
    optimizer_state = distributed.gather_optimizer(world, run.loss_module, run.optimizer)
    rank_rng = distributed.gather_rng(world)
    saved = layout.checkpoint_dir(run.run_dir, state.step)
    if world.is_main:
        saved = ckpt.save_checkpoint(run.run_dir, state.step, weights, optimizer_state, asdict(state),
                                     run.config_text, run.cfg.train.keep_last, run.best_weights, rank_rng)
        run.log.log({"step": state.step, "checkpoint": saved.name})
        layout.write_status(run.run_dir, "running", step=state.step, total_steps=run.total_steps)
    distributed.barrier(world)
    return saved


# ---------------------------------------------------------------------------------------------------------------------
# Finish: the best weights back in, the output saved, the status final.


def finish(run: Run) -> TrainResult:
    world, state, model = run.world, run.state, run.model
    if run.stopped_early and run.best_weights is not None:
        # Under FSDP only rank 0 gathered the best weights: it spreads them to the others' shards.
        distributed.load_trainable(world, model, run.loss_module, run.best_weights)
        state.val_loss = state.best_val
    if run.cfg.data.packing:
        use_standard_attention(model)  # what is saved must generate with ordinary attention
    unfuse_lora(run.fused)  # PEFT's own modules again, each with its own weight: what callers merge and generate with
    if saves_whole_model(run.cfg.method):  # a full model's generation config: stop at the trained end of turn
        keep_end_of_turn(causal_lm_of(model).generation_config, run.tokenizer)
    meta = {"base_model": run.cfg.model, "method": run.cfg.method, "objective": run.cfg.objective,
            "tuneforge_version": __version__,
            "steps": state.step, "val_loss": state.val_loss, "train_loss": _json_float(state.last_loss)}
    full_state = distributed.gather_full_model(world, run.loss_module)  # FSDP: the shards, gathered on rank 0
    memory = distributed.memory_per_rank(world, model, run.optimizer)
    with distributed.root_unsharded(world, run.loss_module):
        if world.is_main:
            ckpt.save_output(model, run.tokenizer, run.run_dir, meta, full_state)
        distributed.barrier(world)
    if world.is_main:
        run.log.log({"event": "end", "step": state.step, "final_val_loss": state.val_loss,
                     "stopped_early": run.stopped_early, "memory_per_process": memory})
        layout.write_status(run.run_dir, "finished", step=state.step, total_steps=run.total_steps,
                            val_loss=state.val_loss, stopped_early=run.stopped_early)
        try:
            plot_losses(run.run_dir)
        except OSError as exc:  # the curve is a convenience; the weights are already safe on disk
            log.warning("could not write the loss plot: %s", exc)
        log.info("saved %s output to %s", run.cfg.method, run.run_dir)
    distributed.barrier(world)
    return TrainResult(run.run_dir, state.step, state.last_loss, state.val_loss, state.best_val, run.stopped_early,
                       model.eval())


def _record_failed_attempt(run_dir: Path, exc: BaseException) -> None:
    """status.json says how this attempt ended: 'stopped' (a signal or Ctrl-C: resumable) or 'failed' (with the
    error's line). Only a status this process wrote is changed: an error before the run started leaves an earlier
    run's status as it was."""
    status = layout.read_status(run_dir)
    if status is None or status.get("pid") != os.getpid() or status.get("state") != "running":
        return
    stopped = isinstance(exc, (Preempted, KeyboardInterrupt))
    error = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    try:
        layout.write_status(run_dir, "stopped" if stopped else "failed",
                            error=error.splitlines()[0] if error else None)
    except OutputWriteError:
        pass  # the disk that failed the run may fail this too; the original error is what the user must see


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _use_bf16(requested: str, device: str) -> bool:
    if requested == "bfloat16":
        return True
    return requested == "auto" and native_bf16(device)

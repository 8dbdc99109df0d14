"""THE training loop: one function for every method, readable top to bottom.

config -> data (validated before any model loads) -> model (load -> method) -> steps -> output in the run directory.
Each optimizer step's loss is the mean over all answer tokens of the step, however the step is split into
micro-batches: every micro-batch's summed loss is divided by the step's total target count before backward.

A run can be killed at any instant and continued with `--resume` as if nothing happened: a checkpoint holds the
trainable weights, optimizer state, step and data position, best-so-far bookkeeping and every RNG state, and the
data order of an epoch is a pure function of (seed, epoch).

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
from pathlib import Path

import numpy as np
import torch
import yaml

from tuneforge import __version__
from tuneforge.config import RunConfig, data_sources, validate_for_training
from tuneforge.data.batching import StepPlan, collate, epoch_steps, steps_in_epochs
from tuneforge.data.formats import Example
from tuneforge.data.mixing import describe, epoch_pool, plan_shares
from tuneforge.data.prepare import read_raw, tokenize_data
from tuneforge.errors import ConfigError, DataError, OutputWriteError, Preempted, TrainingStopped, UserError
from tuneforge.model.attention import use_packed_attention, use_standard_attention
from tuneforge.model.load import load_tokenizer, native_bf16, pick_device
from tuneforge.model.methods import apply_method, load_base_model, parameter_report
from tuneforge.train import checkpoint as ckpt
from tuneforge.train import distributed
from tuneforge.train.forward import AnswerTokenLossSum, causal_lm_of
from tuneforge.train.optim import build_optimizer, lr_at, set_lr
from tuneforge.train.selection import Evaluation, judge
from tuneforge.train.signals import StopRequests
from tuneforge.train.trackers import check_available, start_trackers
from tuneforge.train.tracking import METRICS_FILE, Tracker, plot_losses, read_status, truncate_metrics, write_status
from tuneforge.train.validate import validation_by_source

log = logging.getLogger("tuneforge")

SPIKE_WINDOW = 50  # steps in the running mean that loss spikes are measured against
# Settings a resumed run must share with its checkpoint: they decide the weights' shapes or the data stream.
RESUME_MUST_MATCH = ("model", "method", "lora.r", "lora.target_modules", "qlora.quant_type", "adapter.placement",
                     "adapter.reduction_factor", "adapter.bottleneck_dim", "prefix.num_virtual_tokens",
                     "prompt.num_virtual_tokens", "data.train", "data.format",
                     "data.max_length", "data.packing", "data.group_by_length", "train.seed", "train.batch_size",
                     "train.tokens_per_batch", "train.grad_accum")


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
          rows: tuple[list[Example], list[Example]] | None = None) -> TrainResult:
    """`rows`: train and validation rows the caller already read with `read_raw` (the CLI does, before torch is
    imported); read here otherwise."""
    validate_for_training(cfg)
    check_available(cfg.train.report_to)
    # Data first: a broken row fails in seconds, before the model is loaded.
    train_rows, val_rows = rows if rows is not None else read_raw(cfg.data, cfg.train.seed)
    device = pick_device(cfg.train.device)
    world = distributed.start(cfg.train.distributed, cfg.train.distributed_timeout_s, device)
    try:
        return _train(cfg, show_progress and world.is_main, train_rows, val_rows, device, world)
    except BaseException as exc:
        if world.is_main:
            _record_failed_attempt(Path(cfg.output_dir), exc)
        raise
    finally:
        distributed.stop(world)


def _record_failed_attempt(run_dir: Path, exc: BaseException) -> None:
    """status.json says how this attempt ended: 'stopped' (a signal or Ctrl-C: resumable) or 'failed' (with the
    error's line). Only a status this process wrote is changed: an error before the run started leaves an earlier
    run's status as it was."""
    status = read_status(run_dir)
    if status is None or status.get("pid") != os.getpid() or status.get("state") != "running":
        return
    stopped = isinstance(exc, (Preempted, KeyboardInterrupt))
    error = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    try:
        write_status(run_dir, "stopped" if stopped else "failed", error=error.splitlines()[0] if error else None)
    except OutputWriteError:
        pass  # the disk that failed the run may fail this too; the original error is what the user must see


def _train(cfg: RunConfig, show_progress: bool, train_rows: list[Example], val_rows: list[Example], device: str,
           world: distributed.World) -> TrainResult:
    run_dir = Path(cfg.output_dir)
    resume_from = _find_resume_point(cfg, run_dir)
    config_text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_text, encoding="utf-8")
        ckpt.remove_partial_checkpoints(run_dir)
    seed_everything(cfg.train.seed)  # the same on every rank: identical initial weights everywhere

    autocast_dtype = torch.bfloat16 if _use_bf16(cfg.train.dtype, device) else None
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    data = tokenize_data(cfg.data, tokenizer, train_rows, val_rows)
    if world.is_main:
        log.info("data: %s", data.summary())

    model = load_base_model(cfg, device)  # 4-bit for qlora, float32 otherwise
    model = apply_method(model, cfg)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # frozen embeddings would otherwise cut the gradient path
    if cfg.data.packing:
        use_packed_attention(model)
    if cfg.train.compile:
        # Per decoder layer, in place: parameter names and saving stay as they are, and one compiled graph serves
        # every layer. dynamic=True because packed rows change length every step.
        for layer in causal_lm_of(model).get_decoder().layers:
            layer.compile(dynamic=True)
    if world.is_main:
        log.info("%s", parameter_report(model))
    state, best_state, loaded = TrainerState(), None, None
    if resume_from is not None:
        loaded = ckpt.load_checkpoint(resume_from)
        # Into the whole model, before FSDP shards it: every rank reads the same checkpoint.
        ckpt.load_trainable_state(model, loaded["weights"])
    loss_module = distributed.wrap(world, AnswerTokenLossSum(model), device)
    optimizer = build_optimizer(model, cfg.train)  # after wrapping: under FSDP it holds the shards
    trainable = [p for p in model.parameters() if p.requires_grad]

    t = cfg.train
    lengths = [len(ex.input_ids) for ex in data.train]
    # One plan for the whole world: a global step is grad_accum micro-batches per rank.
    step_plan = StepPlan(t.batch_size, t.grad_accum * world.size, t.tokens_per_batch, cfg.data.packing,
                         cfg.data.group_by_length, t.seed)
    pool_of = None  # one source: every example once per epoch
    if isinstance(cfg.data.train, list):
        shares = plan_shares(data_sources(cfg.data.train), [ex.origin for ex in data.train])
        pool_of = lambda epoch: epoch_pool(shares, t.seed, epoch)  # noqa: E731
        if world.is_main:
            log.info("data mix per epoch: %s", describe(shares))
    total_steps = t.max_steps or steps_in_epochs(lengths, step_plan, t.epochs, pool_of)
    pad_id = tokenizer.pad_token_id
    if loaded is not None:
        state, best_state = _restore(loaded, resume_from, world, loss_module, optimizer)
        if world.is_main:
            truncate_metrics(run_dir, state.step)
            log.info("resuming from %s (step %d of %d)", resume_from, state.step, total_steps)
    elif world.is_main:
        (run_dir / METRICS_FILE).unlink(missing_ok=True)  # a fresh run starts a fresh metrics file
    state.world_size = world.size
    if world.is_main:
        write_status(run_dir, "running", new_attempt=True, step=state.step, total_steps=total_steps)
    tracker = Tracker(run_dir, total_steps, start_step=state.step, show_progress=show_progress,
                      write=world.is_main,
                      trackers=start_trackers(t.report_to, run_dir, cfg.to_dict(), state.step) if world.is_main else [])
    tracker.log({"event": "resume" if resume_from else "start", "step": state.step, "total_steps": total_steps,
                 "train_examples": len(data.train), "val_examples": len(data.val), "device": device,
                 "method": cfg.method, "processes": world.size, "distributed": world.mode,
                 **({"examples_per_epoch_by_source": {s.name: s.count for s in shares}} if pool_of else {})})

    def validate() -> Evaluation:
        """Validation loss (overall and per source), the generation metric if asked for, and the score that "best"
        follows (lower is better)."""
        overall, by_source = validation_by_source(model, data.val, t.batch_size, cfg.data.packing, pad_id, device,
                                                  autocast_dtype, world, loss_module)
        record = {"step": state.step, "val_loss": overall,
                  **({"val_loss_by_source": by_source} if len(by_source) > 1 or guard else {})}
        shown = "".join(f", {name} {loss:.4f}" for name, loss in by_source.items()) if len(by_source) > 1 else ""
        score = overall
        if t.eval_metric:
            # What the model writes, not only how well it predicts the reference: the two can disagree. (The one
            # place the loop reaches into eval/: generation and metrics live there for `tuneforge eval` too.)
            from tuneforge.eval.during_training import sample_metric

            value = sample_metric(model, tokenizer, data.val_rows, t.eval_metric, t.eval_metric_sample,
                                  t.eval_metric_max_new_tokens, seed=t.seed, batch_size=t.batch_size)
            record[f"val_{t.eval_metric}"] = value
            shown += f", {t.eval_metric} {value:.4f}"
            if t.early_stopping_metric == "eval_metric":
                score = -value
        tracker.log(record)
        tracker.message(f"step {state.step}: val_loss {overall:.4f}{shown}")
        return Evaluation(state.step, overall, by_source, score)

    guard = t.guard.source
    if guard and not any(ex.origin == guard for ex in data.val):
        raise DataError(f"train.guard.source: no validation examples of {guard!r} are left after tokenization")
    keep_best = bool(t.early_stopping_patience or guard)
    if guard and state.guard_baseline is None:
        # The forgetting guard measures against the model before any update; that model is also the fallback "best".
        baseline = validate()
        state.best_val, state.best_score = baseline.val_loss, baseline.score
        state.guard_baseline = baseline.by_source[guard]
        best_state = distributed.gather_trainable(world, model, loss_module)

    def checkpoint() -> Path:
        # Every rank takes part in gathering (FSDP shards, RNG states); rank 0 writes; the others wait for it.
        weights = distributed.gather_trainable(world, model, loss_module)
        optimizer_state = distributed.gather_optimizer(world, loss_module, optimizer)
        rank_rng = distributed.gather_rng(world)
        saved = ckpt.checkpoints_root(run_dir) / ckpt.checkpoint_name(state.step)
        if world.is_main:
            saved = ckpt.save_checkpoint(run_dir, state.step, weights, optimizer_state, asdict(state), config_text,
                                         t.keep_last, best_state, rank_rng)
            tracker.log({"step": state.step, "checkpoint": saved.name})
            write_status(run_dir, "running", step=state.step, total_steps=total_steps)
        distributed.barrier(world)
        return saved

    stopped_early, first_step = False, state.step
    loss_module.train()
    with StopRequests() as stop, tracker:  # the tracker closes (W&B and MLflow runs end) however the loop ends
        while state.step < total_steps and not stopped_early:
            plan = epoch_steps(lengths, step_plan, state.epoch, pool_of(state.epoch) if pool_of else None)
            # On resume the first `step_in_epoch` steps of this epoch were already taken: the data position.
            for micro_batches in plan[state.step_in_epoch:]:
                if state.step >= total_steps:
                    break
                started = time.perf_counter()
                lr = lr_at(state.step, total_steps, t)
                set_lr(optimizer, lr)
                batches = [collate([data.train[i] for i in mb], cfg.data.packing, pad_id)
                           for mb in distributed.my_share(world, micro_batches)]
                # The loss divisor: answer tokens of the whole global step, summed over ranks before any backward.
                step_targets = int(distributed.all_reduce_sum(world, [sum(b.num_targets for b in batches)])[0])
                passes = distributed.share_count(world, len(micro_batches))
                # A rank left without micro-batches in a short last step still runs a pass (weighted 0).
                filler = batches[0] if batches else collate([data.train[i] for i in micro_batches[0]],
                                                            cfg.data.packing, pad_id)
                step_loss = accumulate_gradients(loss_module, batches, device, autocast_dtype, step_targets, passes,
                                                 world, filler)
                max_norm = t.max_grad_norm if t.max_grad_norm > 0 else math.inf
                grad_norm = distributed.total_norm(torch.nn.utils.clip_grad_norm_(trainable, max_norm))
                # One all-reduce per step: the step's loss over all ranks, and whether any rank got a stop signal.
                step_loss, stop_votes = distributed.all_reduce_sum(world, [step_loss, float(stop.requested)])
                stop_requested = stop_votes > 0
                finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
                if finite:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if state.step == first_step:  # optimizer state exists from the first update on
                    tracker.log({"step": state.step + 1,
                                 "memory_per_process": distributed.memory_per_rank(world, model, optimizer)})
                state.step, state.step_in_epoch = state.step + 1, state.step_in_epoch + 1
                elapsed = time.perf_counter() - started
                tokens = sum(b.num_tokens for b in batches) * world.size  # this rank's tokens, scaled to the world
                tracker.step(step_loss, lr, tokens / elapsed)
                if finite:
                    state.bad_steps, state.last_loss = 0, step_loss
                    _check_loss_spike(state, step_loss, t, run_dir)
                    if state.step % t.log_every == 0 or state.step == total_steps:
                        tracker.log({"step": state.step, "epoch": state.epoch, "loss": step_loss, "lr": lr,
                                     "grad_norm": grad_norm, "tokens": tokens, "target_tokens": step_targets,
                                     "tokens_per_s": tokens / elapsed, "step_time_s": elapsed})
                else:
                    # A NaN/Inf step changes nothing: its update is skipped, the data and schedule move on.
                    state.bad_steps += 1
                    tracker.log({"step": state.step, "skipped_step": True, "loss": _json_float(step_loss),
                                 "grad_norm": _json_float(grad_norm), "lr": lr})
                    tracker.message(f"step {state.step}: non-finite loss or gradient norm, update skipped "
                                    f"({state.bad_steps} in a row)")
                    if state.bad_steps > t.max_bad_steps:
                        raise TrainingStopped(
                            f"stopped at step {state.step}: {state.bad_steps} non-finite steps in a row "
                            f"(train.max_bad_steps={t.max_bad_steps}); no NaN weights were saved; last checkpoint: "
                            f"{ckpt.latest_checkpoint(run_dir) or 'none'}")

                if data.val and (state.step == total_steps or (t.eval_every and state.step % t.eval_every == 0)):
                    evaluation = validate()
                    state.val_loss = evaluation.val_loss
                    verdict = judge(state, evaluation, t)
                    if verdict.record:
                        tracker.log(verdict.record)
                    if verdict.stop_message:
                        tracker.message(verdict.stop_message)
                        stopped_early = True
                    if verdict.improved and keep_best:
                        best_state = distributed.gather_trainable(world, model, loss_module)
                save_due = state.step == total_steps or (t.save_every and state.step % t.save_every == 0)
                if save_due or stopped_early or stop_requested:
                    saved = checkpoint()
                if stop_requested:
                    tracker.close()
                    raise Preempted(f"stopped by signal at step {state.step}; checkpoint {saved}; "
                                    f"continue with: tuneforge train {run_dir / 'config.yaml'} --resume")
                if stopped_early:
                    break
            else:
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
    tracker.close()

    if stopped_early and best_state is not None:
        # Under FSDP only rank 0 gathered the best weights: it spreads them to the others' shards.
        distributed.load_trainable(world, model, loss_module, best_state)
        state.val_loss = state.best_val
    if cfg.data.packing:
        use_standard_attention(model)  # what is saved must generate with ordinary attention
    meta = {"base_model": cfg.model, "method": cfg.method, "tuneforge_version": __version__, "steps": state.step,
            "val_loss": state.val_loss, "train_loss": _json_float(state.last_loss)}
    full_state = distributed.gather_full_model(world, loss_module)  # FSDP: the shards, gathered on rank 0
    memory = distributed.memory_per_rank(world, model, optimizer)
    with distributed.root_unsharded(world, loss_module):
        if world.is_main:
            ckpt.save_output(model, tokenizer, run_dir, meta, full_state)
        distributed.barrier(world)
    if world.is_main:
        tracker.log({"event": "end", "step": state.step, "final_val_loss": state.val_loss,
                     "stopped_early": stopped_early, "memory_per_process": memory})
        write_status(run_dir, "finished", step=state.step, total_steps=total_steps, val_loss=state.val_loss,
                     stopped_early=stopped_early)
        try:
            plot_losses(run_dir)
        except OSError as exc:  # the curve is a convenience; the weights are already safe on disk
            log.warning("could not write the loss plot: %s", exc)
        log.info("saved %s output to %s", cfg.method, run_dir)
    distributed.barrier(world)
    return TrainResult(run_dir, state.step, state.last_loss, state.val_loss, state.best_val, stopped_early,
                       model.eval())


def accumulate_gradients(loss_module, batches, device: str, autocast_dtype, step_targets: int | None = None,
                         passes: int | None = None, world: distributed.World | None = None,
                         filler=None) -> float:
    """Backward over this rank's micro-batches of a step; returns its part of the step's answer-token mean loss.

    `step_targets`: answer tokens in the whole (global) step; `passes`: forward/backward passes every rank makes
    (ranks with fewer micro-batches run `filler` with weight 0, so that DDP's and FSDP's collectives line up)."""
    world = world or distributed.World("none")
    step_targets = step_targets if step_targets is not None else sum(b.num_targets for b in batches)
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
            loss = loss_module(batch.to(device)) * (scale if real else 0.0)
            loss.backward()
        if real:
            step_loss += loss.item() / world.size
    return step_loss


def _find_resume_point(cfg: RunConfig, run_dir: Path) -> Path | None:
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
    saved = yaml.safe_load((latest / "config.yaml").read_text(encoding="utf-8"))
    current = cfg.to_dict()
    for key in RESUME_MUST_MATCH:
        before, now = _dotted(saved, key), _dotted(current, key)
        if before != now:
            raise ConfigError(f"resume: {key} is {now!r} but checkpoint {latest.name} was trained with {before!r}; "
                              f"use the same {key} or another output_dir")
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


def _dotted(tree: dict, key: str):
    node = tree
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


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

"""The run configuration: one typed schema, the ONLY home of defaults.

A run file is YAML; `key=value` overrides use dotted paths (`train.lr=1e-4 lora.r=8`). Every field's docstring-like
`help` is also what `tuneforge train --help-config` prints. Validation errors are one line naming the key, the value
and what is allowed (see `ConfigError`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from tuneforge.errors import ConfigError
from tuneforge.method_registry import METHOD_NAMES, REGISTRY, method_help, method_named

EMBEDDED_MODEL = "smollm2-135m-instruct"


# What a key does to a resumed run (`--resume`), one mark per key, checked against the checkpoint's config:
# MUST_MATCH keys decide the weights' shapes, the model's function or the data stream (which rows, in what order,
# tokenized how), so a resume with another value would silently continue a different run and is refused;
# MAY_CHANGE keys (how long, how often to evaluate or save, the optimizer's future) can change, and the change is
# logged.
MUST_MATCH, MAY_CHANGE = "must_match", "may_change"


def setting(default: Any, help: str, *, min: float | None = None, max: float | None = None,
            min_exclusive: bool = False, **extra):
    """A settings field: default, help text and an optional numeric range (checked by `_check_value`). Serve, eval
    and the UI use it for their settings, which no checkpoint holds; a run's keys use `_f`."""
    meta = {"help": help, "min": min, "max": max, "min_exclusive": min_exclusive, **extra}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _f(default: Any, help: str, *, resume: str, **limits):
    """A run config key: a `setting` that also carries its resume mark."""
    assert resume in (MUST_MATCH, MAY_CHANGE), resume  # a schema bug, caught at import
    return setting(default, help, resume=resume, **limits)


@dataclass
class LoraSettings:
    r: int = _f(16, "LoRA rank: size of the low-rank update.", min=1, resume=MUST_MATCH)
    alpha: float = _f(32.0, "LoRA scaling numerator; the update is scaled by alpha / r.", min=0, min_exclusive=True,
        resume=MUST_MATCH)
    dropout: float = _f(0.05, "Dropout on the LoRA input during training.", min=0, max=0.99, resume=MUST_MATCH)
    target_modules: Union[str, list[str]] = _f(
        "all-linear", "Modules that get LoRA: 'all-linear' or a list of module names such as [q_proj, v_proj].",
        resume=MUST_MATCH)
    modules_to_save: list[str] = _f(
        [], "Modules trained in full beside the adapter and saved with it, e.g. [embed_tokens, lm_head] for a new "
        "language or chat format; tied input and output embeddings stay one matrix. Merges and exports keep them.",
        resume=MUST_MATCH)


@dataclass
class QloraSettings:
    quant_type: Literal["nf4", "fp4"] = _f("nf4", "4-bit data type of the frozen base weights (QLoRA: NormalFloat4).",
        resume=MUST_MATCH)
    double_quant: bool = _f(True, "Also quantize the per-block scales (saves ~0.4 bit per weight).", resume=MUST_MATCH)
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", "Precision the 4-bit weights are dequantized to for matmuls; 'auto' = bfloat16 on CUDA with bf16, "
        "else float32.", resume=MUST_MATCH)


@dataclass
class AdapterSettings:
    reduction_factor: int = _f(16, "Bottleneck adapter size as hidden_size / reduction_factor.", min=1,
        resume=MUST_MATCH)
    bottleneck_dim: Union[int, None] = _f(None, "Bottleneck size in units; when set, overrides reduction_factor.", min=1,
        resume=MUST_MATCH)
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = _f("relu", "Activation between down- and up-projection.",
        resume=MUST_MATCH)
    placement: Literal["both", "attention", "mlp"] = _f(
        "both", "Where adapters go in each decoder layer: after the attention block, after the MLP block, or both.",
        resume=MUST_MATCH)


@dataclass
class PrefixSettings:
    num_virtual_tokens: int = _f(20, "Learned key/value prefix length, per layer (prefix tuning).", min=1,
        resume=MUST_MATCH)


@dataclass
class PromptSettings:
    num_virtual_tokens: int = _f(20, "Learned soft-prompt length in embeddings (prompt tuning).", min=1,
        resume=MUST_MATCH)
    init: Literal["vocab", "random", "text"] = _f(
        "vocab", "Soft-prompt start: embeddings of random vocabulary tokens ('vocab'), N(0, 1) noise ('random') or "
        "the embeddings of init_text ('text').", resume=MUST_MATCH)
    init_text: Union[str, None] = _f(None, "Text whose token embeddings start the soft prompt (with init: text).",
        resume=MUST_MATCH)


OBJECTIVES = ("sft", "dpo", "ipo", "simpo", "orpo", "kto")
PREFERENCE_OBJECTIVES = OBJECTIVES[1:]
REFERENCE_FREE = ("simpo", "orpo")  # objectives with no reference model at all


@dataclass
class DpoSettings:
    beta: float = _f(0.1, "How far the model may move from the reference: the DPO temperature (higher = stay closer).",
        min=0, min_exclusive=True, resume=MUST_MATCH)
    label_smoothing: float = _f(
        0.0, "Conservative DPO: the chance a pair's label is wrong; the loss then also rewards the reverse a little.",
        min=0, max=0.49, resume=MUST_MATCH)


@dataclass
class IpoSettings:
    beta: float = _f(0.1, "IPO's tau: the log-ratio margin it aims for is 1 / (2 beta), per completion token.", min=0,
        min_exclusive=True, resume=MUST_MATCH)


@dataclass
class SimpoSettings:
    beta: float = _f(2.0, "Scale of SimPO's reward, the mean log-probability per completion token.", min=0,
        min_exclusive=True, resume=MUST_MATCH)
    gamma: float = _f(1.0, "SimPO's target margin between chosen and rejected rewards.", min=0, resume=MUST_MATCH)


@dataclass
class OrpoSettings:
    weight: float = _f(0.1, "ORPO's lambda: weight of the odds-ratio term beside the chosen answers' NLL.", min=0,
        min_exclusive=True, resume=MUST_MATCH)


@dataclass
class KtoSettings:
    beta: float = _f(0.1, "KTO's beta: how far the model may move from the reference (as DPO's).", min=0,
        min_exclusive=True, resume=MUST_MATCH)
    desirable_weight: float = _f(1.0, "Weight of the desirable examples' loss (raise it when they are the fewer).",
        min=0, min_exclusive=True, resume=MUST_MATCH)
    undesirable_weight: float = _f(1.0, "Weight of the undesirable examples' loss.", min=0, min_exclusive=True,
        resume=MUST_MATCH)


@dataclass
class PreferenceSettings:
    reference: Literal["auto", "none"] = _f(
        "auto", "DPO/IPO/KTO's reference: 'auto' = the model before training (its log-probabilities computed once and "
        "stored in the run directory), 'none' = reference-free (log-ratios against 0). SimPO and ORPO use none.",
        resume=MUST_MATCH)


@dataclass
class DataSource:
    """One of several training (or validation) sources: `data.train: [{path: a.jsonl, weight: 0.8}, ...]`."""

    path: Union[str, None] = _f(None, "The source's file (JSONL/JSON/CSV/Parquet or a saved `datasets` directory).",
        resume=MUST_MATCH)
    name: Union[str, None] = _f(None, "Name in logs, per-source losses and train.guard (default: the file's stem).",
        resume=MUST_MATCH)
    weight: Union[float, None] = _f(
        None, "Share of each epoch's examples drawn from this source (weights are normalised; an epoch has as many "
        "examples as all sources together). Give every source a weight, or none.", min=0, min_exclusive=True,
        resume=MUST_MATCH)
    epochs: Union[float, None] = _f(
        None, "Passes over this source per training epoch (e.g. 0.5: a fresh half each epoch, 2: twice); default 1.",
        min=0, min_exclusive=True, resume=MUST_MATCH)
    max_rows: Union[int, None] = _f(None, "Use at most this many rows of the source (a seeded sample).", min=1,
        resume=MUST_MATCH)
    format: Literal["auto", "instruction", "chat", "sharegpt", "completion", "default"] = _f(
        "default", "Row format of this source; 'default' = data.format.", resume=MUST_MATCH)


@dataclass
class DataSettings:
    train: Union[str, list[DataSource], None] = _f(
        None, "Training data: a JSONL/JSON/CSV/Parquet file or a saved `datasets` directory, or a list of sources "
        "{path, name, weight | epochs, max_rows, format} mixed by weight (see the README's 'Data mixing').",
        resume=MUST_MATCH)
    val: Union[str, list[DataSource], None] = _f(
        None, "Validation data (same forms; one loss per source is logged). When absent, `val_split` carves it from "
        "each training source.", resume=MUST_MATCH)
    val_split: float = _f(0.0, "Fraction of train held out for validation when `val` is not given.", min=0, max=0.5,
        resume=MUST_MATCH)
    format: Literal["auto", "instruction", "chat", "sharegpt", "completion"] = _f(
        "auto", "Row format; 'auto' detects it per file.", resume=MUST_MATCH)
    max_length: int = _f(1024, "Longest example in tokens; longer ones follow `overlong`.", min=16, resume=MUST_MATCH)
    overlong: Literal["truncate", "drop"] = _f(
        "truncate", "Over-long rows: 'truncate' shortens the prompt side (never the answer); 'drop' skips them.",
        resume=MUST_MATCH)
    train_on_prompt: bool = _f(False, "Also compute the loss on prompt tokens (default: answer tokens only).",
        resume=MUST_MATCH)
    packing: bool = _f(True, "Concatenate examples into one padding-free row; attention never crosses examples.",
        resume=MUST_MATCH)
    group_by_length: bool = _f(True, "Without packing: batch examples of similar length, so less goes to padding.",
        resume=MUST_MATCH)
    system_prompt: Union[str, None] = _f(None, "System message added to rows that have none (default: the template's).",
        resume=MUST_MATCH)
    on_error: Literal["fail", "skip"] = _f(
        "fail", "Bad rows (file:line: reason): 'fail' stops before the model loads; 'skip' trains without them.",
        resume=MUST_MATCH)


@dataclass
class GuardSettings:
    source: Union[str, None] = _f(
        None, "Validation source to watch (a name of data.val's sources, or of data.train's with val_split); "
        "null = off.", resume=MUST_MATCH)
    max_increase: float = _f(
        0.05, "Stop when that source's validation loss exceeds its step-0 value by more than this fraction, keeping "
        "the best weights that stayed within it.", min=0, min_exclusive=True, resume=MAY_CHANGE)


RANGE_START = 1e-4  # the exponential schedule's first rate as a fraction of train.lr: a sweep over four decades


@dataclass
class TrainSettings:
    epochs: int = _f(3, "Passes over the training data (ignored when max_steps > 0).", min=1, resume=MAY_CHANGE)
    max_steps: int = _f(0, "Stop after this many optimizer steps; 0 means run `epochs` epochs.", min=0,
        resume=MAY_CHANGE)
    lr: float = _f(2e-4, "Peak learning rate.", min=0, min_exclusive=True, resume=MAY_CHANGE)
    batch_size: int = _f(8, "Examples per micro-batch (unless tokens_per_batch is set).", min=1, resume=MUST_MATCH)
    tokens_per_batch: int = _f(
        0, "Fill each micro-batch up to this many tokens instead of batch_size examples (padded: rows x longest); "
        "0 = off.", min=0, resume=MUST_MATCH)
    grad_accum: int = _f(1, "Micro-batches per optimizer step (effective batch = batch_size x grad_accum).", min=1,
        resume=MUST_MATCH)
    micro_batch_tokens: Union[int, Literal["auto"]] = _f(
        "auto", "Packed rows only: lay each step's examples (batch_size x grad_accum per process) out in as few "
        "micro-batches of at most this many tokens as they fill. The update is the same (the loss is a mean over the "
        "step's answer tokens however the step is split), the matmuls bigger. 'auto' = the whole step in rows of up "
        "to 1024 tokens while the memory estimate for one stays within half of the memory available "
        "(tuneforge/train/micro_batch_size.py); 0 = micro-batches of batch_size examples as planned.", min=0,
        resume=MAY_CHANGE)
    warmup_ratio: float = _f(0.03, "Fraction of all steps spent warming the learning rate up from 0.", min=0, max=1,
        resume=MAY_CHANGE)
    scheduler: Literal["cosine", "linear", "constant", "exponential"] = _f(
        "cosine", "Learning-rate decay after warmup. exponential: no warmup and no decay, the rate rises geometrically "
        "from lr / 10,000 to lr over the run (the learning-rate range test `tune --lr-range-test` runs).",
        resume=MAY_CHANGE)
    weight_decay: float = _f(0.0, "AdamW weight decay (never applied to biases and norms).", min=0, resume=MAY_CHANGE)
    adam_eps: float = _f(1e-8, "AdamW's epsilon: gradients far below it get damped updates instead of full-size ones.",
        min=0, min_exclusive=True, resume=MAY_CHANGE)
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this; 0 disables clipping.", min=0,
        resume=MAY_CHANGE)
    seed: int = _f(42, "Seed for data order, splits, dropout and initialisation.", resume=MUST_MATCH)
    eval_every: int = _f(0, "Validation loss every N optimizer steps (and always at the end); 0 = only at the end.", min=0,
        resume=MAY_CHANGE)
    save_every: int = _f(
        50, "Save a resumable checkpoint every N optimizer steps and at the end; 0 = only at the end.", min=0,
        resume=MAY_CHANGE)
    early_stopping_patience: int = _f(
        0, "Stop after this many validations without a new best val loss, keeping the best weights; 0 = off.", min=0,
        resume=MAY_CHANGE)
    eval_metric: Union[Literal["exact_match", "exact_match_normalised", "rouge1", "rouge2", "rougeL", "bleu"],
                       None] = _f(
        None, "Also generate answers for a sample of the validation rows at each evaluation and log this metric "
        "(greedy; higher is better); null = off.", resume=MAY_CHANGE)
    eval_metric_sample: int = _f(32, "Validation rows answered for eval_metric (the same rows each time); 0 = all.",
                                 min=0, resume=MAY_CHANGE)
    eval_metric_max_new_tokens: int = _f(64, "Longest generated answer for eval_metric.", min=1, resume=MAY_CHANGE)
    early_stopping_metric: Literal["val_loss", "eval_metric", "reward_accuracy"] = _f(
        "val_loss", "What early stopping (and the best weights kept) follows: validation loss, train.eval_metric, or "
        "(preference objectives) the validation pairs' reward accuracy.", resume=MAY_CHANGE)
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory (slower).",
        resume=MAY_CHANGE)
    fuse_lora: bool = _f(
        True, "LoRA (not DoRA or QLoRA) without FSDP: projections that read one input (q/k/v, gate/up) run as one "
        "matmul with one dropout mask per input (tuneforge/model/fused_lora.py); saved adapters are PEFT's either way.",
        resume=MAY_CHANGE)
    compile: bool = _f(False, "torch.compile the decoder (dynamic shapes); see the README for what it gives here.",
        resume=MAY_CHANGE)
    dtype: Literal["auto", "float32", "bfloat16"] = _f(
        "auto", "Compute precision; 'auto' = bf16 autocast where the hardware has native bf16, else fp32.",
        resume=MUST_MATCH)
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "Where to train; 'auto' picks CUDA when present.",
        resume=MAY_CHANGE)
    log_every: int = _f(1, "Write a metrics line every N optimizer steps.", min=1, resume=MAY_CHANGE)
    keep_last: int = _f(3, "Keep the newest N complete checkpoints (the newest is never deleted).", min=1,
        resume=MAY_CHANGE)
    resume: Literal["never", "auto"] = _f(
        "never", "'auto' continues from the newest complete checkpoint in output_dir (same as --resume).",
        resume=MAY_CHANGE)
    max_bad_steps: int = _f(
        5, "A NaN/Inf loss or gradient skips that step; more than this many in a row stop the run.", min=0,
        resume=MAY_CHANGE)
    loss_spike_factor: float = _f(
        0.0, "Stop when the loss stays above this multiple of its running mean (last 50 steps); 0 = off.", min=0,
        resume=MAY_CHANGE)
    loss_spike_patience: int = _f(10, "Consecutive spiking steps that stop the run (with loss_spike_factor).", min=1,
        resume=MAY_CHANGE)
    distributed: Literal["auto", "none", "ddp", "fsdp"] = _f(
        "auto", "Several processes (torchrun or --nproc): 'ddp' replicates the model, 'fsdp' shards parameters, "
        "gradients and optimizer state (FSDP2, per decoder layer); 'auto' = ddp under torchrun, none otherwise. "
        "batch_size and grad_accum are per process: the global batch is batch_size x grad_accum x processes.",
        resume=MAY_CHANGE)
    guard: GuardSettings = field(default_factory=lambda: GuardSettings(), metadata={
        "help": "Forgetting guard: stop when one validation source's loss rises too far above its step-0 value."})
    distributed_timeout_s: int = _f(
        1800, "Seconds a process waits for a hung peer before the run fails (a crashed peer fails it at once).", min=1,
        resume=MAY_CHANGE)
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = _f(
        [], "Experiment trackers that also receive the metrics (each imported only when listed; W&B runs offline "
        "without a login): tensorboard -> <run>/tensorboard, wandb -> <run>/wandb, mlflow -> <run>/mlflow.db or "
        "MLFLOW_TRACKING_URI.", resume=MAY_CHANGE)


@dataclass
class RunConfig:
    model: str = _f(EMBEDDED_MODEL, "Base model: an alias, a hub id, a local HF model directory or a .gguf file.",
        resume=MUST_MATCH)
    method: Literal[METHOD_NAMES] = _f("lora", method_help(), resume=MUST_MATCH)  # the choices: method_registry
    objective: Literal[OBJECTIVES] = _f(
        "sft", "What training optimises: 'sft' = the answers' cross-entropy; 'dpo', 'ipo', 'simpo', 'orpo' = "
        "preference tuning on pairs of a chosen and a rejected answer; 'kto' = on answers marked desirable or not "
        "(settings in the section of that name).",
        resume=MUST_MATCH)
    output_dir: str = _f("runs/run", "Run directory: metrics, resolved config and the trained weights.",
        resume=MAY_CHANGE)
    trust_remote_code: bool = _f(False, "Allow model repositories to run their own Python code. Off for safety.",
        resume=MAY_CHANGE)
    added_tokens: list[str] = _f(
        [], "Special tokens added to the tokenizer (format or tool-call markers such as <tool_call>); the embeddings "
        "grow to hold them and their rows train (with lora/dora: PEFT's trainable tokens, saved in the adapter), so "
        "merges and exports keep them.", resume=MUST_MATCH)
    lora: LoraSettings = field(default_factory=LoraSettings)
    qlora: QloraSettings = field(default_factory=QloraSettings)
    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    prefix: PrefixSettings = field(default_factory=PrefixSettings)
    prompt: PromptSettings = field(default_factory=PromptSettings)
    dpo: DpoSettings = field(default_factory=DpoSettings)
    ipo: IpoSettings = field(default_factory=IpoSettings)
    simpo: SimpoSettings = field(default_factory=SimpoSettings)
    orpo: OrpoSettings = field(default_factory=OrpoSettings)
    kto: KtoSettings = field(default_factory=KtoSettings)
    preference: PreferenceSettings = field(default_factory=PreferenceSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def dotted_items(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"train.lr": 0.0002, ...}: a nested config mapping as dotted keys, the form overrides use."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(dotted_items(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# --------------------------------------------------------------------------------------------------------------------
# Loading: YAML + dotted overrides -> nested dict -> typed, validated RunConfig.


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a run file (optional) and apply `key=value` overrides; raise `ConfigError` on the first problem."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    apply_overrides(raw, overrides)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    return _build(RunConfig, raw, prefix="")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: config file is not UTF-8 text") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a run file must be a YAML mapping of keys to values, got {type(loaded).__name__}")
    return loaded


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=1e-4")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r}: empty key")
    try:
        # YAML parsing gives numbers, booleans, null and [lists] their natural types.
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> None:
    """`key=value` overrides set into a raw (unvalidated) run-file dict, values typed as YAML types them."""
    for item in overrides:
        key, value = _parse_override(item)
        set_dotted(raw, key, value)


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """raw[a][b][c] = value for key "a.b.c", making the sections on the way (overrides, tune's trial values)."""
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str):
    section = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{section}: expected a mapping of keys, got {_show(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            raise ConfigError(_unknown_key_message(prefix + str(key), str(key), list(fields)))
    kwargs = {}
    for name, fld in fields.items():
        if name not in raw:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, raw[name], prefix + name + ".")
        else:
            kwargs[name] = _check_value(prefix + name, raw[name], hint, fld.metadata)
    return cls(**kwargs)


def _unknown_key_message(full_key: str, key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{full_key}: unknown key (allowed: {', '.join(allowed)}){hint}"


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _check_value(key: str, value: Any, hint: Any, meta: typing.Mapping[str, Any]) -> Any:
    checked = _check_type(key, value, hint)
    lo, hi = meta.get("min"), meta.get("max")
    if isinstance(checked, (int, float)) and not isinstance(checked, bool):
        if lo is not None and (checked <= lo if meta.get("min_exclusive") else checked < lo):
            bound = f"> {lo}" if meta.get("min_exclusive") else f">= {lo}"
            rng = f"{bound}" + (f" and <= {hi}" if hi is not None else "")
            raise ConfigError(f"{key}: got {checked!r}, must be {rng}")
        if hi is not None and checked > hi:
            raise ConfigError(f"{key}: got {checked!r}, must be <= {hi}" + (f" and >= {lo}" if lo is not None else ""))
    return checked


def _check_type(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key}: got {value!r}, allowed: {', '.join(map(str, allowed))}")
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        # A list meets the list option: its own error (which item, which key) says more than "expected X or Y".
        list_options = [o for o in options if typing.get_origin(o) is list]
        if isinstance(value, list) and len(list_options) == 1:
            return _check_type(key, value, list_options[0])
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(key, value, option)
            except ConfigError:
                pass  # the next option may fit; if none does, the message below names them all
        wanted = " or ".join(_type_name(o) for o in options)
        raise ConfigError(f"{key}: got {_show(value)}, expected {wanted}")
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: got {_show(value)}, expected a list of {_type_name(item_type)}")
        return [_check_type(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: got {_show(value)}, expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: got {_show(value)}, expected an integer")
        return value
    if hint is float:
        # YAML 1.1 reads `1e-4` (no dot) as a string; accept any text that is a plain number.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: got {_show(value)}, expected a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{key}: got {_show(value)}, expected non-empty text")
        return value
    raise TypeError(f"schema type {hint!r} of {key} is not supported")  # a bug in the schema, not user input


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if dataclasses.is_dataclass(hint):
        return "a mapping of " + ", ".join(f.name for f in dataclasses.fields(hint))
    return {str: "text", int: "an integer", float: "a number", bool: "true/false", type(None): "null"}.get(
        hint, str(hint)
    )


# --------------------------------------------------------------------------------------------------------------------
# Checks that need more than the schema: files on disk, combinations.


def validate_for_training(cfg: RunConfig) -> None:
    """Checks a `train` run needs beyond types: data files exist, options fit together."""
    if cfg.data.train is None:
        raise ConfigError("data.train: missing; set it to a data file, e.g. data.train=examples/demo/train.jsonl")
    train_sources = _checked_sources("data.train", cfg.data.train)
    val_names = [s.name for s in train_sources] if cfg.data.val_split > 0 else []
    if cfg.data.val is not None:
        val_names = [s.name for s in _checked_sources("data.val", cfg.data.val)]
        if cfg.data.val_split > 0:
            raise ConfigError(f"data.val_split: got {cfg.data.val_split}, must be 0 when data.val is given")
    check_method_settings(cfg)
    guarded = cfg.train.guard.source
    if guarded is not None and guarded not in val_names:
        known = f"validation sources: {', '.join(val_names)}" if val_names else "no validation data (set data.val " \
            "or data.val_split)"
        raise ConfigError(f"train.guard.source: got {guarded!r}, but there is no such validation source ({known})")
    if cfg.train.early_stopping_patience > 0 and cfg.data.val is None and cfg.data.val_split == 0:
        raise ConfigError(
            f"train.early_stopping_patience: got {cfg.train.early_stopping_patience}, needs validation data "
            "(set data.val or data.val_split)"
        )


def check_method_settings(cfg: RunConfig) -> None:
    """Method options that only make sense together (the schema checks each key on its own)."""
    prompt = cfg.prompt
    if prompt.init == "text" and prompt.init_text is None:
        raise ConfigError("prompt.init_text: missing; prompt.init is 'text', so set the text that starts the soft prompt")
    if prompt.init != "text" and prompt.init_text is not None:
        raise ConfigError(f"prompt.init_text: given, but prompt.init is {prompt.init!r}; set prompt.init=text to use it")
    method = method_named(cfg.method)  # what it supports, and why not, is the registry's
    if cfg.train.gradient_checkpointing and not method.gradient_checkpointing:
        raise ConfigError(f"train.gradient_checkpointing: not supported with method {cfg.method!r}; turn it off")
    if cfg.train.distributed == "fsdp" and method.fsdp_refused:
        raise ConfigError(f"train.distributed: 'fsdp' is not supported with method {cfg.method!r}; "
                          f"{method.fsdp_refused}")
    if cfg.train.early_stopping_metric == "eval_metric" and cfg.train.eval_metric is None:
        raise ConfigError("train.early_stopping_metric: 'eval_metric' needs train.eval_metric (e.g. exact_match)")
    if cfg.train.eval_metric is not None and cfg.data.val is None and cfg.data.val_split == 0:
        raise ConfigError(f"train.eval_metric: got {cfg.train.eval_metric!r}, needs validation data "
                          f"(set data.val or data.val_split)")
    if cfg.train.distributed == "fsdp" and cfg.train.eval_metric is not None:
        # Generation calls the model's own forward, outside the FSDP root that gathers the sharded weights.
        raise ConfigError("train.eval_metric: not supported with train.distributed=fsdp yet; use ddp or turn it off")
    check_objective(cfg)
    check_vocabulary_settings(cfg)
    if cfg.train.distributed == "fsdp" and cfg.train.compile:
        raise ConfigError("train.compile: not supported with train.distributed=fsdp yet; turn one of them off")


def check_vocabulary_settings(cfg: RunConfig) -> None:
    """added_tokens and lora.modules_to_save: with the methods whose saved form holds embedding rows."""
    tokens = cfg.added_tokens
    if tokens:
        bad = next((t for t in tokens if not t or t != t.strip()), None)
        if bad is not None:
            raise ConfigError(f"added_tokens: got {bad!r}; a token must be non-empty, without surrounding spaces")
        repeated = next((t for t in tokens if tokens.count(t) > 1), None)
        if repeated is not None:
            raise ConfigError(f"added_tokens: {repeated!r} is listed twice")
        if cfg.method not in ("lora", "dora", "full"):
            raise ConfigError(f"added_tokens: not supported with method {cfg.method!r} (its saved form has no "
                              "embedding rows to train); use lora, dora or full")
    if cfg.lora.modules_to_save and cfg.method not in ("lora", "dora", "qlora"):
        raise ConfigError(f"lora.modules_to_save: only with lora, dora or qlora, not method {cfg.method!r} "
                          "(full fine-tuning trains every module already)")


def check_objective(cfg: RunConfig) -> None:
    """What a preference objective can train with (one line each)."""
    objective = cfg.objective
    if objective == "sft":
        if cfg.train.early_stopping_metric == "reward_accuracy":
            raise ConfigError("train.early_stopping_metric: 'reward_accuracy' needs a preference objective "
                              "(objective: dpo, ipo, simpo, orpo or kto)")
        return
    if cfg.method in ("prefix", "prompt"):
        # Their virtual tokens go in front of every example, and a pair's rejected answer reads the prompt as a cache.
        raise ConfigError(f"objective: {objective!r} trains method full, lora, qlora, dora or adapter; not "
                          f"{cfg.method!r}, whose virtual tokens do not fit one prompt shared by two answers")
    if not cfg.data.packing:
        raise ConfigError(f"data.packing: false is not supported with objective {objective!r}: pairs train in packed "
                          "rows where both answers share one copy of the prompt (there is no padding to choose)")
    if cfg.data.train_on_prompt:
        raise ConfigError(f"data.train_on_prompt: not supported with objective {objective!r}; a preference is "
                          "between answers, so only their tokens are scored")
    if cfg.train.guard.source:
        raise ConfigError(f"train.guard.source: not supported with objective {objective!r} yet; watch validation "
                          "reward accuracy instead (train.early_stopping_metric=reward_accuracy)")
    if cfg.train.early_stopping_metric == "reward_accuracy" and cfg.data.val is None and cfg.data.val_split == 0:
        raise ConfigError("train.early_stopping_metric: 'reward_accuracy' needs validation pairs (set data.val or "
                          "data.val_split)")


# `path: builtin:general` is the general instruction set that ships with tuneforge (scripts/make_general_data.py).
BUILTIN_DATA = {"builtin:general": Path(__file__).resolve().parent / "data" / "general" / "general_instructions.jsonl"}


def data_sources(value: str | list[DataSource]) -> list[DataSource]:
    """`data.train` / `data.val` as a list of named sources (a plain path is one source, named after its file)."""
    listed = [DataSource(path=value)] if isinstance(value, str) else value
    named = []
    for s in listed:
        builtin = BUILTIN_DATA.get(s.path) if s.path else None
        name = s.name or (s.path.split(":", 1)[1] if builtin else Path(s.path).stem if s.path else None)
        named.append(dataclasses.replace(s, name=name, path=str(builtin) if builtin else s.path))
    return named


def _checked_sources(key: str, value: str | list[DataSource]) -> list[DataSource]:
    if isinstance(value, list) and not value:
        raise ConfigError(f"{key}: an empty list; give a file or a list of sources")
    for i, source in enumerate(value if isinstance(value, list) else []):
        where = f"{key}[{i}]"
        if source.path is None:
            raise ConfigError(f"{where}.path: missing; every source needs a file")
        if source.weight is not None and source.epochs is not None:
            raise ConfigError(f"{where}: give weight or epochs, not both")
    sources = data_sources(value)
    for i, source in enumerate(sources):
        _check_data_path(f"{key}[{i}].path" if isinstance(value, list) else key, source.path)
    names = [s.name for s in sources]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ConfigError(f"{key}: two sources are named {duplicate!r}; give them distinct `name`s")
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        raise ConfigError(f"{key}: source {names[weighted.index(False)]!r} has no weight; give every source a "
                          f"weight, or none (then each source's `epochs` decides, default 1)")
    return sources


def _check_data_path(key: str, value: str) -> None:
    if value.startswith("hf:"):
        return  # a hub dataset name, resolved (online) by the data loader
    if not Path(value).exists():
        raise ConfigError(f"{key}: file not found: {value} (relative paths are from {os.getcwd()})")


def describe_schema() -> str:
    """Every key with its default and help, for `tuneforge train --help-config`."""
    lines: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for fld in dataclasses.fields(cls):
            hint = hints[fld.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, prefix + fld.name + ".")
                continue
            default = fld.default if fld.default is not dataclasses.MISSING else fld.default_factory()
            on_resume = "must match the checkpoint" if fld.metadata["resume"] == MUST_MATCH else "may change"
            lines.append(f"{prefix}{fld.name} = {default!r}\n    {fld.metadata.get('help', '')} "
                         f"(on --resume: {on_resume})")

    walk(RunConfig, "")
    return "\n".join(lines)


def resume_marks(cls: type = None, prefix: str = "") -> dict[str, str]:
    """{"lora.r": MUST_MATCH, "train.epochs": MAY_CHANGE, ...}: every key's resume mark, from the schema itself.
    A list of sources (`data.train: [...]`) is one key: its paths, weights and epochs decide the data stream."""
    cls = cls or RunConfig
    marks: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for fld in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[fld.name]):
            marks.update(resume_marks(hints[fld.name], prefix + fld.name + "."))
        else:
            marks[prefix + fld.name] = fld.metadata["resume"]
    return marks


def resume_differences(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[tuple], list[tuple]]:
    """(refused, allowed): the keys whose value differs between a checkpoint's config and this run's, each as
    (key, checkpoint value, this run's value), split by their resume mark. A key the checkpoint's (older) config
    does not have is not compared: its value then is unknown, not different. A method change itself is refused
    (`method` must match), so the sections of the other methods are not compared."""
    before, now = dotted_items(saved), dotted_items(current)
    # Another method's settings section (prompt.* on a LoRA run) changes nothing this run computes.
    all_sections = {section for m in REGISTRY for section in m.sections}
    unused = all_sections - set(method_named(current["method"]).sections) if current.get("method") else set()
    unused |= set(PREFERENCE_OBJECTIVES) - {current.get("objective", "sft")}  # the other objectives' sections
    refused, allowed = [], []
    for key, mark in resume_marks().items():
        if key.split(".", 1)[0] in unused:
            continue
        if key in before and before[key] != now.get(key):
            (refused if mark == MUST_MATCH else allowed).append((key, before[key], now.get(key)))
    return refused, allowed

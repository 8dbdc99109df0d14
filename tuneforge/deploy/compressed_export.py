"""`tuneforge export --format gptq|awq`: 4-bit (or 8-bit) weights in the compressed-tensors format that vLLM serves
and plain transformers loads, made by llm-compressor's `oneshot` (which runs on a CPU).

Both calibrate on real inputs: by default the run's own training rows, rendered with its chat template, because
the activations the quantizer protects should be the ones the tuned model will see. GPTQ quantizes each layer to
minimise its output error on those inputs; AWQ first rescales the channels the inputs use most, then rounds. Both
write symmetric int4 groups: an asymmetric (zero-point) AWQ file is what vLLM serves too, but transformers cannot
load its packed zero points (llm-compressor issue #1618; measured with transformers 5.24 and compressed-tensors
0.19), and a file that only one runtime reads could be neither evaluated nor served here. Embeddings, norms and the
head stay in 16-bit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from tuneforge.errors import UserError
from tuneforge.run_dir import config_path, read_config, read_meta

log = logging.getLogger("tuneforge")

FORMATS = ("gptq", "awq")
BITS = (4, 8)
GROUP_SIZES = (128, 64, 32)  # tried in this order: the largest that divides every layer's input is chosen
DTYPES = ("bfloat16", "float16", "float32")
IGNORED = ("lm_head",)  # the head stays 16-bit, as in llm-compressor's own W4A16 recipes


def export_compressed(source: str, out_dir: str | Path, fmt: str, bits: int = 4, group_size: int | None = None,
                      calibration: str | None = None, samples: int = 128, max_length: int = 512,
                      dtype: str = "bfloat16", force: bool = False) -> Path:
    """Quantize `source` (run directory, model directory or alias) with GPTQ or AWQ into the directory `out_dir`."""
    out_dir = Path(out_dir)
    _check_arguments(fmt, bits, samples, max_length, dtype)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise UserError(f"-o {out_dir}: already exists and is not an empty directory; choose a new path or pass "
                        "--force to replace it")
    if not out_dir.parent.is_dir():
        raise UserError(f"-o {out_dir}: directory {out_dir.parent} does not exist")
    llmcompressor = _import_llm_compressor(fmt)
    rows, rows_from = calibration_rows(source, calibration)  # before the model loads: bad data fails fast

    from tuneforge.deploy.merge import load_source_model, refuse_float16_overflow
    from tuneforge.model.stop_ids import keep_end_of_turn
    from tuneforge.run_dir import META_FILE, meta_text

    model, tokenizer, name = load_source_model(source)
    group, reason = choose_group_size(quantized_widths(model), group_size)
    log.info("%s: %d-bit %s, group size %d (%s)", name, bits, fmt.upper(), group, reason)
    dataset = calibration_dataset(tokenizer, rows, samples, max_length)
    log.info("%s: calibrating on %d rows of %s", name, len(dataset), rows_from)
    with _quiet_llm_compressor(llmcompressor), _cpu_only_pinning():
        llmcompressor.oneshot(model=model, dataset=dataset, recipe=_modifier(fmt, bits, group),
                              max_seq_length=max_length, num_calibration_samples=len(dataset),
                              shuffle_calibration_samples=False)
    if dtype == "float16":
        refuse_float16_overflow(model)
    model = model.to(getattr(torch, dtype))
    keep_end_of_turn(model.generation_config, tokenizer)
    meta = {"base_model": _base_model(source), "method": "full", "exported_from": str(source),
            "quantization": {"format": fmt, "bits": bits, "group_size": group, "calibration": rows_from,
                             "samples": len(dataset), "dtype": dtype}}
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(staging, save_compressed=True)
        tokenizer.save_pretrained(staging)
        (staging / META_FILE).write_text(meta_text(meta))
        _plain_permissions(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        staging.rename(out_dir)  # a half-written export never carries the name
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %s (%s, %.1f MB)", out_dir, fmt, sum(f.stat().st_size for f in out_dir.iterdir()) / 1e6)
    return out_dir


def _plain_permissions(directory: Path) -> None:
    """As plain mkdir/open would have made them (mkdtemp and safetensors create owner-only entries)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for item in directory.iterdir():
        item.chmod(0o666 & ~umask)


def _check_arguments(fmt: str, bits: int, samples: int, max_length: int, dtype: str) -> None:
    if fmt not in FORMATS:
        raise UserError(f"--format: got {fmt!r}, allowed: gguf, {', '.join(FORMATS)}")
    if bits not in BITS:
        raise UserError(f"--bits: got {bits}, allowed for {fmt}: {', '.join(map(str, BITS))}")
    if samples < 1:
        raise UserError(f"--samples: got {samples}, need at least 1 calibration row")
    if max_length < 16:
        raise UserError(f"--max-length: got {max_length}, need at least 16 tokens")
    if dtype not in DTYPES:
        raise UserError(f"--dtype: got {dtype!r}, allowed: {', '.join(DTYPES)}")


def _import_llm_compressor(fmt: str):
    try:
        import llmcompressor
    except ImportError:
        raise UserError(f"--format {fmt}: llm-compressor is not installed here (make install puts it in .venv)") \
            from None
    return llmcompressor


def quantized_widths(model: torch.nn.Module) -> dict[str, int]:
    """Input width of every linear layer the quantizer will touch (all but the head)."""
    return {name: module.in_features for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in IGNORED}


def choose_group_size(widths: dict[str, int], requested: int | None) -> tuple[int, str]:
    """(group size, the one-line reason). Each group of a row shares one scale, so the size must divide every
    quantized layer's input width: SmolLM2's 576 takes 64 or 32, not the usual 128."""
    if not widths:
        raise UserError("the model has no linear layers to quantize")

    def misfit(size: int) -> tuple[str, int] | None:
        return next(((name, width) for name, width in widths.items() if width % size), None)

    fitting = [size for size in GROUP_SIZES if misfit(size) is None]
    if requested is not None:
        if requested < 1:
            raise UserError(f"--group-size: got {requested}, need a positive size")
        bad = misfit(requested)
        if bad is not None:
            hint = f"sizes that divide every layer: {', '.join(map(str, fitting))}" if fitting else \
                "no usual size (128, 64, 32) divides every layer"
            raise UserError(f"--group-size {requested} does not divide the {bad[1]}-wide input of {bad[0]}; {hint}")
        return requested, "as requested"
    if not fitting:
        name, width = misfit(GROUP_SIZES[-1])
        raise UserError(f"no group size of {', '.join(map(str, GROUP_SIZES))} divides the {width}-wide input of "
                        f"{name}; give one with --group-size")
    chosen = fitting[0]
    if chosen == GROUP_SIZES[0]:
        return chosen, "the usual size; it divides every layer's input"
    larger = [size for size in GROUP_SIZES if size > chosen]
    name, width = misfit(larger[-1])
    return chosen, f"{larger[-1]} does not divide the {width}-wide input of {name}"


def calibration_rows(source: str, calibration: str | None) -> tuple[list, str]:
    """(rows, where they came from): `--calibration FILE` (any format tuneforge train reads), else the training rows
    of the run (or, for a `tuneforge merge` output, of the run it was merged from)."""
    from tuneforge.config import config_from_dict
    from tuneforge.data.formats import load_examples
    from tuneforge.data.prepare import read_raw

    if calibration is not None:
        return load_examples(calibration), calibration
    run = _training_run(Path(source))
    if run is None:
        raise UserError(f"{source}: not a tuneforge run, so there are no training rows to calibrate on; give "
                        "--calibration FILE (rows in any format tuneforge train reads)")
    config = config_from_dict(read_config(run))
    train, _ = read_raw(config.data, config.train.seed, config.objective)
    return train, f"{run}'s training data"


def _training_run(path: Path) -> Path | None:
    if not path.is_dir():
        return None
    if config_path(path).is_file():
        return path
    merged_from = (read_meta(path) or {}).get("merged_from")
    if merged_from and config_path(Path(merged_from)).is_file():
        return Path(merged_from)
    return None


def _base_model(source: str) -> str:
    meta = read_meta(Path(source)) if Path(source).is_dir() else None
    return (meta or {}).get("base_model") or str(source)


def calibration_dataset(tokenizer, rows: list, samples: int, max_length: int, seed: int = 0):
    """Up to `samples` rows, drawn without replacement (fixed seed), each as the full text the model trains on: a
    chat row rendered with the chat template (prompt and answer), a completion row as it is."""
    from datasets import Dataset

    from tuneforge.data.tokenize import fit_to_template

    if len(rows) > samples:
        rows = [rows[i] for i in sorted(np.random.default_rng(seed).choice(len(rows), samples, replace=False))]
    encoded = []
    for row in rows:
        if row.text is not None:
            ids = tokenizer(row.text, add_special_tokens=True)["input_ids"]
        else:
            text = tokenizer.apply_chat_template(fit_to_template(tokenizer, list(row.messages)), tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes its own BOS
        encoded.append(ids[:max_length])
    return Dataset.from_dict({"input_ids": encoded, "attention_mask": [[1] * len(ids) for ids in encoded]})


def _modifier(fmt: str, bits: int, group_size: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group_size)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if fmt == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        return GPTQModifier(config_groups=groups, ignore=list(IGNORED))
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    # AWQ rescales channels (searching the scales against the quantized grid), then the weights round to it
    return [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=list(IGNORED))]


@contextlib.contextmanager
def _quiet_llm_compressor(llmcompressor):
    """llm-compressor logs every layer's error on stdout (its METRIC level, between WARNING and ERROR): only its
    errors are shown; tuneforge logs what the user needs (group size, calibration rows, output)."""
    from llmcompressor.logger import LoggerConfig, configure_logger

    configure_logger(LoggerConfig(console_log_level="ERROR"))
    try:
        yield
    finally:
        configure_logger(LoggerConfig())


@contextlib.contextmanager
def _cpu_only_pinning():
    """llm-compressor 0.14's AWQ pins its cached activations in page-locked memory before each grid search, which
    raises on a machine with no accelerator. Pinning only speeds copies to a device; with none, it is skipped."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original

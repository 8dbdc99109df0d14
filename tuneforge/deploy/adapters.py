"""Many LoRA adapters on one base model in memory: checks, loading and unloading, and the admin path rules.

Every adapter is a PEFT LoRA directory (a tuneforge `lora`, `dora` or `qlora` run, or any PEFT LoRA). They are all
attached to one PeftModel; a request picks one per row with PEFT's `adapter_names` (mixed-adapter batches), so
switching costs nothing and nothing is reloaded. Only the engine thread calls attach/detach (see engine.py).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from tuneforge.errors import UserError
from tuneforge.method_registry import SERVABLE_METHODS
from tuneforge.run_dir import read_meta

log = logging.getLogger("tuneforge")

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
BASE_ROW = "__base__"  # PEFT's name for "no adapter" in a mixed batch


def check_name(name: str, taken: set[str]) -> str:
    if not NAME_PATTERN.fullmatch(name or "") or ".." in name:
        raise UserError(f"adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                        f"or digit, without '..'")
    if name in taken:
        raise UserError(f"adapter name {name!r}: already in use")
    return name


def check_adapter_dir(path: Path) -> dict:
    """The adapter's PEFT config, after checking the directory holds a LoRA that can be switched per request."""
    if not path.is_dir():
        raise UserError(f"adapter {path}: not a directory")
    meta = read_meta(path)
    if meta is not None and meta.get("method") not in SERVABLE_METHODS:
        raise UserError(f"adapter {path}: method {meta.get('method')!r} cannot be served as a switchable adapter "
                        f"(servable: {', '.join(SERVABLE_METHODS)}; serve a full run with --model {path})")
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(f"adapter {path}: no adapter_config.json (expected a LoRA run directory or PEFT adapter)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"adapter {config_file}: not valid JSON") from None
    if config.get("peft_type") != "LORA":
        raise UserError(f"adapter {path}: PEFT type {config.get('peft_type')!r} cannot be switched per request "
                        f"(LORA only)")
    return config


def confined_path(allowed_dir: Path, raw: str) -> Path:
    """`raw` (relative to `allowed_dir`, or absolute inside it) resolved, refusing anything that leaves the directory.

    Refused: `..` components, absolute paths outside, symlinks whose target is outside (the path itself, a folder on
    the way, or any file inside the adapter directory).
    """
    if not isinstance(raw, str) or not raw or "\x00" in raw:
        raise UserError("path: give a directory inside the allowed adapter directory")
    root = allowed_dir.resolve()
    given = Path(raw)
    if ".." in given.parts:
        raise UserError(f"path {raw!r}: '..' is not allowed")
    candidate = given if given.is_absolute() else root / given
    resolved = candidate.resolve()
    if not resolved.is_relative_to(root):
        raise UserError(f"path {raw!r}: outside the allowed adapter directory")
    if not resolved.is_dir():
        raise UserError(f"path {raw!r}: no such adapter directory")
    for item in resolved.rglob("*"):
        if item.is_symlink() and not item.resolve().is_relative_to(root):
            raise UserError(f"path {raw!r}: {item.relative_to(resolved)} links outside the allowed adapter directory")
    return resolved


def attach(model: torch.nn.Module, name: str, path: Path) -> torch.nn.Module:
    """`model` with the adapter at `path` added under `name`; the first adapter wraps the base in a PeftModel."""
    from peft import PeftModel

    base_name = getattr(getattr(model, "config", None), "_name_or_path", None)
    meta = read_meta(path)
    if meta is not None:
        log.info("adapter %s: %s run on %s", name, meta.get("method"), meta.get("base_model"))
    if (path / "tokenizer_config.json").is_file():
        from tuneforge.model.load import load_tokenizer

        rows = model.get_input_embeddings().weight.shape[0]
        grown = len(load_tokenizer(str(path))) - rows
        if grown > 0:  # a shared base cannot have rows for one adapter only
            raise UserError(f"adapter {path}: adds {grown} tokens to its base (added_tokens); serve it merged: "
                            f"tuneforge merge {path} -o DIR, then --model DIR")
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(path), adapter_name=name)
        else:
            model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
    except (RuntimeError, ValueError, KeyError) as exc:  # shape mismatch: trained on another base
        raise UserError(f"adapter {path}: does not fit the served base model {base_name}: "
                        f"{str(exc).splitlines()[0][:200]}") from None
    model.eval()
    return model


def detach(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """`model` without adapter `name`; the last one out unwraps the PeftModel back to the plain base."""
    if len(model.peft_config) == 1:
        return model.unload()  # removes the LoRA layers without merging: the original base weights remain
    model.delete_adapter(name)
    return model

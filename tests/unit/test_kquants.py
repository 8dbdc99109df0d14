"""K-quant blocks written by tuneforge (deploy/kquants.py) against llama.cpp's own quantizer, called in its prebuilt
library from node-llama-cpp (which `make test` installs): the same bytes, block for block and file for file, and
gguf-py's independent dequantizer reads them back within Q6_K's error."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from tests.conftest import tiny_llama_config
from tests.unit.test_export_gguf import LLAMA_CPP_TEXTS, NODE_LLAMA_CPP, llama_cpp_greedy, llama_cpp_quantize, \
    needs_llama_cpp
from tuneforge.deploy.kquants import Q6_K_BLOCK_BYTES, quantize_q6_k


def llama_cpp_q6_k(values: np.ndarray) -> np.ndarray:
    """llama.cpp's quantize_row_q6_K_ref (what llama-quantize runs without an importance matrix) on `values`."""
    libraries = sorted(NODE_LLAMA_CPP.glob("node_modules/@node-llama-cpp/linux-x64/bins/linux-x64/libggml-base*.so"))
    if not libraries:
        pytest.fail(f"no llama.cpp library under {NODE_LLAMA_CPP}: run `make test-tools`")
    quantize = ctypes.CDLL(str(libraries[0])).quantize_row_q6_K_ref
    quantize.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    values = np.ascontiguousarray(values, dtype=np.float32)
    out = np.zeros((values.shape[0], values.shape[1] // 256 * Q6_K_BLOCK_BYTES), dtype=np.uint8)
    quantize(values.ctypes.data, out.ctypes.data, values.size)
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
@pytest.mark.parametrize("kind", ["gaussian", "heavy-tailed", "sparse", "outliers"])
def test_q6_k_blocks_are_llama_cpps_bytes_and_read_back(kind):
    import gguf

    values = weights(kind)
    ours = quantize_q6_k(values)
    assert ours.shape == (48, 2 * Q6_K_BLOCK_BYTES)
    assert np.array_equal(ours, llama_cpp_q6_k(values))
    back = gguf.quants.dequantize(ours, gguf.GGMLQuantizationType.Q6_K).reshape(values.shape)
    if kind == "gaussian":  # 6.6 bits per weight: RMS error 1.8% of the weights' RMS (measured)
        assert np.sqrt(np.mean((back - values) ** 2)) < 0.025 * np.sqrt(np.mean(values ** 2))
        q8 = gguf.quants.dequantize(gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0),
                                    gguf.GGMLQuantizationType.Q8_0).reshape(values.shape)
        assert np.abs(back - values).mean() > np.abs(q8 - values).mean()  # fewer bits than Q8_0, more error
    assert np.abs(back - values).max() <= np.abs(values).max() / 31  # each value within half a quant step


def test_rows_that_are_no_multiple_of_256_are_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_q6_k(np.zeros((2, 576), np.float32))


@needs_llama_cpp
@pytest.mark.parametrize("hidden", [256, 96])
def test_a_q6_k_export_is_the_file_llama_cpp_would_write(hidden, tokenizer, tmp_path):
    """`export --quant q6_k` equals, tensor by tensor (type and bytes), llama.cpp's own Q6_K quantization of the f32
    export; 96-wide rows take llama.cpp's Q8_0 fallback as SmolLM2's 576-wide ones do. llama.cpp then runs it."""
    import gguf
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tuneforge.deploy.gguf_export import export_gguf

    values = tiny_llama_config(len(tokenizer)).to_dict()
    values.update(hidden_size=hidden, intermediate_size=2 * hidden, head_dim=hidden // 4, initializer_range=0.2)
    torch.manual_seed(3)
    source = tmp_path / "tiny"
    AutoModelForCausalLM.from_config(LlamaConfig(**values)).save_pretrained(source)
    tokenizer.save_pretrained(source)
    ours = export_gguf(str(source), tmp_path / "ours-q6_k.gguf", "q6_k")
    theirs = llama_cpp_quantize(export_gguf(str(source), tmp_path / "f32.gguf", "f32"), tmp_path / "llama-q6_k.gguf",
                                "q6_k")
    ours_tensors = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    theirs_tensors = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert ours_tensors.keys() == theirs_tensors.keys()
    for name, tensor in theirs_tensors.items():
        assert ours_tensors[name].tensor_type == tensor.tensor_type, name
        assert np.array_equal(np.asarray(ours_tensors[name].data), np.asarray(tensor.data)), name
    kinds = {t.tensor_type.name for t in ours_tensors.values()}
    assert kinds == ({"Q6_K", "F32"} if hidden == 256 else {"Q8_0", "F32"})
    prompts = [(text, tokenizer(text, add_special_tokens=False)["input_ids"]) for text in LLAMA_CPP_TEXTS[:2]]
    assert all(len(answer["tokens"]) == 4 for answer in llama_cpp_greedy(ours, prompts, 4))

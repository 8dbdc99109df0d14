"""`tuneforge export --format gguf`: the file reads back (gguf's own reader, transformers' GGUF loader and, where it
is installed, llama.cpp itself) as the model it was written from: same tensors, metadata, tokenizer, chat template
and logits.

llama.cpp runs through `llama-cpp-python` where it is installed (it compiles llama.cpp from source), else through the
prebuilt llama.cpp binaries of the npm package node-llama-cpp, which `make test` installs into .venv/node-llama-cpp
(another folder can be named in $TUNEFORGE_NODE_LLAMA_CPP). With neither, the llama.cpp tests fail and say how to
install it: a skipped check would look like a passed one."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, read_gguf, run_cli, tiny_llama_config
from tests.unit.test_merge import IDS, make_lora_run

NODE_LLAMA_CPP = Path(os.environ.get("TUNEFORGE_NODE_LLAMA_CPP", ROOT / ".venv" / "node-llama-cpp"))
NODE_LLAMA_CPP_ENTRY = NODE_LLAMA_CPP / "node_modules" / "node-llama-cpp" / "dist" / "index.js"
if importlib.util.find_spec("llama_cpp") is not None:
    LLAMA_CPP_RUNNER = "llama-cpp-python"
elif shutil.which("node") and NODE_LLAMA_CPP_ENTRY.is_file():
    LLAMA_CPP_RUNNER = "node-llama-cpp"
else:
    LLAMA_CPP_RUNNER = None


def needs_llama_cpp(test):
    """The test fails (never skips) when no llama.cpp is installed: `make test` installs one."""

    @functools.wraps(test)
    def checked(*args, **kwargs):
        if LLAMA_CPP_RUNNER is None:
            pytest.fail(f"no llama.cpp to run the GGUF file: run `make test-tools` (installs node-llama-cpp into "
                        f"{NODE_LLAMA_CPP}), or pip install llama-cpp-python")
        return test(*args, **kwargs)

    return checked


# Greedy decoding in llama.cpp through node-llama-cpp: per prompt, llama.cpp's own tokenization of the text and, for
# the given token ids, each generated token with the probability llama.cpp gave it (end-of-generation tokens too).
NODE_GREEDY = """
import {readFileSync} from "node:fs";
import {pathToFileURL} from "node:url";
const request = JSON.parse(readFileSync(process.argv[2], "utf8"));
const {getLlama} = await import(pathToFileURL(request.entry).href);
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath: request.model});
const context = await model.createContext({contextSize: request.n_ctx, threads: 1});
const answers = [];
for (const prompt of request.prompts) {
  const sequence = context.getSequence();
  const tokens = [], probabilities = [];
  for await (const step of sequence.evaluateWithMetadata(prompt.ids, {confidence: true},
                                                          {temperature: 0, yieldEogToken: true})) {
    tokens.push(step.token);
    probabilities.push(step.confidence);
    if (tokens.length >= request.max_tokens) break;
  }
  answers.push({tokenized: Array.from(model.tokenize(prompt.text, true)), tokens, probabilities});
  sequence.dispose();
}
console.log(JSON.stringify(answers));
process.exit(0);
"""


def llama_cpp_greedy(gguf_file: Path, prompts: list[tuple[str, list[int]]], max_tokens: int) -> list[dict]:
    """For each (text, token ids): llama.cpp's tokenization of the text ("tokenized") and its greedy continuation of
    the ids ("tokens", end-of-generation tokens included; "probabilities" where the runner reports them)."""
    if LLAMA_CPP_RUNNER == "llama-cpp-python":
        from llama_cpp import Llama

        llm = Llama(model_path=str(gguf_file), n_ctx=256, n_threads=1, verbose=False)
        answers = []
        for text, ids in prompts:
            tokens = []
            for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
                tokens.append(token)
                if len(tokens) == max_tokens:
                    break
            answers.append({"tokenized": llm.tokenize(text.encode(), add_bos=False, special=True), "tokens": tokens})
        return answers
    request = {"entry": str(NODE_LLAMA_CPP_ENTRY), "model": str(gguf_file), "n_ctx": 256, "max_tokens": max_tokens,
               "prompts": [{"text": text, "ids": ids} for text, ids in prompts]}
    # A script file, not `node -e`: node-llama-cpp tests its binary in a child process started with node's own
    # arguments, which would run an -e script again.
    with tempfile.TemporaryDirectory() as folder:
        script, request_file = Path(folder) / "llama_cpp_greedy.mjs", Path(folder) / "request.json"
        script.write_text(NODE_GREEDY)
        request_file.write_text(json.dumps(request))
        result = subprocess.run(["node", str(script), str(request_file)], capture_output=True, text=True,
                                timeout=300, env={**os.environ, "NODE_NO_WARNINGS": "1"})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# llama.cpp's own quantizer (llama_model_quantize, what `llama-quantize` calls), from node-llama-cpp's prebuilt
# libllama through ctypes. Only the first two fields of its parameter struct are set (nthread, ftype: unchanged
# across llama.cpp versions); the buffer is larger than any version's struct, which the library fills by value.
LLAMA_FTYPES = {"q4_0": 2, "q8_0": 7, "q5_0": 8, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}  # llama.h enum llama_ftype


def llama_cpp_library(name: str):
    """One of node-llama-cpp's prebuilt llama.cpp libraries ("libggml-base", "libggml", "libllama"), loaded."""
    import ctypes

    libraries = NODE_LLAMA_CPP.glob("node_modules/@node-llama-cpp/linux-x64/bins/linux-x64/lib*.so")
    found = [lib for lib in sorted(libraries) if lib.name.split(".")[0] == name]
    if not found:
        pytest.fail(f"no llama.cpp library {name} under {NODE_LLAMA_CPP}: run `make test-tools`")
    return ctypes.CDLL(str(found[0]), mode=ctypes.RTLD_GLOBAL)


def llama_cpp_quantize(source: Path, out: Path, ftype: str) -> Path:
    import ctypes

    for dependency in ("libggml-base", "libggml"):
        llama_cpp_library(dependency)
    llama = llama_cpp_library("libllama")

    class Params(ctypes.Structure):
        _fields_ = [("nthread", ctypes.c_int32), ("ftype", ctypes.c_int32), ("rest", ctypes.c_uint8 * 1016)]

    llama.llama_model_quantize_default_params.restype = Params
    llama.llama_model_quantize.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(Params)]
    llama.llama_model_quantize.restype = ctypes.c_uint32
    params = llama.llama_model_quantize_default_params()
    params.nthread, params.ftype = 1, LLAMA_FTYPES[ftype]
    assert llama.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


class Greedy(NamedTuple):
    """transformers' greedy continuation: per step the token, its probability, the runner-up and the log-probability
    gap between them (how far another runtime's rounding would have to move the logits to flip the choice)."""
    tokens: list[int]
    probabilities: list[float]
    runners_up: list[int]
    gaps: list[float]


def transformers_greedy(model, ids: list[int], max_tokens: int) -> Greedy:
    """Greedy tokens (no stopping at end-of-generation, like llama_cpp_greedy), with probabilities and margins."""
    greedy = Greedy([], [], [], [])
    with torch.no_grad():
        for _ in range(max_tokens):  # the whole sequence each step: short prompts, and no cache API to depend on
            logprobs = model(input_ids=torch.tensor([ids + greedy.tokens])).logits[0, -1].float().log_softmax(-1)
            top = logprobs.topk(2)
            greedy.tokens.append(int(top.indices[0]))
            greedy.probabilities.append(float(top.values[0].exp()))
            greedy.runners_up.append(int(top.indices[1]))
            greedy.gaps.append(float(top.values[0] - top.values[1]))
    return greedy


# A step whose top two tokens are closer than this (in log-probability) is a tie at llama.cpp's precision: its f16
# KV cache moves probabilities by up to 3.5% (measured, see assert_llama_cpp_matches), i.e. log-probabilities by
# about 0.035. A random tiny model has such ties (a Qwen3 one: 0.4610 against 0.4568, a gap of 0.009).
TIE = 0.1


def assert_llama_cpp_matches(answers: list[dict], expected: list[Greedy], prompts: list[tuple[str, list[int]]],
                             min_compared: float = 0.75, tie: float = TIE,
                             probability_rtol: float | None = 0.1) -> None:
    """Same tokenization, same greedy tokens; where llama.cpp reports probabilities, the same ones (f32 file) up to
    llama.cpp's f16 KV cache: at most 3.5% apart, measured over 10 held-out demo prompts x 16 tokens.

    At a tie (gap below `tie`) llama.cpp may take transformers' runner-up instead; the two continuations then differ
    legitimately, so that prompt is compared up to there only. At least `min_compared` of all steps must be compared,
    so a model of ties cannot pass by comparing nothing."""
    compared = total = 0
    for answer, greedy, (text, ids) in zip(answers, expected, prompts):
        assert answer["tokenized"] == ids, text  # llama.cpp tokenizes the text as the HF tokenizer does
        total += len(greedy.tokens)
        for step, token in enumerate(answer["tokens"]):
            near = greedy.gaps[step] < tie
            assert token == greedy.tokens[step] or (near and token == greedy.runners_up[step]), (text, step)
            if "probabilities" in answer:
                assert probability_rtol is None or token != greedy.tokens[step] or np.isclose(
                    answer["probabilities"][step], greedy.probabilities[step], rtol=probability_rtol, atol=1e-4), \
                    (text, step)
            compared += 1
            if token != greedy.tokens[step]:
                break
        else:
            assert len(answer["tokens"]) == len(greedy.tokens), text
    assert compared >= min_compared * total, f"only {compared} of {total} steps compared: too many ties"


def source_logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()(input_ids=IDS).logits


def gguf_logits(gguf_file: Path) -> torch.Tensor:
    """Logits of the GGUF file as transformers' own GGUF loader (an independent reader) reconstructs the model.
    gguf_parsed_once changes how fast gguf-py parses (a plain view of the memory map, its tensor name map built once),
    not what: the reader and the loader are still theirs."""
    from transformers import AutoModelForCausalLM

    from tuneforge.model.load import gguf_parsed_once

    with gguf_parsed_once():
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    from tuneforge.deploy.gguf_export import export_gguf

    folder = tmp_path_factory.mktemp("gguf")
    return {quant: export_gguf(str(tiny_model_dir), folder / f"tiny-{quant}.gguf", quant)
            for quant in ("f32", "f16", "q8_0")}


def fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def test_metadata_tokenizer_and_chat_template_round_trip(exported, tiny_model_dir, tokenizer):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    meta = fields(read_gguf(exported["f32"]))
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == config.num_hidden_layers
    assert meta["llama.embedding_length"] == config.hidden_size
    assert meta["llama.feed_forward_length"] == config.intermediate_size
    assert meta["llama.attention.head_count"] == config.num_attention_heads
    assert meta["llama.attention.head_count_kv"] == config.num_key_value_heads
    assert meta["llama.context_length"] == config.max_position_embeddings
    assert meta["llama.rope.dimension_count"] == config.hidden_size // config.num_attention_heads
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    vocab = tokenizer.get_vocab()
    assert meta["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert len(meta["tokenizer.ggml.merges"]) > 40_000
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template


def test_tensors_round_trip_in_every_quant(exported, tiny_model_dir):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    # q/k rows are reordered for llama.cpp's rotary layout; the logits tests below cover them. The rest is verbatim.
    expected = {"token_embd.weight": state["model.embed_tokens.weight"],
                "output_norm.weight": state["model.norm.weight"],
                "blk.1.attn_v.weight": state["model.layers.1.self_attn.v_proj.weight"],
                "blk.0.ffn_down.weight": state["model.layers.0.mlp.down_proj.weight"],
                "blk.0.attn_norm.weight": state["model.layers.0.input_layernorm.weight"]}
    tolerance = {"f32": 0.0, "f16": 1e-3, "q8_0": 2e-2}
    weight_bytes = {}
    for quant, path in exported.items():
        tensors = {t.name: t for t in read_gguf(path).tensors}  # one read per file: parsing the vocabulary is slow
        weight_bytes[quant] = sum(int(t.n_bytes) for t in tensors.values())
        assert len(tensors) == 2 * 9 + 2  # 9 per block, embeddings, final norm; tied output: no output.weight
        for name, reference in expected.items():
            tensor = tensors[name]
            if reference.ndim == 1:  # norms stay fp32 in every quant, as llama.cpp's converter keeps them
                assert tensor.tensor_type == GGMLQuantizationType.F32, (quant, name)
            else:
                assert tensor.tensor_type.name == quant.upper(), (quant, name)
            values = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
            values = values.reshape(reference.shape)
            assert (values - reference).abs().max() <= tolerance[quant] * reference.abs().max() + 1e-12, (quant, name)
    assert weight_bytes["q8_0"] < 0.3 * weight_bytes["f32"] and weight_bytes["f16"] < 0.55 * weight_bytes["f32"]


def test_transformers_loads_the_file_with_the_source_logits_and_tokenizer(exported, tiny_model_dir, tokenizer):
    from transformers import AutoTokenizer

    reference = source_logits(tiny_model_dir)
    scale = reference.abs().max()
    assert (gguf_logits(exported["f32"]) - reference).abs().max() < 1e-5
    # f16 is not loaded here: its values are checked against the source by gguf-py's reader above, and loading a
    # file costs transformers ~6 s of vocabulary parsing; q8_0 is the lossy one whose logits are worth seeing.
    q8 = gguf_logits(exported["q8_0"])
    assert (q8 - reference).abs().max() < 3e-2 * scale
    assert (q8.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.8
    from tuneforge.model.load import gguf_parsed_once

    with gguf_parsed_once():
        rebuilt = AutoTokenizer.from_pretrained(exported["f32"].parent, gguf_file=exported["f32"].name)
    text = "Ines Kowalski opened a café in Tampere in 2023 — 3333 🦙 <|im_start|>user\nhi<|im_end|>"
    assert rebuilt(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert rebuilt.chat_template == tokenizer.chat_template


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"])
@needs_llama_cpp
def test_other_llama_family_architectures(tiny_model_dir, tokenizer, tmp_path, monkeypatch, model_type):
    from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, MistralConfig, Phi3Config,
                              Qwen2Config, Qwen3Config)

    from tuneforge.deploy import gguf_export, merge
    from tuneforge.model.load import load_model, load_tokenizer

    # No Qwen tokenizer is available offline, and transformers would re-read ours as a Qwen2Tokenizer (another
    # pre-tokenizer) beside a qwen2 config: export the architecture with the SmolLM2 tokenizer as it is.
    monkeypatch.setattr(merge, "load_tokenizer", lambda source: tokenizer)

    values = tiny_llama_config(len(tokenizer)).to_dict()
    values["initializer_range"] = 0.2
    keep = {k: values[k] for k in ("initializer_range", "vocab_size", "hidden_size", "intermediate_size",
                                   "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                   "max_position_embeddings", "tie_word_embeddings", "rms_norm_eps",
                                   "bos_token_id", "eos_token_id", "pad_token_id")}
    # Each with the hyperparameters transformers' GGUF reader skips set away from its defaults (head size, window,
    # softcaps, query scale): `model:` must take them from the file as llama.cpp does
    # (load._with_what_transformers_skips).
    config = {"mistral": lambda: MistralConfig(**keep, sliding_window=None), "qwen2": lambda: Qwen2Config(**keep),
              "qwen3": lambda: Qwen3Config(**keep, head_dim=32),
              "gemma2": lambda: Gemma2Config(**keep, head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
                                             attn_logit_softcapping=5.0, final_logit_softcapping=8.0),
              # Gemma 3 as llama.cpp runs it: 5 local : 1 global layers, query scale 1/sqrt(head size), no softcaps.
              "gemma3": lambda: Gemma3TextConfig(**{**keep, "num_hidden_layers": 6}, head_dim=32,
                                                 query_pre_attn_scalar=32, sliding_window=8),
              "phi3": lambda: Phi3Config(**{**keep, "tie_word_embeddings": False}, sliding_window=8)}[model_type]()
    torch.manual_seed(1)
    # Not named after the family: transformers' GGUF loader guesses Mistral from a name containing "mistral".
    source = tmp_path / "tiny-model"
    AutoModelForCausalLM.from_config(config).save_pretrained(source)
    tokenizer.save_pretrained(source)
    out = gguf_export.export_gguf(str(source), tmp_path / "tiny.gguf", "f32")
    # `model: tiny.gguf` (transformers' GGUF reader, then the hyperparameters it skips) is the model that was written.
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    loaded = load_model(str(out))
    assert loaded.config.model_type == {"mistral": "llama"}.get(model_type, config.model_type)  # same graph
    with torch.no_grad():
        assert (loaded.eval()(input_ids=IDS).logits - source_logits(source)).abs().max() < 1e-5
    assert load_tokenizer(str(out)).chat_template == tokenizer.chat_template
    # llama.cpp runs the family's graph on it with transformers' greedy tokens (sharp weights: see sharp_model_dir).
    # llama.cpp runs Phi-3 without its sliding window (its loader sets no window for phi3, whatever the file says;
    # the export warns): compare with transformers running it so.
    unwindowed = {"sliding_window": None} if model_type == "phi3" else {}
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **unwindowed).eval()
    prompts = [(text, tokenizer(text, add_special_tokens=False)["input_ids"]) for text in LLAMA_CPP_TEXTS]
    expected = [transformers_greedy(model, ids, 6) for _, ids in prompts]
    assert len({greedy.tokens[0] for greedy in expected}) > 1  # the model tells the prompts apart
    assert_llama_cpp_matches(llama_cpp_greedy(out, prompts, 6), expected, prompts)


def test_a_lora_run_is_exported_merged(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneforge.deploy.gguf_export import export_gguf

    run = make_lora_run(tiny_model_dir, tmp_path / "run")
    out = export_gguf(str(run), tmp_path / "run.gguf", "f32")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(base, run).eval()(input_ids=IDS).logits
    assert (gguf_logits(out) - expected).abs().max() < 1e-4
    assert (source_logits(tiny_model_dir) - expected).abs().max() > 1e-2  # the adapter is really in the file


def test_bad_exports_are_refused_in_one_line(tiny_model_dir, tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tuneforge.deploy.gguf_export import export_gguf
    from tuneforge.errors import UserError

    with pytest.raises(UserError, match=r"must end in \.gguf"):
        export_gguf(str(tiny_model_dir), tmp_path / "model.bin", "f32")
    with pytest.raises(UserError, match="allowed: f32, f16, q8_0"):
        export_gguf(str(tiny_model_dir), tmp_path / "model.gguf", "q4_k")
    with pytest.raises(UserError, match="does not exist"):
        export_gguf(str(tiny_model_dir), tmp_path / "missing" / "model.gguf", "f32")
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    with pytest.raises(UserError, match="architecture 'gpt2' cannot be exported"):
        export_gguf(str(gpt2), tmp_path / "gpt2.gguf", "f32")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.gguf.*"))  # nothing half-written left

    taken = tmp_path / "taken.gguf"
    taken.write_bytes(b"mine")
    result = run_cli("export", str(tiny_model_dir), "--format", "gguf", "--quant", "f32", "-o", str(taken))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "already exists" in result.stderr and taken.read_bytes() == b"mine"
    result = run_cli("export", str(tiny_model_dir), "--quant", "q8_0", "-o", str(taken), "--force")
    assert result.returncode == 0, result.stderr
    assert taken.read_bytes()[:4] == b"GGUF"
    umask = os.umask(0)
    os.umask(umask)
    assert taken.stat().st_mode & 0o777 == 0o666 & ~umask  # readable as any new file is, not owner-only


LLAMA_CPP_TEXTS = ["The capital of Finland is", "def add(a, b):", "Ines Kowalski opened a cafe in",
                   "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def sharp_model_dir(tokenizer, tmp_path_factory) -> Path:
    """The tiny Llama with 10x larger random weights. At the usual 0.02 scale attention is nearly uniform and every
    prompt greedily repeats one token, so a GGUF with wrongly ordered q/k rows still matched; at 0.2 it does not."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sharp-llama")
    LlamaForCausalLM(tiny_llama_config(len(tokenizer), initializer_range=0.2)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@needs_llama_cpp
def test_llama_cpp_greedy_output_matches_transformers(sharp_model_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from tuneforge.deploy.gguf_export import export_gguf

    model = AutoModelForCausalLM.from_pretrained(sharp_model_dir, dtype=torch.float32).eval()
    prompts = [(text, tokenizer(text, add_special_tokens=False)["input_ids"]) for text in LLAMA_CPP_TEXTS]
    expected = [transformers_greedy(model, ids, 8) for _, ids in prompts]
    assert len({greedy.tokens[0] for greedy in expected}) == len(prompts)  # the model really tells the prompts apart
    f32 = export_gguf(str(sharp_model_dir), tmp_path / "sharp-f32.gguf", "f32")
    assert_llama_cpp_matches(llama_cpp_greedy(f32, prompts, 8), expected, prompts)
    q8 = export_gguf(str(sharp_model_dir), tmp_path / "sharp-q8_0.gguf", "q8_0")
    quantized = llama_cpp_greedy(q8, prompts, 8)
    assert all(len(answer["tokens"]) == 8 for answer in quantized)  # loads and answers
    first = [answer["tokens"][0] == greedy.tokens[0] for answer, greedy in zip(quantized, expected)]
    # Random weights give flat distributions (top token ~0.5%), so 8-bit rounding may flip a near tie: most first
    # tokens agree, not all; the e2e test checks q8_0 answers on a trained model.
    print(f"llama.cpp ({LLAMA_CPP_RUNNER}): f32 greedy = transformers token for token; q8_0 first token agrees on "
          f"{sum(first)}/{len(first)} prompts")
    assert sum(first) >= len(first) // 2


@needs_llama_cpp
def test_model_from_a_k_quant_gguf_is_the_model_llama_cpp_runs(tokenizer, tmp_path, monkeypatch):
    """What users download: a Q4_K_M file. Made here by llama.cpp's own quantizer from our f32 export of a tiny Llama
    whose rows are multiples of 256 (K-quant super-blocks). `model:` dequantizes it (gguf-py's reader) to exactly the
    blocks' values, and answers greedily as llama.cpp does on the same file."""
    import gguf
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tuneforge.deploy.gguf_export import export_gguf
    from tuneforge.model.load import load_model

    values = tiny_llama_config(len(tokenizer)).to_dict()
    values.update(hidden_size=256, intermediate_size=512, head_dim=64, initializer_range=0.2)
    torch.manual_seed(2)
    source = tmp_path / "tiny-256"
    AutoModelForCausalLM.from_config(LlamaConfig(**values)).save_pretrained(source)
    tokenizer.save_pretrained(source)
    quantized = llama_cpp_quantize(export_gguf(str(source), tmp_path / "f32.gguf", "f32"), tmp_path / "q4km.gguf",
                                   "q4_k_m")
    tensors = {t.name: t for t in read_gguf(quantized).tensors}
    kinds = {t.tensor_type.name for t in tensors.values()}
    assert {"Q4_K", "Q6_K"} <= kinds, kinds  # llama.cpp's Q4_K_M mix: Q6_K for the embeddings and some ffn_down

    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    model = load_model(str(quantized)).eval()
    for gguf_name, weight in [("blk.0.ffn_gate.weight", model.model.layers[0].mlp.gate_proj.weight),
                              ("blk.1.ffn_down.weight", model.model.layers[1].mlp.down_proj.weight),
                              ("token_embd.weight", model.model.embed_tokens.weight)]:
        tensor = tensors[gguf_name]
        blocks = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(weight.shape)
        assert np.array_equal(weight.detach().numpy(), blocks), gguf_name
    source_weight = AutoModelForCausalLM.from_pretrained(source).model.layers[0].mlp.gate_proj.weight
    assert 0 < (model.model.layers[0].mlp.gate_proj.weight - source_weight).abs().max() < 0.1  # really 4-bit

    prompts = [(text, tokenizer(text, add_special_tokens=False)["input_ids"]) for text in LLAMA_CPP_TEXTS]
    expected = [transformers_greedy(model, ids, 6) for _, ids in prompts]
    assert len({greedy.tokens[0] for greedy in expected}) > 1
    # llama.cpp multiplies K-quant weights by activations it rounds to 8 bits (Q8_K): here its probabilities were up
    # to 36% (0.31 nats) away from the same weights in fp32, so a tie is a gap under 0.5 nats.
    assert_llama_cpp_matches(llama_cpp_greedy(quantized, prompts, 6), expected, prompts, tie=0.5,
                             probability_rtol=None)

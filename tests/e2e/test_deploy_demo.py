"""End to end on the embedded default (SmolLM2-135M-Instruct): a short LoRA run of the demo task goes through every
deploy path a user takes.

Merged (logits equal adapter-on-base), exported to GGUF (read back by the `gguf` package and, where a llama.cpp is
installed, run by llama.cpp with the same greedy tokens), and served by `tuneforge serve` in its own process, queried
with the official `openai` client: chat, streaming, the adapter by name against the base, a wrong key, a limit.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import EMBEDDED, ROOT, free_port, read_gguf, wait_until_serving
from tests.unit.test_export_gguf import (LLAMA_CPP_RUNNER, Greedy, assert_llama_cpp_matches, llama_cpp_greedy,
                                         needs_llama_cpp, transformers_greedy)

pytestmark = pytest.mark.e2e

TEST = ROOT / "examples" / "demo" / "test.jsonl"
KEY = "e2e-secret"
ANSWER = re.compile(r"NAME=[^;]+; CITY=\S+")


@pytest.fixture(scope="module")
def demo_dir(demo_run):
    """The session's shared demo run (tests/conftest.py): the loss is under 0.1 from about step 8, and the adapter
    answers in the demo format."""
    return demo_run.run_dir


@pytest.fixture(scope="module")
def questions() -> list[list[dict]]:
    from tuneforge.eval.compare import prompts_and_references

    return prompts_and_references(str(TEST))[0][:2]


@pytest.fixture(scope="module")
def prompts(questions, tokenizer) -> list[tuple[str, list[int]]]:
    """(chat-rendered text, its token ids) for each held-out question."""
    from tuneforge.data.tokenize import render_prompt

    texts = [render_prompt(tokenizer, messages) for messages in questions]
    return [(text, tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]


@pytest.fixture(scope="module")
def merged(demo_dir, tmp_path_factory):
    from tuneforge.deploy.merge import merge_run

    return merge_run(demo_dir, tmp_path_factory.mktemp("merged") / "demo-merged")


@pytest.fixture(scope="module")
def merged_model(merged):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def greedy(merged_model, prompts) -> list[Greedy]:
    """The merged model's greedy continuation (16 tokens, past <|im_end|>) of each prompt, with probabilities."""
    return [transformers_greedy(merged_model, ids, 16) for _, ids in prompts]


def answer_tokens(tokens: list[int], tokenizer) -> list[int]:
    assert tokenizer.eos_token_id in tokens, "no <|im_end|> within 16 tokens"
    return tokens[:tokens.index(tokenizer.eos_token_id)]


@pytest.fixture(scope="module")
def gguf_f32(merged, tmp_path_factory):
    from tuneforge.deploy.gguf_export import export_gguf

    return export_gguf(str(merged), tmp_path_factory.mktemp("gguf") / "demo-f32.gguf", "f32")


def test_merged_logits_equal_adapter_on_base(demo_dir, merged, merged_model, prompts):
    from peft import PeftModel

    from tuneforge.model.load import load_model

    base = load_model(EMBEDDED, dtype=torch.float32).eval()
    ids = torch.tensor([prompts[0][1]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        adapter_logits = PeftModel.from_pretrained(base, demo_dir).eval()(input_ids=ids).logits
        merged_logits = merged_model(input_ids=ids).logits
        peft_merged_logits = PeftModel.from_pretrained(base, demo_dir).merge_and_unload()(input_ids=ids).logits
    # fp32 rounding of W + BA against W x + B(A x) over 30 layers: measured 1.7e-4 on logits up to 36 (the tiny
    # model in test_merge.py stays under 1e-4 absolute). Bit for bit what PEFT's own merge computes.
    assert (merged_logits - adapter_logits).abs().max() < 1e-4 * adapter_logits.abs().max()
    assert (merged_logits - peft_merged_logits).abs().max() < 1e-6
    assert (base_logits - adapter_logits).abs().max() > 1e-1  # 20 steps really changed the model
    assert not list(merged.glob("adapter_*")) and (merged / "chat_template.jinja").is_file()
    # What the anchors' merges lose, kept: the requested dtype, and the end of turn as a stop id for transformers
    # and vLLM (generation_config), with the trained chat template.
    from transformers import GenerationConfig

    from tuneforge.model.load import load_tokenizer

    tokenizer = load_tokenizer(str(merged))
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    stops = GenerationConfig.from_pretrained(merged).eos_token_id
    assert end_of_turn in (stops if isinstance(stops, list) else [stops])
    assert merged_model.dtype == torch.float32 and all(p.dtype == torch.float32 for p in merged_model.parameters())


def test_gguf_reads_back_with_the_merged_tensors_metadata_tokenizer_and_template(gguf_f32, merged_model, tokenizer):

    config, state = merged_model.config, merged_model.state_dict()
    reader = read_gguf(gguf_f32)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == config.num_hidden_layers == 30
    assert meta["llama.embedding_length"] == config.hidden_size
    assert meta["llama.attention.head_count_kv"] == config.num_key_value_heads
    assert meta["llama.context_length"] == config.max_position_embeddings
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    assert len(meta["tokenizer.ggml.tokens"]) == config.vocab_size == len(tokenizer)
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    # llama.cpp (and Ollama) stop at the end of turn the model was tuned to write
    assert meta["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template

    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 9 * config.num_hidden_layers + 2  # tied embeddings: no output.weight
    assert sum(int(np.prod(t.shape)) for t in tensors.values()) == sum(
        p.numel() for n, p in state.items() if n != "lm_head.weight")
    for gguf_name, hf_name in [("token_embd.weight", "model.embed_tokens.weight"),
                               ("blk.7.attn_v.weight", "model.layers.7.self_attn.v_proj.weight"),
                               ("blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj.weight"),
                               ("output_norm.weight", "model.norm.weight")]:
        tensor = tensors[gguf_name]
        assert list(tensor.shape[::-1]) == list(state[hf_name].shape), gguf_name  # GGUF lists dims innermost first
        assert np.array_equal(np.asarray(tensor.data).reshape(state[hf_name].shape), state[hf_name].numpy())


@needs_llama_cpp
def test_llama_cpp_answers_as_the_merged_model(gguf_f32, merged, greedy, prompts, tokenizer):
    from tuneforge.deploy.gguf_export import export_gguf

    assert_llama_cpp_matches(llama_cpp_greedy(gguf_f32, prompts, 16), greedy, prompts)
    for tokens, *_ in greedy:  # the trained answer format, then <|im_end|>
        assert ANSWER.fullmatch(tokenizer.decode(answer_tokens(tokens, tokenizer)))
    q8 = export_gguf(str(merged), gguf_f32.with_name("demo-q8_0.gguf"), "q8_0")
    assert q8.stat().st_size < 0.3 * gguf_f32.stat().st_size
    for answer in llama_cpp_greedy(q8, prompts, 16):
        assert ANSWER.fullmatch(tokenizer.decode(answer_tokens(answer["tokens"], tokenizer)))
    print(f"llama.cpp ({LLAMA_CPP_RUNNER}): f32 = transformers token for token; q8_0 answers in the trained format")


@pytest.fixture(scope="module")
def served(demo_dir, tmp_path_factory):
    """`tuneforge serve` in its own process: the embedded base with the run as adapter "demo"."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    port = free_port()
    with log.open("w") as out:  # a file, not a pipe: a pipe nobody reads would block the server once full
        process = subprocess.Popen(
            [sys.executable, "-m", "tuneforge", "serve", "--model", EMBEDDED, "--adapter", f"demo={demo_dir}",
             "--port", str(port), "--api-key", KEY, "--max-tokens-limit", "32"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_until_serving(process, port, log.read_text)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(timeout=30)


def openai_client(url: str, key: str = KEY):
    from openai import OpenAI

    return OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)


def test_served_adapter_answers_as_the_merged_model_and_the_base_does_not(served, questions, prompts, greedy,
                                                                          tokenizer):
    api = openai_client(served)
    assert [m.id for m in api.models.list().data] == [EMBEDDED, "demo"]
    tuned = api.chat.completions.create(model="demo", messages=questions[0], max_tokens=24, temperature=0)
    base = api.chat.completions.create(model=EMBEDDED, messages=questions[0], max_tokens=16, temperature=0)
    expected = answer_tokens(greedy[0][0], tokenizer)
    assert tuned.choices[0].message.content == tokenizer.decode(expected)
    assert ANSWER.fullmatch(tuned.choices[0].message.content)
    assert tuned.choices[0].finish_reason == "stop" and tuned.usage.completion_tokens == len(expected) + 1
    assert tuned.usage.prompt_tokens == len(prompts[0][1])
    assert base.choices[0].message.content != tuned.choices[0].message.content
    assert not ANSWER.fullmatch(base.choices[0].message.content)

    stream = api.chat.completions.create(model="demo", messages=questions[0], max_tokens=24, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really in pieces
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == tuned.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == tuned.usage.completion_tokens


def test_served_wrong_key_and_limits_are_refused(served, questions):
    import openai

    with pytest.raises(openai.AuthenticationError):
        openai_client(served, key="wrong").chat.completions.create(model="demo", messages=questions[0], max_tokens=4)
    api = openai_client(served)
    with pytest.raises(openai.BadRequestError, match="at most 32"):
        api.chat.completions.create(model="demo", messages=questions[0], max_tokens=500)
    with pytest.raises(openai.BadRequestError) as error:
        api.completions.create(model="demo", prompt="word " * 9000, max_tokens=8)
    assert error.value.status_code == 400 and error.value.code == "context_length_exceeded"

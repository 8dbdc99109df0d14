"""Batched generation: same greedy outputs as one prompt at a time, in the caller's order; stop sequences cut."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_llama_config
from tuneforge.eval.generation import cut_at_stop, generate_replies, generate_texts

CONVERSATIONS = [
    [{"role": "user", "content": "Name a colour."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France, please?"}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Write one long sentence about rivers, mountains, lakes and the sea in spring."}],
    [{"role": "user", "content": "2+2?"}],
]


@pytest.fixture(scope="module")
def chatty_model(tokenizer):
    """A tiny random Llama with untied, larger weights: it writes varied tokens (the tied default repeats one)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config(len(tokenizer), tie_word_embeddings=False, initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


def test_batched_greedy_equals_one_at_a_time(chatty_model, tokenizer):
    tiny_model = chatty_model
    batched = generate_replies(tiny_model, tokenizer, CONVERSATIONS, max_new_tokens=12, batch_size=4)
    single = [generate_replies(tiny_model, tokenizer, [c], max_new_tokens=12, batch_size=1)[0] for c in CONVERSATIONS]
    assert batched == single
    assert any(batched)  # a random model still writes something: the comparison is not between empty strings


def test_raw_continuations_keep_leading_indentation_and_stop(chatty_model, tokenizer):
    tiny_model = chatty_model
    prompts = ["def add(a, b):\n", "def f(x):\n    '''Square.'''\n"]
    batched = generate_texts(tiny_model, tokenizer, prompts, max_new_tokens=10, batch_size=2, stop=["\n\n"])
    single = [generate_texts(tiny_model, tokenizer, [p], max_new_tokens=10, batch_size=1, stop=["\n\n"])[0]
              for p in prompts]
    assert batched == single
    assert all("\n\n" not in text for text in batched) and any(batched)


def test_sampling_is_seedable(chatty_model, tokenizer):
    tiny_model = chatty_model
    torch.manual_seed(3)
    first = generate_replies(tiny_model, tokenizer, CONVERSATIONS[:2], max_new_tokens=8, temperature=1.0, top_p=0.9)
    torch.manual_seed(3)
    second = generate_replies(tiny_model, tokenizer, CONVERSATIONS[:2], max_new_tokens=8, temperature=1.0, top_p=0.9)
    assert first == second
    assert first != generate_replies(tiny_model, tokenizer, CONVERSATIONS[:2], max_new_tokens=8)  # it did sample


def test_cut_at_stop_takes_the_earliest_stop():
    assert cut_at_stop("    return x\n\ndef g():\n#", ["\n#", "\ndef"]) == "    return x"
    assert cut_at_stop("  a = 1  ", ["\nclass"]) == "  a = 1"


def test_generation_mid_training_uses_standard_attention_and_restores_packed(chatty_model, tokenizer):
    from tuneforge.model.attention import PACKED_ATTENTION, use_packed_attention, use_standard_attention

    expected = generate_replies(chatty_model, tokenizer, CONVERSATIONS, max_new_tokens=8, batch_size=5)
    use_packed_attention(chatty_model)
    chatty_model.train()
    try:
        # Left padding needs the padding mask that packed attention ignores: without the switch the answers change.
        assert generate_replies(chatty_model, tokenizer, CONVERSATIONS, max_new_tokens=8, batch_size=5) == expected
        assert chatty_model.config._attn_implementation == PACKED_ATTENTION and chatty_model.training
    finally:
        use_standard_attention(chatty_model)
        chatty_model.eval()


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_prompt_learning_models_generate_with_their_virtual_tokens_even_mid_training(method, tiny_model, tiny_model_dir,
                                                                                     tokenizer):
    """A PEFT prompt/prefix model as the training loop holds it (no inference loader, so PEFT's own `generate`, which
    drops a prefix): generate_texts still equals greedy decoding by PEFT's forward, which includes the virtual tokens."""
    from tuneforge.config import load_config
    from tuneforge.model.methods import apply_method

    cfg = load_config(None, [f"model={tiny_model_dir}", f"method={method}", f"{method}.num_virtual_tokens=4"])
    model = apply_method(tiny_model, cfg).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # decisive virtual tokens: generating without them could not match
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 2)
    prompts = ["Repeat the number 3 please.", "Hi"]
    produced = generate_texts(model, tokenizer, prompts, max_new_tokens=6, batch_size=2)

    def greedy_by_forward(prompt: str, base: bool = False) -> str:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        start = ids.shape[1]
        for _ in range(6):
            with torch.no_grad():
                if base:
                    with model.disable_adapter():
                        logits = model.get_base_model()(input_ids=ids).logits
                else:
                    logits = model(input_ids=ids).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            if ids[0, -1].item() == tokenizer.eos_token_id:
                break
        return tokenizer.decode(ids[0, start:], skip_special_tokens=True).strip()

    assert produced == [greedy_by_forward(p) for p in prompts]
    assert produced != [greedy_by_forward(p, base=True) for p in prompts]  # the virtual tokens changed the answers

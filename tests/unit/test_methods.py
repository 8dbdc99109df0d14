"""Every fine-tuning method through the one loop on a tiny random Llama: it learns, saves, reloads to identical
logits, resumes exactly without wrapping a second adapter, and prompt/prefix tuning's loss equals PEFT's own."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_jsonl
from tuneforge import run_dir as layout
from tuneforge.config import load_config
from tuneforge.data.batching import collate_packed, collate_padded
from tuneforge.data.tokenize import TokenizedExample
from tuneforge.errors import ConfigError
from tuneforge.method_registry import METHOD_NAMES
from tuneforge.model.attention import use_packed_attention, use_standard_attention
from tuneforge.model.bottleneck import BottleneckModel, add_bottleneck_adapters
from tuneforge.model.methods import apply_method, count_parameters, parameter_report
from tuneforge.model.trained import load_for_inference
from tuneforge.train import checkpoint as ckpt
from tuneforge.train.forward import batch_loss_sum
from tuneforge.train.loop import train

METHODS = METHOD_NAMES  # every method the registry lists
# Prompt learning trains a few hundred numbers from scratch: it needs a bigger step to move in 4 steps.
LEARNING_RATE = {"full": "1e-3", "prefix": "0.1", "prompt": "0.1"}
STEPS = 4


def rows(n=16):
    return [{"instruction": f"Repeat the number {i % 7}.", "output": f"{i % 7} {i % 7} {i % 7}"} for i in range(n)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("methods-data") / "train.jsonl", rows())


def overrides(model_dir, data_file, out, method, *extra):
    # All 16 rows in each step: every step's loss is over the same examples, so a falling loss means learning.
    return [f"model={model_dir}", f"data.train={data_file}", f"output_dir={out}", f"method={method}",
            f"train.max_steps={STEPS}", "train.batch_size=16", f"train.lr={LEARNING_RATE.get(method, '1e-2')}",
            "train.warmup_ratio=0", "train.save_every=2", "lora.r=4", "prefix.num_virtual_tokens=4",
            "prompt.num_virtual_tokens=4", *extra]


def step_losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, data_file, tmp_path_factory):
    """One 4-step run per method, made on first use."""
    done = {}

    def get(method):
        if method not in done:
            out = tmp_path_factory.mktemp(f"run-{method}")
            done[method] = train(load_config(None, overrides(tiny_model_dir, data_file, out, method)),
                                 show_progress=False)
        return done[method]

    return get


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def greedy_generate(model, ids, mask=None, new_tokens=4):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                              max_new_tokens=new_tokens, do_sample=False)


def greedy_by_forward(model, ids, new_tokens=4):
    """Greedy decoding the slow way: the model's full forward over the whole sequence for every new token."""
    with torch.no_grad():
        for _ in range(new_tokens):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids


# ---------------------------------------------------------------------------------------------------------------------
# Every method: learns, saves, reloads, chats, resumes.


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_saves_reloads_and_resumes(method, runs, tiny_model_dir, data_file, tmp_path):
    result = runs(method)
    run = result.run_dir
    losses = step_losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 1e-3, losses  # a few steps lower the (same-examples) training loss
    assert json.loads((run / "tuneforge.json").read_text())["method"] == method

    # save -> reload gives the trained model's logits; greedy generation (chat) agrees too.
    reloaded, tokenizer = load_for_inference(str(run))
    ids = torch.tensor([tokenizer("Repeat the number 3.")["input_ids"]])
    diff = (logits_of(reloaded, ids) - logits_of(result.model, ids)).abs().max().item()
    assert diff < 1e-5, diff
    generated = greedy_generate(reloaded, ids)
    assert torch.equal(generated, greedy_by_forward(reloaded, ids))  # generation applies what training trained
    assert torch.equal(generated, greedy_generate(result.model, ids))

    # Resume from the step-2 checkpoint in a fresh run directory: steps 3-4 and the saved weights equal the
    # uninterrupted run's, and the model carries exactly the adapter it had (never a second one on top).
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(layout.checkpoint_dir(run, 2), layout.checkpoint_dir(resumed_dir, 2))
    resumed = train(load_config(None, overrides(tiny_model_dir, data_file, resumed_dir, method, "train.resume=auto")),
                    show_progress=False)
    again = step_losses(resumed_dir)
    assert sorted(again) == [3, 4]
    for step in (3, 4):
        assert abs(again[step] - losses[step]) < 1e-6, (step, again[step], losses[step])
    names = [n for n, _ in resumed.model.named_parameters()]
    assert names == [n for n, _ in result.model.named_parameters()]
    assert count_parameters(resumed.model) == count_parameters(result.model)
    final, reference = ckpt.trainable_state(resumed.model), ckpt.trainable_state(result.model)
    assert final.keys() == reference.keys()
    assert max((final[k] - reference[k]).abs().max().item() for k in final) < 1e-6


def test_training_on_an_adapter_run_is_refused(runs, data_file, tmp_path):
    lora_run = runs("lora").run_dir
    cfg = load_config(None, [f"model={lora_run}", f"data.train={data_file}", f"output_dir={tmp_path / 'again'}"])
    with pytest.raises(ConfigError, match="is a lora run .* not a base model"):
        train(cfg, show_progress=False)


@pytest.mark.parametrize("method", ["lora", "dora", "adapter", "prefix", "prompt"])
def test_a_second_adapter_is_never_wrapped_on(method, tiny_model, tiny_model_dir):
    cfg = load_config(None, [f"model={tiny_model_dir}", f"method={method}"])
    wrapped = apply_method(tiny_model, cfg)
    for second in ("lora", method):
        with pytest.raises(ConfigError, match="already carries an adapter"):
            apply_method(wrapped, load_config(None, [f"model={tiny_model_dir}", f"method={second}"]))


# ---------------------------------------------------------------------------------------------------------------------
# QLoRA: the 4-bit base.


def test_qlora_base_is_4bit_and_the_log_states_its_memory(runs, caplog, tiny_model_dir, data_file, tmp_path):
    import bitsandbytes as bnb

    with caplog.at_level(logging.INFO, logger="tuneforge"):
        model, _ = load_for_inference(str(runs("qlora").run_dir))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("qlora: base model weights"))
    before, after = (float(part.split(" MB")[0].split()[-1]) for part in line.split("->"))
    assert after < before
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in both layers; the tied head stays full precision
    weight = quantized[0].weight
    assert weight.quant_state.quant_type == "nf4" and weight.quant_state.nested  # double quantization
    # Inference runs the arithmetic training ran: no switch to bitsandbytes' bf16-scaled CPU layout in eval mode
    # (AVX512-BF16 machines), which would move the base the adapter was trained on by a few bf16 ulps.
    x = torch.randn(5, quantized[0].in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        evaluated = quantized[0](x)
    assert weight.quant_state.nested and not getattr(weight.quant_state, "packing_format_for_cpu", False)
    dequantized = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    assert (evaluated - x @ dequantized.t()).abs().max().item() < 1e-6
    saved = load_file(runs("qlora").run_dir / "adapter_model.safetensors")
    assert saved and all("lora_" in name for name in saved)  # only the adapter is saved, never the 4-bit base


# ---------------------------------------------------------------------------------------------------------------------
# Our bottleneck adapter.


def test_adapter_starts_as_the_base_model_exactly(tiny_model, tiny_model_dir):
    ids = torch.tensor([[1, 520, 9531, 198, 42, 2, 198, 1, 4093]])
    base_logits = logits_of(tiny_model, ids)
    wrapped = apply_method(tiny_model, load_config(None, [f"model={tiny_model_dir}", "method=adapter"]))
    assert torch.equal(logits_of(wrapped, ids), base_logits)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("adapters.") for n in trainable)  # the base stays frozen


def test_adapter_sizes_and_placement(tiny_model, tiny_model_dir):
    from tuneforge.config import AdapterSettings

    hidden, layers = 64, 2
    both = add_bottleneck_adapters(tiny_model, AdapterSettings(reduction_factor=8))
    per_adapter = 2 * hidden * 8 + 8 + hidden  # down (with bias) + up (with bias), bottleneck 64 / 8
    assert count_parameters(both)[0] == layers * 2 * per_adapter
    assert "trainable params: 4,384 ||" in parameter_report(both)  # 2 layers x 2 blocks x 1,096

    fresh = load_for_inference(str(tiny_model_dir))[0]
    mlp_only = add_bottleneck_adapters(fresh, AdapterSettings(bottleneck_dim=5, placement="mlp",
                                                               non_linearity="tanh"))
    assert [sorted(a.keys()) for a in mlp_only.adapters] == [["mlp"], ["mlp"]]
    assert mlp_only.adapters[0]["mlp"].down.out_features == 5  # bottleneck_dim wins over reduction_factor
    assert isinstance(mlp_only.adapters[0]["mlp"].act, torch.nn.Tanh)


def test_adapter_placement_hooks_only_its_blocks_and_a_trained_adapter_changes_the_output(tiny_model_dir):
    from tuneforge.config import AdapterSettings

    model = load_for_inference(str(tiny_model_dir))[0]
    ids = torch.tensor([[1, 42, 4093, 198]])
    base_logits = logits_of(model, ids)
    wrapped = add_bottleneck_adapters(model, AdapterSettings(placement="attention", bottleneck_dim=4))
    for layer in model.model.layers:
        assert len(layer.self_attn._forward_hooks) == 1 and not layer.mlp._forward_hooks
    with torch.no_grad():
        wrapped.adapters[0]["attention"].up.weight.fill_(0.5)  # as if trained: no longer the identity
    assert (logits_of(wrapped, ids) - base_logits).abs().max() > 1e-3


def test_adapter_reload_refuses_a_model_of_another_shape(runs, tiny_model_dir, tmp_path):
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config
    from tuneforge.errors import UserError

    run = runs("adapter").run_dir
    assert (run / "bottleneck_config.json").is_file() and (run / "adapter_model.safetensors").is_file()
    other = LlamaForCausalLM(tiny_llama_config(1000, num_hidden_layers=3))
    with pytest.raises(UserError, match="do not fit a model with 3 layers"):
        BottleneckModel.from_pretrained(other, run)


# ---------------------------------------------------------------------------------------------------------------------
# Prompt and prefix tuning: the loop's forward (packed and padded) equals PEFT's forward.


def examples_for(tokenizer):
    made = []
    for prompt, answer in [("Repeat 3.", " 3 3 3"), ("Say the city: Tampere is nice.", " Tampere"), ("Hi", " Hello!")]:
        p, a = tokenizer(prompt)["input_ids"], tokenizer(answer)["input_ids"] + [tokenizer.eos_token_id]
        made.append(TokenizedExample(input_ids=p + a, target=[False] * len(p) + [True] * len(a),
                                     source=f"row {len(made)}"))
    return made


def peft_loss(model, examples, pad_id):
    """PEFT's own forward on a right-padded batch, labels -100 outside the answers: mean over answer tokens."""
    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n], mask[row, :n] = torch.tensor(ex.input_ids), 1
        labels[row, :n] = torch.tensor([t if is_target else -100 for t, is_target in zip(ex.input_ids, ex.target)])
    use_standard_attention(model)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_prompt_learning_loss_equals_peft_forward(method, tiny_model, tiny_model_dir, tokenizer):
    cfg = load_config(None, [f"model={tiny_model_dir}", f"method={method}", f"{method}.num_virtual_tokens=5"])
    model = apply_method(tiny_model, cfg).eval()
    with torch.no_grad():  # a trained-looking prompt: not the init, so a misplaced prompt would change the loss
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.5)
    examples = examples_for(tokenizer)
    reference = peft_loss(model, examples, tokenizer.pad_token_id)

    padded = collate_padded(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        padded_loss = batch_loss_sum(model, padded).item() / padded.num_targets
    assert abs(padded_loss - reference) < 1e-5

    packed = collate_packed(examples)
    use_packed_attention(model)
    with torch.no_grad():
        packed_loss = batch_loss_sum(model, packed).item() / packed.num_targets
    assert abs(packed_loss - reference) < 1e-5

    # The virtual tokens really are in play: the same model without them scores differently.
    with torch.no_grad(), model.disable_adapter():
        use_standard_attention(model)
        assert abs(batch_loss_sum(model.get_base_model(), padded).item() / padded.num_targets - reference) > 1e-3


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_prompt_learning_generates_with_its_virtual_tokens_in_padded_batches(method, runs, tokenizer):
    model, _ = load_for_inference(str(runs(method).run_dir))
    with torch.no_grad():  # make the virtual tokens decisive, so generating without them could not pass
        for name, param in model.named_parameters():
            if "prompt_encoder" in name:
                param.add_(torch.randn_like(param) * 2)
    long, short = tokenizer("Repeat the number 3 please.")["input_ids"], tokenizer("Hi")["input_ids"]
    pad = len(long) - len(short)
    batch = torch.tensor([long, [tokenizer.pad_token_id] * pad + short])  # left-padded, as eval generates
    mask = torch.tensor([[1] * len(long), [0] * pad + [1] * len(short)])
    generated = greedy_generate(model, batch, mask)
    assert torch.equal(generated[0], greedy_by_forward(model, torch.tensor([long]))[0])
    assert torch.equal(generated[1, pad:], greedy_by_forward(model, torch.tensor([short]))[0])
    # The first generated token's scores are the tuned model's forward logits, far from the base model's.
    with torch.no_grad():
        scores = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=1, do_sample=False,
                                output_scores=True, return_dict_in_generate=True).scores[0]
        tuned = model(input_ids=torch.tensor([short])).logits[0, -1]
        with model.disable_adapter():
            base = model(input_ids=torch.tensor([short])).logits[0, -1]
    assert (scores[1] - tuned).abs().max() < 1e-4
    assert (tuned - base).abs().max() > 1e-2


def test_prompt_init_from_text_and_bad_combinations(tiny_model, tiny_model_dir, tokenizer):
    cfg = load_config(None, [f"model={tiny_model_dir}", "method=prompt", "prompt.num_virtual_tokens=3",
                             "prompt.init=text", "prompt.init_text=Repeat the number"])
    model = apply_method(tiny_model, cfg)
    words = tokenizer("Repeat the number")["input_ids"][:3]
    embedded = model.get_base_model().get_input_embeddings().weight[words]
    assert torch.allclose(model.get_prompt(batch_size=1)[0], embedded)

    from tuneforge.config import validate_for_training

    for extra, message in [(["prompt.init=text"], "prompt.init_text: missing"),
                           (["prompt.init_text=hello"], "prompt.init_text: given, but prompt.init is 'vocab'"),
                           (["method=prefix", "train.gradient_checkpointing=true"], "not supported with method")]:
        bad = load_config(None, [f"model={tiny_model_dir}", "method=prompt", "data.train=README.md", *extra])
        with pytest.raises(ConfigError, match=message):
            validate_for_training(bad)
    with pytest.raises(ConfigError, match="method: got 'ia3', allowed: full, lora, qlora"):
        load_config(None, ["method=ia3"])


# ---------------------------------------------------------------------------------------------------------------------
# The parameter report on a real architecture, without weights.


def test_lora_parameter_count_on_llama2_7b_meta():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
        base_total = count_parameters(model)[1]
        expected = sum(16 * (m.in_features + m.out_features) for name, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and name != "lm_head")
        wrapped = apply_method(model, load_config(None, ["method=lora", "lora.r=16"]))
    # r x (d_in + d_out) per targeted layer: 32 x 16 x (4 x (4096 + 4096) + 3 x (4096 + 11008)) = 39,976,960
    assert expected == 39_976_960
    trainable, total = count_parameters(wrapped)
    assert trainable == expected and base_total == 6_738_415_616 and total == base_total + expected
    assert parameter_report(wrapped) == ("trainable params: 39,976,960 || all params: 6,778,392,576 || "
                                         "trainable%: 0.5898")


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_multiple_choice_scores_prompt_learning_with_its_virtual_tokens(method, tiny_model, tiny_model_dir, tokenizer):
    """log P(continuation | context) equals minus the training loss path's summed loss on the same tokens (that path
    equals PEFT's own forward, tested above), so MC scoring sees the learned prompt/prefix."""
    from tuneforge.eval.multiple_choice import continuation_logliks

    cfg = load_config(None, [f"model={tiny_model_dir}", f"method={method}", f"{method}.num_virtual_tokens=5"])
    model = apply_method(tiny_model, cfg).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.5)
    requests = [("Question: which colour is the sky?\nAnswer:", " blue"), ("Two plus two is", " four, of course")]
    scores = continuation_logliks(model, tokenizer, requests, batch_size=2)
    for (context, continuation), score in zip(requests, scores):
        ctx = tokenizer(context)["input_ids"]
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        example = TokenizedExample(ctx + cont, [False] * len(ctx) + [True] * len(cont), source="test")
        with torch.no_grad():
            expected = -batch_loss_sum(model, collate_padded([example], tokenizer.pad_token_id)).item()
        assert abs(score - expected) < 1e-4

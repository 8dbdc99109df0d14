"""tuneforge's preference losses and their first gradients against TRL 1.16's own trainers, on the same batch.

TRL is the reference: `DPOTrainer` (loss_type sigmoid and ipo), `CPOTrainer` (loss_type simpo with cpo_alpha 0; and
loss_type sigmoid with label smoothing, which is reference-free DPO with conservative smoothing), `ORPOTrainer`. Each
side gets the same tiny model, the same pairs of token ids and the same reference; TRL collates and computes its loss
with its own code (its padded [chosen; rejected] batch, its fused or full-logits head), tuneforge with its packed row
where the two answers share one copy of the prompt. The losses and every parameter's gradient must agree within 1e-5.

Why non-trivial references: at the first step of a fresh run the policy equals the reference, every log-ratio is 0
and DPO's loss is ln 2 whatever the code does with the ratios. So the full fine-tuning cases give both sides a
reference model perturbed away from the policy, and the LoRA case starts from random B matrices (the adapter-off
base is then a real reference, as in DPOTrainer's PEFT path without a "ref" adapter).
"""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch

from tests.conftest import tiny_llama_config
from tuneforge.data.batching import collate_pairs
from tuneforge.data.preference_tokens import TokenizedPair
from tuneforge.model.attention import use_packed_attention
from tuneforge.train import distributed
from tuneforge.train.preference import Objective, PreferenceLossSum, compute_reference

TOL = 1e-5
BETA = 0.3
IGNORE = -100


def random_pairs(n: int = 4, seed: int = 0) -> list[TokenizedPair]:
    """Prompts of 3-12 tokens and answers of 2-9, every answer token scored (as TRL scores every completion token)."""
    rng = random.Random(seed)

    def ids(k):
        return [rng.randrange(3, 5000) for _ in range(k)]

    pairs = []
    for i in range(n):
        chosen, rejected = ids(rng.randint(2, 9)), ids(rng.randint(2, 9))
        pairs.append(TokenizedPair(ids(rng.randint(3, 12)), chosen, [True] * len(chosen), rejected,
                                   [True] * len(rejected), f"pairs:{i + 1}"))
    return pairs


@pytest.fixture(scope="module")
def base(tokenizer):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(len(tokenizer)))


def perturbed(model, scale=0.02, seed=3):
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return other


def ours_loss_and_grads(model, pairs, objective: Objective, reference_model=None):
    """tuneforge's step loss (mean over pairs) and gradients; the reference pass as the loop runs it."""
    use_packed_attention(model)
    if objective.uses_reference:
        reference = reference_model if reference_model is not None else model
        use_packed_attention(reference)
        values = compute_reference(reference, pairs, 3, "cpu", distributed.World("none"))
        pairs = [dataclasses.replace(p, reference=tuple(v)) for p, v in zip(pairs, values)]
    model.train()
    batch = collate_pairs(pairs, prompt_targets=objective.nll)
    batch.nll_scale = len(pairs) / batch.num_nll_targets if objective.nll else 0.0
    loss_sum, _ = PreferenceLossSum(model, objective)(batch)
    loss = loss_sum / len(pairs)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def trl_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(trl_loss, trl_grad, our_loss, our_grad):
    assert abs(trl_loss - our_loss) < TOL, (trl_loss, our_loss)
    assert set(trl_grad) == set(our_grad)
    worst = max((trl_grad[n] - our_grad[n]).abs().max().item() for n in trl_grad)
    biggest = max(g.abs().max().item() for g in trl_grad.values())
    assert biggest > 100 * TOL  # a gradient that is there, so the comparison means something
    assert worst < TOL, worst


def one_row_dataset():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])


def trl_args(config_class, **kwargs):
    """A fair CPU peer: bf16 and gradient checkpointing off (TRL's configs turn both on), no dropout."""
    import tempfile

    return config_class(output_dir=tempfile.mkdtemp(), bf16=False, gradient_checkpointing=False, report_to=[],
                        use_cpu=True, per_device_train_batch_size=4, **kwargs)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_full_equal_trl_dpo_trainer(base, tokenizer, loss_type):
    from trl import DPOConfig, DPOTrainer

    pairs, reference = random_pairs(), perturbed(base)
    trainer = DPOTrainer(model=copy.deepcopy(base), ref_model=copy.deepcopy(reference), processing_class=tokenizer,
                         args=trl_args(DPOConfig, beta=BETA, loss_type=[loss_type]), train_dataset=one_row_dataset())
    inputs = trainer.data_collator([{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids,
                                     "rejected_ids": p.rejected_ids} for p in pairs])
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()
    objective = Objective("dpo" if loss_type == "sigmoid" else "ipo", BETA)
    assert_same(trl_loss.item(), trl_grads(trainer.model),
                *ours_loss_and_grads(copy.deepcopy(base), pairs, objective, copy.deepcopy(reference)))


def test_dpo_lora_reference_is_the_adapter_switched_off(base, tokenizer):
    """DPOTrainer given a LoRA config: its reference is the base with the adapter disabled, as tuneforge's is."""
    from peft import LoraConfig, get_peft_model
    from trl import DPOConfig, DPOTrainer

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    trainer = DPOTrainer(model=copy.deepcopy(base), processing_class=tokenizer, peft_config=lora,
                         args=trl_args(DPOConfig, beta=BETA, loss_type=["sigmoid"]), train_dataset=one_row_dataset())
    ours = get_peft_model(copy.deepcopy(base), lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for (name, theirs), (our_name, mine) in zip(trainer.model.named_parameters(), ours.named_parameters()):
            assert name == our_name
            if "lora_B" in name:
                theirs.copy_(torch.randn_like(theirs) * 0.05)
            mine.copy_(theirs)
    pairs = random_pairs(seed=1)
    inputs = trainer.data_collator([{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids,
                                     "rejected_ids": p.rejected_ids} for p in pairs])
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()
    our_loss, our_grad = ours_loss_and_grads(ours, pairs, Objective("dpo", BETA))
    assert abs(trl_loss.item() - 0.6931) > 1e-4  # the reference differs from the policy: ratios are not all 0
    assert_same(trl_loss.item(), trl_grads(trainer.model), our_loss, our_grad)


def cpo_style_features(pairs: list[TokenizedPair]) -> list[dict]:
    """The rows CPOTrainer's and ORPOTrainer's `tokenize_row` produce: prompt + answer, the prompt's labels -100."""
    rows = []
    for p in pairs:
        row = {"prompt_input_ids": p.prompt_ids, "prompt_attention_mask": [1] * len(p.prompt_ids)}
        for side, answer in (("chosen", p.chosen_ids), ("rejected", p.rejected_ids)):
            row[f"{side}_input_ids"] = p.prompt_ids + answer
            row[f"{side}_attention_mask"] = [1] * (len(p.prompt_ids) + len(answer))
            row[f"{side}_labels"] = [IGNORE] * len(p.prompt_ids) + answer
        rows.append(row)
    return rows


@pytest.mark.parametrize("case", ["simpo", "dpo-reference-free-label-smoothing"])
def test_simpo_and_smoothed_reference_free_dpo_equal_trl_cpo_trainer(base, tokenizer, case):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    if case == "simpo":
        settings, objective = dict(loss_type="simpo", beta=2.0, simpo_gamma=0.7), Objective("simpo", 2.0, gamma=0.7,
                                                                                          uses_reference=False)
    else:  # CPO's sigmoid loss with label smoothing: -(1-eps) log s(beta (c - r)) - eps log s(-beta (c - r))
        settings = dict(loss_type="sigmoid", beta=BETA, label_smoothing=0.2)
        objective = Objective("dpo", BETA, label_smoothing=0.2, uses_reference=False)
    trainer = CPOTrainer(model=copy.deepcopy(base), processing_class=tokenizer, train_dataset=one_row_dataset(),
                         args=trl_args(CPOConfig, cpo_alpha=0.0, max_length=64, **settings))
    pairs = random_pairs(seed=2)
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(cpo_style_features(pairs)))
    trl_loss.backward()
    assert_same(trl_loss.item(), trl_grads(trainer.model), *ours_loss_and_grads(copy.deepcopy(base), pairs,
                                                                                objective))


def test_orpo_equals_trl_orpo_trainer(base, tokenizer):
    """ORPO's NLL covers the chosen sequence's prompt and answer tokens (a token mean), as ORPOTrainer's does."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    trainer = ORPOTrainer(model=copy.deepcopy(base), processing_class=tokenizer, train_dataset=one_row_dataset(),
                          args=trl_args(ORPOConfig, beta=0.25, max_length=64))
    pairs = random_pairs(seed=3)
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(cpo_style_features(pairs)))
    trl_loss.backward()
    assert_same(trl_loss.item(), trl_grads(trainer.model),
                *ours_loss_and_grads(copy.deepcopy(base), pairs, Objective("orpo", 0.25, uses_reference=False)))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_kto_equals_trl_kto_trainer(base, tokenizer, method):
    """KTOTrainer (loss_type kto, its KL term from mismatched completions): tuneforge's KL pass over the same
    mismatched completions (each example's KL completion is the previous one's answer, TRL's rotation), then the
    weighted desirable / undesirable losses. Full fine-tuning against a perturbed reference model; LoRA from random B
    against the base with the adapter off."""
    from peft import LoraConfig, get_peft_model
    from trl import KTOConfig, KTOTrainer

    from tuneforge.data.batching import collate_unpaired
    from tuneforge.data.preference_tokens import TokenizedUnpaired
    from tuneforge.train.preference import set_kl

    rng = random.Random(4)
    answers = [p.chosen_ids for p in random_pairs(6, seed=4)]
    prompts = [p.prompt_ids for p in random_pairs(6, seed=5)]
    labels = [True, False, True, True, False, False]
    examples = [TokenizedUnpaired(prompts[i], answers[i], [True] * len(answers[i]), labels[i], answers[i - 1],
                                  [True] * len(answers[i - 1]), f"kto:{i}") for i in range(6)]
    rng.shuffle(examples)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear") if method == "lora" else None
    # Seeds chosen so the KL estimate is above 0 (measured 0.37 full, 0.20 LoRA): a negative one is clamped to 0 and
    # would leave the KL term untested.
    reference = perturbed(base, seed=0) if method == "full" else None
    args = trl_args(KTOConfig, beta=BETA, desirable_weight=1.3, undesirable_weight=0.8)
    trainer = KTOTrainer(model=copy.deepcopy(base), ref_model=copy.deepcopy(reference) if reference else None,
                         processing_class=tokenizer, peft_config=lora, args=args,
                         train_dataset=unpaired_dataset())
    ours = copy.deepcopy(base) if method == "full" else get_peft_model(copy.deepcopy(base), lora)
    if method == "lora":
        torch.manual_seed(2)
        with torch.no_grad():
            for (name, theirs), (_, mine) in zip(trainer.model.named_parameters(), ours.named_parameters()):
                if "lora_B" in name:
                    theirs.copy_(torch.randn_like(theirs) * 0.05)
                mine.copy_(theirs)
    inputs = trainer.data_collator([{"prompt_ids": e.prompt_ids, "completion_ids": e.completion_ids,
                                     "KL_completion_ids": e.kl_ids, "label": e.desirable} for e in examples])
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()

    objective = Objective("kto", BETA, desirable_weight=1.3, undesirable_weight=0.8)
    use_packed_attention(ours)
    ref_model = reference if reference is not None else ours
    use_packed_attention(ref_model)
    values = compute_reference(ref_model, examples, 4, "cpu", distributed.World("none"))
    examples = [dataclasses.replace(e, reference=tuple(v)) for e, v in zip(examples, values)]
    ours.train()
    module = PreferenceLossSum(ours, objective)
    batch = collate_unpaired(examples)
    kl = set_kl(module, [batch], 1, distributed.World("none"), "cpu")
    assert kl > 0.1  # the KL term is in play (TRL clamps it at 0 as tuneforge does)
    loss_sum, _ = module(batch)
    (loss_sum / len(examples)).backward()
    our_grad = {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}
    assert_same(trl_loss.item(), trl_grads(trainer.model), (loss_sum / len(examples)).item(), our_grad)


def unpaired_dataset():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": "a", "completion": "b", "label": True},
                              {"prompt": "c", "completion": "d", "label": False}])

"""tuneforge's training loop against an independent reference: Hugging Face `transformers.Trainer` + PEFT.

Both sides train the tiny random Llama for 5 optimizer steps from the same initial weights, on the same micro-batches
in the same order, with the same AdamW, learning-rate schedule, gradient clipping and loss (the mean over all answer
tokens of an optimizer step, across its micro-batches: transformers' `num_items_in_batch` normalisation). Per-step
losses, learning rates and gradient norms, and the final trainable weights, must agree within float noise.

Only the token ids and answer masks come from tuneforge (its own tokenized examples), and the example order is read
from tuneforge's seeded step plan; the forward pass, the loss, the optimizer, the schedule and the clipping on the
reference side are transformers' and PEFT's own.

Why these settings: Adam moves a weight by about lr per step whatever its gradient's scale, so 5 steps at lr 1e-3
(LoRA) / 2.5e-4 at a constant rate (full) move the most-moved weights by ~3e-3 / ~1.25e-3, more than 100x the 1e-5
tolerance (asserted), while few steps at a small rate keep the two sides' float reduction-order differences (~1e-7
relative) from growing into a divergence. The rate is the knob that bounds the worst case: an element whose first
gradient is near Adam's eps (1e-8) gets an update lr * g / (|g| + eps) whose slope in g is ~lr / eps, so a 1e-9
difference in that gradient becomes ~lr * 0.1 in the weight. In full fine-tuning one such element (of ~3M) appeared:
at lr 5e-4 it differed by 8.7e-6 while every other weight agreed to 1e-6; at 2.5e-4 it is ~4e-6.
Learning-rate warmup is 0: transformers' warmup gives step k the rate k/W (step 0 trains at rate 0), tuneforge's
gives (k+1)/W, so the two schedules agree only without warmup (after warmup they are the same formulas).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import write_jsonl
from tuneforge.config import load_config
from tuneforge.data.batching import StepPlan, epoch_steps
from tuneforge.data.prepare import read_raw, tokenize_data
from tuneforge.model.load import load_tokenizer
from tuneforge.train.loop import train

TOL = 1e-5
STEPS, BATCH, ACCUM = 5, 2, 2  # two micro-batches per step: the num_items_in_batch normalisation is exercised
SEED = 42
IGNORE = -100  # transformers' label for "no loss here"


def rows(n):
    """Short instruction rows of varied lengths (so padded batches really pad)."""
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma"]
    out = []
    for i in range(n):
        prompt = " ".join(words[(i * 3 + j) % len(words)] for j in range(1 + (i * 5) % 9))
        answer = " ".join(str((i + j) % 10) for j in range(1 + (i * 7) % 6))
        out.append({"instruction": f"Count after: {prompt}", "output": answer})
    return out


# (id, method, packing, lora targets, lr, scheduler, weight decay, max grad norm). Each clip is below some of its
# case's gradient norms (LoRA ~0.2-0.7, full ~4), so clipping acts; weight decay on full fine-tuning checks that both
# leave norms out of it (tuneforge: 1-D parameters; transformers: names matching "norm").
CASES = [
    ("lora-all-linear-padded", "lora", False, "all-linear", 1e-3, "cosine", 0.0, 0.5),
    ("lora-explicit-packed", "lora", True, ["q_proj", "v_proj", "down_proj"], 1e-3, "linear", 0.0, 0.2),
    ("full-padded", "full", False, None, 2.5e-4, "constant", 0.1, 1.0),
    ("full-packed", "full", True, None, 2.5e-4, "constant", 0.1, 1.0),
]


def tuneforge_config(model_dir, data_file, out_dir, method, packing, targets, lr, scheduler, weight_decay, clip):
    overrides = [
        f"model={model_dir}", f"data.train={data_file}", "data.val_split=0", f"data.packing={str(packing).lower()}",
        f"output_dir={out_dir}", f"method={method}", "train.epochs=1", f"train.batch_size={BATCH}",
        f"train.grad_accum={ACCUM}", f"train.lr={lr}", f"train.scheduler={scheduler}", "train.warmup_ratio=0",
        f"train.weight_decay={weight_decay}", f"train.max_grad_norm={clip}", f"train.seed={SEED}",
        "train.dtype=float32", "train.device=cpu", "train.log_every=1",
    ]
    if method == "lora":
        overrides += ["lora.r=4", "lora.alpha=8", "lora.dropout=0", f"lora.target_modules={json.dumps(targets)}"]
    return load_config(None, overrides)


def tuneforge_micro_batches(cfg):
    """tuneforge's own tokenized examples, in the order its seeded plan feeds them (epoch 0), as micro-batches."""
    train_rows, val_rows = read_raw(cfg.data, cfg.train.seed)
    data = tokenize_data(cfg.data, load_tokenizer(cfg.model), train_rows, val_rows)
    t = cfg.train
    plan = epoch_steps([len(ex.input_ids) for ex in data.train],
                       StepPlan(t.batch_size, t.grad_accum, t.tokens_per_batch, cfg.data.packing,
                                cfg.data.group_by_length, t.seed), 0)
    assert len(plan) == STEPS and all(len(step) == ACCUM and all(len(mb) == BATCH for mb in step) for step in plan)
    return [[data.train[i] for i in mb] for step in plan for mb in step]


class PadCollator:
    """Right-padded input_ids / attention_mask / labels (-100 on prompt and pad positions)."""

    def __init__(self, pad_id):
        self.pad_id = pad_id

    def __call__(self, features):
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.tensor(f["input_ids"])
            labels[row, :n] = torch.tensor(f["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def hf_reference(model_dir, micro_batches, pad_id, out_dir, method, targets, lr, scheduler, weight_decay, clip):
    """Train with transformers.Trainer (+ PEFT): (per-step losses, lrs, grad norms, initial and final trainable
    weights by name)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    # tuneforge seeds (train.seed) right before loading the base and applying the method; PEFT's LoRA A init draws
    # from torch's global RNG, so the same seed here gives the same initial LoRA weights.
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                                 bias="none", task_type="CAUSAL_LM"))
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    # Flattened in plan order; a sequential sampler with batch size BATCH gives back exactly tuneforge's micro-batches.
    dataset = [{"input_ids": ex.input_ids, "labels": [tok if is_target else IGNORE
                                                       for tok, is_target in zip(ex.input_ids, ex.target)]}
               for mb in micro_batches for ex in mb]
    record = {"micro": [], "loss": [], "lr": []}

    class RecordingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            record["micro"].append(loss.item())  # this micro-batch's share of the step's answer-token mean
            return loss

    class StepRecorder(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            record["loss"].append(sum(record["micro"]))  # exact, unlike a logged and averaged value
            record["micro"].clear()
            record["lr"].append(optimizer.param_groups[0]["lr"])  # the rate this update uses

    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
        num_train_epochs=1, learning_rate=lr, lr_scheduler_type=scheduler, warmup_steps=0,
        weight_decay=weight_decay, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch",
        max_grad_norm=clip, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        train_sampling_strategy="sequential", dataloader_num_workers=0, remove_unused_columns=False,
        report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=SEED,
    )
    trainer = RecordingTrainer(model=model, args=args, train_dataset=dataset, data_collator=PadCollator(pad_id),
                               callbacks=[StepRecorder()])
    assert trainer.model_accepts_loss_kwargs  # so the loss is divided by the whole step's answer-token count
    trainer.train()
    assert trainer.state.global_step == STEPS
    grad_norms = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    final = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return record["loss"], record["lr"], grad_norms, initial, final


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_losses_and_weights_match_transformers_trainer(tiny_model_dir, tmp_path, case):
    _, method, packing, targets, lr, scheduler, weight_decay, clip = case
    data_file = write_jsonl(tmp_path / "train.jsonl", rows(STEPS * ACCUM * BATCH))
    cfg = tuneforge_config(tiny_model_dir, data_file, tmp_path / "tf", method, packing, targets, lr, scheduler,
                           weight_decay, clip)
    micro_batches = tuneforge_micro_batches(cfg)
    tokenizer = load_tokenizer(cfg.model)

    result = train(cfg, show_progress=False)
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    tf_loss, tf_lr, tf_norm = [m["loss"] for m in steps], [m["lr"] for m in steps], [m["grad_norm"] for m in steps]
    tf_final = {n: p.detach() for n, p in result.model.named_parameters() if p.requires_grad}

    hf_loss, hf_lr, hf_norm, initial, hf_final = hf_reference(
        str(tiny_model_dir), micro_batches, tokenizer.pad_token_id, tmp_path / "hf", method, targets, lr, scheduler,
        weight_decay, clip)

    assert len(tf_loss) == len(hf_loss) == len(hf_norm) == STEPS
    assert tf_lr == pytest.approx(hf_lr, rel=1e-12, abs=0)
    loss_diff = max(abs(a - b) for a, b in zip(tf_loss, hf_loss))
    norm_diff = max(abs(a - b) / b for a, b in zip(tf_norm, hf_norm))
    assert sorted(tf_final) == sorted(hf_final)
    weight_diff = max((tf_final[n] - hf_final[n]).abs().max().item() for n in hf_final)
    moved = max((hf_final[n] - initial[n]).abs().max().item() for n in hf_final)
    print(f"\n{case[0]}: losses {['%.6f' % x for x in hf_loss]} lr {hf_lr} grad norms "
          f"{['%.4f' % x for x in hf_norm]}\n  max |loss diff| {loss_diff:.2e}, max rel grad-norm diff "
          f"{norm_diff:.2e}, max |weight diff| {weight_diff:.2e}, max |weight change| {moved:.2e}")
    assert loss_diff < TOL, (tf_loss, hf_loss)
    assert norm_diff < 1e-4, (tf_norm, hf_norm)
    assert weight_diff < TOL
    assert moved > 100 * TOL  # the weights really trained: equality is not the trivial "nothing moved"
    assert any(norm > clip for norm in hf_norm)  # clipping acted in this case
    assert hf_loss[-1] < hf_loss[0]

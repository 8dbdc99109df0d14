"""Preference training through the one loop: the shared prompt, tokenization, the reference pass, refusals, resume
after kill -9, the NaN guard, and two processes (DDP, FSDP) equal to one.

The shared-prompt row computes each prompt once: [prompt, chosen, rejected] with the rejected answer attending to the
prompt and itself. Its losses and gradients must equal the unshared computation ([prompt, chosen] and
[prompt, rejected] as separate examples, what TRL, Axolotl and LLaMA-Factory compute) within 1e-5, for every family,
with each family's sliding window shorter than the rows and Gemma's softcaps on.
"""

from __future__ import annotations

import dataclasses
import json
import random
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli, write_jsonl
from tests.families import FAMILIES, WINDOW, tiny_model
from tests.unit.test_reliability import run_driver
from tuneforge.config import config_from_dict, validate_for_training
from tuneforge.data.batching import collate_pairs
from tuneforge.data.formats import load_examples
from tuneforge.data.prepare import read_raw
from tuneforge.data.preference_tokens import TokenizedPair, tokenize_pair
from tuneforge.data.tokenize import tokenize_example
from tuneforge.errors import ConfigError, DataError, TrainingStopped
from tuneforge.model.attention import use_packed_attention
from tuneforge.run_dir import read_reference
from tuneforge.train import checkpoint as ckpt
from tuneforge.train import preference
from tuneforge.train.loop import train
from tuneforge.train.preference import Objective, PreferenceLossSum

TOL = 1e-5


def token_pairs(vocab: int, n: int = 3, seed: int = 0) -> list[TokenizedPair]:
    """Prompts and answers longer than the tiny families' sliding window, with some answer tokens not scored."""
    rng = random.Random(seed)

    def ids(k):
        return [rng.randrange(3, vocab) for _ in range(k)]

    pairs = []
    for i in range(n):
        chosen, rejected = ids(rng.randint(WINDOW + 1, 2 * WINDOW)), ids(rng.randint(3, 2 * WINDOW))
        pairs.append(TokenizedPair(ids(rng.randint(WINDOW + 2, 3 * WINDOW)), chosen,
                                   [True] * (len(chosen) - 1) + [False], rejected, [True] * len(rejected), f"p:{i}"))
    return pairs


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("objective", [Objective("dpo", 0.5), Objective("orpo", 0.5, uses_reference=False)],
                         ids=["dpo", "orpo"])
def test_the_shared_prompt_gives_the_unshared_losses_and_gradients(family, objective, tokenizer):
    # float64: the two layouts run attention as different calls (the shared row per pair, the unshared one in
    # length buckets), so in float32 their sums round apart by ~1e-6 of gradients as large as 8; in float64 any
    # difference beyond 1e-5 is a layout bug, not rounding.
    model = tiny_model(family, len(tokenizer)).double()
    use_packed_attention(model)
    model.train()
    pairs = token_pairs(len(tokenizer))
    with torch.no_grad():  # a reference near the policy: log-ratios of order 1, where the loss is well-conditioned
        logps, _, _ = preference.sequence_logps(model, collate_pairs(pairs, share_prompt=False))
    offsets = torch.tensor([[0.7, -0.4], [-1.1, 0.3], [0.2, 0.9]])
    pairs = [dataclasses.replace(p, reference=tuple((logps[i] + offsets[i]).tolist())) for i, p in enumerate(pairs)]
    results = []
    for share in (True, False):
        model.zero_grad()
        batch = collate_pairs(pairs, share_prompt=share, prompt_targets=objective.nll)
        batch.nll_scale = len(pairs) / batch.num_nll_targets if objective.nll else 0.0
        loss, stats = PreferenceLossSum(model, objective)(batch)
        loss.backward()
        results.append((loss.item(), stats, {n: p.grad.clone() for n, p in model.named_parameters()}, batch))
    (shared_loss, shared_stats, shared_grad, shared), (loss, stats, grad, unshared) = results
    assert shared.num_tokens == unshared.num_tokens - sum(len(p.prompt_ids) for p in pairs)  # one prompt per pair
    assert abs(shared_loss - loss) < TOL
    assert torch.allclose(shared_stats, stats, atol=TOL)
    worst = max((shared_grad[n] - grad[n]).abs().max().item() for n in grad)
    assert max(g.abs().max().item() for g in grad.values()) > 100 * TOL
    assert worst < TOL, worst


def test_a_pair_is_tokenized_as_its_supervised_conversation(tokenizer, tmp_path):
    """Prompt + chosen gives the very ids and answer targets of the same conversation trained supervised (what
    inference sees), and the two sides share one prompt."""
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of France?"}],
         "chosen": [{"role": "assistant", "content": "Paris."}],
         "rejected": [{"role": "assistant", "content": "I think it is Lyon, but I am not sure."}]}])
    example = load_examples(str(path))[0]
    pair = tokenize_pair(tokenizer, example)
    for answer, target, messages in ((pair.chosen_ids, pair.chosen_target, example.messages),
                                     (pair.rejected_ids, pair.rejected_target, example.rejected)):
        supervised = tokenize_example(tokenizer, dataclasses.replace(example, messages=messages, rejected=None))
        assert pair.prompt_ids + answer == supervised.input_ids
        assert target == supervised.target[len(pair.prompt_ids):]  # the last answer's tokens, its end of turn
        assert tokenizer.decode([t for t, scored in zip(answer, target) if scored]).endswith("<|im_end|>")
    assert not any(supervised.target[:len(pair.prompt_ids)][-3:])  # the earlier assistant turn is context here


def pair_rows(n=40, seed=5, hedge=True):
    """Sums, the rejected answer wrong (and, with `hedge`, longer: a pair a length bias alone gets right)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 40), rng.randint(1, 40)
        rows.append({"prompt": f"Add {a} and {b}.", "chosen": f"{a + b}.",
                     "rejected": f"{a + b + rng.randint(1, 9)}" + (", I believe." if hedge else ".")})
    return rows


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", pair_rows())


def dpo_overrides(tiny_model_dir, pairs_file, out, *extra):
    # 40 pairs, batch 4 -> 10 steps per epoch, 2 epochs; LoRA dropout on, so RNG state matters for exact resume.
    return [f"model={tiny_model_dir}", f"data.train={pairs_file}", f"output_dir={out}", "objective=dpo",
            "train.epochs=2", "train.batch_size=4", "train.lr=5e-3", "train.save_every=1", "train.keep_last=2",
            "lora.dropout=0.1", "train.warmup_ratio=0.1", *extra]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dpo_trains_logs_rewards_and_keeps_the_best_reward_accuracy(tiny_model_dir, pairs_file, tmp_path):
    from tuneforge.config import load_config

    cfg = load_config(None, dpo_overrides(tiny_model_dir, pairs_file, tmp_path / "run", "data.val_split=0.2",
                                          "train.eval_every=2", "train.early_stopping_patience=20",
                                          "train.early_stopping_metric=reward_accuracy"))
    result = train(cfg, show_progress=False)
    lines = records(result.run_dir)
    steps = [r for r in lines if "loss" in r and "pairs" in r]
    validations = [r for r in lines if "val_reward_accuracy" in r]
    assert len(steps) == result.steps == 16 and len(validations) == 8
    for key in ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin", "logps_chosen",
                "logps_rejected"):
        assert all(key in r for r in steps) and all(f"val_{key}" in r for r in validations)
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-4)  # the policy starts as its reference
    assert steps[-1]["reward_margin"] > 0.05 and validations[-1]["val_reward_margin"] > 0.05
    assert validations[-1]["val_loss"] < validations[0]["val_loss"] - 0.02
    stored = read_reference(result.run_dir)
    assert len(stored["train"]) == 32 and len(stored["val"]) == 8
    meta = json.loads((result.run_dir / "tuneforge.json").read_text())
    assert meta["objective"] == "dpo"


@pytest.mark.parametrize("kill_at_microbatch", [random.Random(7).randint(3, 17)])
def test_dpo_kill_9_then_resume_matches_uninterrupted(tiny_model_dir, pairs_file, tmp_path, kill_at_microbatch,
                                                      monkeypatch):
    from tuneforge.config import load_config

    reference_run = train(load_config(None, dpo_overrides(tiny_model_dir, pairs_file, tmp_path / "whole")),
                          show_progress=False).run_dir
    out = tmp_path / "run"
    args = dpo_overrides(tiny_model_dir, pairs_file, out)
    killed = run_driver("microbatch", kill_at_microbatch, args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert ckpt.latest_checkpoint(out) is not None and not (out / "adapter_model.safetensors").exists()
    stored = (out / "reference_logps.json").read_text()

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the reference was recomputed on resume")

    monkeypatch.setattr(preference, "compute_reference", no_second_pass)
    resumed = train(load_config(None, args + ["train.resume=auto"]), show_progress=False)
    assert resumed.steps == 20 and (out / "reference_logps.json").read_text() == stored
    a = {r["step"]: r for r in records(out) if "pairs" in r}
    b = {r["step"]: r for r in records(reference_run) if "pairs" in r}
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert max(abs(a[s]["loss"] - b[s]["loss"]) for s in b) < 1e-6
    wa, wb = load_file(out / "adapter_model.safetensors"), load_file(reference_run / "adapter_model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6


def test_dpo_nan_step_is_skipped_and_nan_every_step_stops(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    from tuneforge.config import load_config

    original, calls = preference.pair_losses, {"n": 0, "every": False}

    def nan_at_4(*args):
        calls["n"] += 1
        losses, chosen, rejected = original(*args)
        return (losses * float("nan") if calls["n"] == 4 or calls["every"] else losses), chosen, rejected

    monkeypatch.setattr(preference, "pair_losses", nan_at_4)
    result = train(load_config(None, dpo_overrides(tiny_model_dir, pairs_file, tmp_path / "a")), show_progress=False)
    assert [r["step"] for r in records(result.run_dir) if r.get("skipped_step")] == [4]
    assert all(torch.isfinite(t).all() for t in load_file(result.run_dir / "adapter_model.safetensors").values())
    calls["every"] = True
    with pytest.raises(TrainingStopped, match="6 non-finite steps in a row"):
        train(load_config(None, dpo_overrides(tiny_model_dir, pairs_file, tmp_path / "b")), show_progress=False)


@pytest.mark.parametrize("change, message", [
    ({"method": "prefix"}, "objective: 'dpo' trains method full, lora, qlora, dora or adapter; not 'prefix'"),
    ({"data": {"packing": False}}, "data.packing: false is not supported with objective 'dpo'"),
    ({"data": {"train_on_prompt": True}}, "data.train_on_prompt: not supported with objective 'dpo'"),
    ({"objective": "sft", "train": {"early_stopping_metric": "reward_accuracy"}}, "needs a preference objective"),
])
def test_what_a_preference_objective_cannot_train_with_is_refused_in_one_line(pairs_file, change, message):
    raw = {"objective": "dpo", "data": {"train": str(pairs_file)}}
    for key, value in change.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_for_training(config_from_dict(raw))


def test_rows_that_do_not_fit_the_objective_are_refused_naming_the_file(pairs_file, tmp_path):
    supervised = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "Hi", "output": "Hello"}])
    unpaired = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "Hi", "completion": "Hello", "label": True}])
    with pytest.raises(DataError, match="sft.jsonl:1: objective 'kto' learns from answers marked desirable or not"):
        read_raw(config_from_dict({"objective": "kto", "data": {"train": str(supervised)}}).data, 0, "kto")
    for path, kind in ((supervised, "supervised rows"), (unpaired, "unpaired rows")):
        cfg = config_from_dict({"objective": "dpo", "data": {"train": str(path)}})
        with pytest.raises(DataError, match=f"{path.name}:1: objective 'dpo' learns from pairs .* holds {kind}"):
            read_raw(cfg.data, 0, cfg.objective)
    run_file = tmp_path / "run.yaml"
    run_file.write_text(f"objective: ipo\ndata:\n  train: {supervised}\noutput_dir: {tmp_path / 'r'}\n")
    result = run_cli("train", str(run_file))
    errors = [line for line in result.stderr.splitlines() if "learns from pairs" in line]
    assert result.returncode != 0 and len(errors) == 1, result.stderr


def test_full_fine_tuning_dpo_stores_its_reference_before_the_first_update(tiny_model_dir, pairs_file, tmp_path):
    """Full fine-tuning has no adapter to switch off: the reference is the model before any update, computed once."""
    from tuneforge.config import load_config
    from tuneforge.model.load import load_model

    out = tmp_path / "full"
    train(load_config(None, dpo_overrides(tiny_model_dir, pairs_file, out, "method=full", "train.max_steps=3",
                                          "train.lr=1e-4")), show_progress=False)
    stored = read_reference(out)["train"]
    base = load_model(str(tiny_model_dir))
    use_packed_attention(base)
    cfg = load_config(None, dpo_overrides(tiny_model_dir, pairs_file, out))
    from tuneforge.data.prepare import tokenize_data
    from tuneforge.model.load import load_tokenizer

    rows, _ = read_raw(cfg.data, cfg.train.seed, "dpo")
    pairs = tokenize_data(cfg.data, load_tokenizer(str(tiny_model_dir)), rows, []).train
    with torch.no_grad():
        expected, _, _ = preference.sequence_logps(base, collate_pairs(pairs[:6]))
    assert torch.allclose(torch.tensor(stored[:6], dtype=torch.float64), expected.double(), atol=1e-4)


TWO_PROCESS_RUNS = [("ddp", "dpo"), ("fsdp", "dpo"), ("ddp", "kto")]


@pytest.fixture(scope="module")
def two_process_preference(tmp_path_factory, tiny_model_dir):
    """The two-process side of every parametrisation below: one torchrun launch for all of them
    (tests.unit.dist_methods_driver), since each launch pays two interpreters' torch start-up."""
    import yaml

    from tests.unit.test_distributed import torchrun, write_config

    tmp = tmp_path_factory.mktemp("preference-two")
    data = write_jsonl(tmp / "pairs.jsonl", pair_rows(38, seed=11))
    val = write_jsonl(tmp / "val.jsonl", pair_rows(7, seed=12))
    configs = {}
    for objective in ("dpo", "kto"):
        epochs = {"epochs": 1} if objective == "kto" else {}  # 7 steps per epoch for KTO's 76 examples
        path = write_config(tmp / f"{objective}.yaml", tiny_model_dir, data, tmp / "unused", "lora", eval_every=4,
                            **epochs)
        config = yaml.safe_load(path.read_text())
        config["objective"], config["data"]["val"] = objective, str(val)
        path.write_text(yaml.safe_dump(config))
        configs[objective] = path
    runs = [f"{objective}-{mode}=lora:{mode}@{configs[objective]}" for mode, objective in TWO_PROCESS_RUNS]
    done = torchrun("-m", "tests.unit.dist_methods_driver", str(configs["dpo"]), str(tmp / "two"), *runs)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"out": tmp / "two", "configs": configs}


@pytest.mark.distributed
@pytest.mark.parametrize("mode, objective", TWO_PROCESS_RUNS)
def test_preference_two_processes_equal_one(tmp_path_factory, two_process_preference, mode, objective):
    """38 pairs in micro-batches of 3 (13 per epoch): each epoch's last step has one micro-batch and one rank none,
    so the zero-weighted filler pass, its zero statistics and the reference pass's share per rank are exercised.
    KTO (the pairs unpaired: 76 answers, 26 micro-batches per epoch, 4 steps) also has its KL estimate, one per step
    over every rank's micro-batches, so the 2 x 2 split must give the 1 x 4 one's numbers."""
    from tests.unit.test_distributed import assert_same_run
    from tuneforge.config import load_config

    one = tmp_path_factory.getbasetemp() / f"{objective}-one-process"
    if not (one / "adapter_model.safetensors").exists():
        train(load_config(two_process_preference["configs"][objective], ["train.grad_accum=4", f"output_dir={one}"]),
              show_progress=False)
    two = two_process_preference["out"] / f"{objective}-{mode}"
    assert_same_run(one, two, steps=8 if objective == "dpo" else 7)
    for name in ("reward_margin", "val_reward_accuracy", "val_loss") + (("kl",) if objective == "kto" else ()):
        a = [r[name] for r in records(one) if name in r]
        b = [r[name] for r in records(two) if name in r]
        assert len(a) == len(b) > 0 and max(abs(x - y) for x, y in zip(a, b)) < TOL, name
    stored = [torch.tensor(read_reference(run)["train"]) for run in (one, two)]
    assert stored[0].shape == ((38 if objective == "dpo" else 76), 2) and (stored[0] - stored[1]).abs().max() < TOL


def test_eval_pairs_scores_tuned_and_base_as_transformers_does(tiny_model_dir, tmp_path):
    """`eval --pairs`: the base's numbers equal a plain transformers forward (log-softmax of its own logits on
    prompt + answer, pair by pair); after DPO on these pairs the tuned model prefers their chosen answers more often
    than the base does (same-length answers: the base is near chance)."""
    from transformers import AutoModelForCausalLM

    from tuneforge.config import load_config
    from tuneforge.model.load import load_tokenizer

    same_length = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(40, hedge=False))
    run = train(load_config(None, dpo_overrides(tiny_model_dir, same_length, tmp_path / "run", "train.lr=2e-2",
                                                "train.save_every=0", "lora.dropout=0")), show_progress=False).run_dir
    held_out = same_length  # a tiny random model learns these pairs; it cannot generalise sums to new ones
    result = run_cli("eval", str(run), "--pairs", str(held_out), "--compare", str(tiny_model_dir), "--out",
                     str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr
    models = json.loads((tmp_path / "eval" / "summary.json").read_text())["models"]
    tuned, base = models["tuned"]["scores"], models["base"]["scores"]
    assert tuned["preference_pairs"] == base["preference_pairs"] == 40

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    margins, wins, wins_per_token = [], 0, 0
    for example in load_examples(str(held_out)):
        pair = tokenize_pair(tokenizer, example)
        sides = []
        for answer, target in ((pair.chosen_ids, pair.chosen_target), (pair.rejected_ids, pair.rejected_target)):
            ids = torch.tensor([pair.prompt_ids + answer])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1).gather(1, ids[0, 1:, None])[:, 0]
            scored = torch.tensor([False] * (len(pair.prompt_ids) - 1) + target)
            sides.append((logp[scored].sum().item(), int(scored.sum())))
        (c, nc), (r, nr) = sides
        margins.append(c - r)
        wins, wins_per_token = wins + (c > r), wins_per_token + (c / nc > r / nr)
    assert base["preference_margin"] == pytest.approx(sum(margins) / 40, abs=1e-4)
    assert base["preference_accuracy"] == wins / 40 < 0.8
    assert base["preference_accuracy_length_normalised"] == wins_per_token / 40
    assert tuned["preference_accuracy"] > base["preference_accuracy"]
    assert tuned["preference_margin"] > base["preference_margin"] + 0.2  # measured: +0.36 nats
    assert "preference_accuracy" in result.stdout


def test_eval_pairs_refuses_a_file_without_pairs(tiny_model_dir, tmp_path):
    rows = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "Hi", "output": "Hello"}])
    result = run_cli("eval", str(tiny_model_dir), "--pairs", str(rows))
    assert result.returncode != 0 and "sft.jsonl:1: --pairs needs preference pairs" in result.stderr


def test_kto_trains_on_unpaired_rows_and_on_pairs(tiny_model_dir, tmp_path):
    """KTO learns from {prompt, completion, label} rows; a pair file gives it two answers each (chosen desirable,
    rejected not). Desirable answers' rewards rise above the undesirable ones', and the KL estimate is logged."""
    from tuneforge.config import load_config

    rows = [{"prompt": r["prompt"], "completion": r["chosen"] if i % 3 else r["rejected"], "label": bool(i % 3)}
            for i, r in enumerate(pair_rows(36))]
    unpaired = write_jsonl(tmp_path / "kto.jsonl", rows)
    for name, path, count in (("unpaired", unpaired, 36), ("pairs", write_jsonl(tmp_path / "p.jsonl", pair_rows(18)),
                                                           36)):
        out = tmp_path / name
        result = train(load_config(None, [f"model={tiny_model_dir}", f"data.train={path}", f"output_dir={out}",
                                          "objective=kto", "train.epochs=2", "train.batch_size=6", "train.lr=5e-3",
                                          "train.save_every=0", "lora.dropout=0", "kto.desirable_weight=1.5"]),
                       show_progress=False)
        steps = [r for r in records(result.run_dir) if "pairs" in r]
        assert len(steps) == 12 and len(read_reference(out)["train"]) == count
        assert all("kl" in r and r["kl"] >= 0 for r in steps) and any(r["kl"] > 0 for r in steps)
        assert steps[-1]["reward_margin"] > 0.05 and steps[-1]["loss"] < steps[0]["loss"]


def test_recommend_and_estimate_plan_a_preference_run(pairs_file, tmp_path):
    """`recommend --objective dpo` writes the objective, its beta and a preference learning rate, each with its
    reason, in a run file `train` accepts; `estimate` of a DPO run counts each pair as it packs (prompt once, both
    answers), the lengths `tuneforge train` itself plans with."""
    from tuneforge.config import load_config
    from tuneforge.data.prepare import tokenize_data
    from tuneforge.model.load import load_tokenizer
    from tuneforge.plan.data_shape import measure_data

    out = tmp_path / "dpo.yaml"
    result = run_cli("recommend", "--data", str(pairs_file), "--gpu-mem", "24", "--objective", "dpo", "-o", str(out))
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert "objective: dpo  # " in text and "dpo:\n  beta: 0.1  # the DPO paper's" in text
    cfg = load_config(out)
    assert cfg.objective == "dpo" and cfg.train.lr == 5e-6 and cfg.method == "lora"
    shape = measure_data(cfg.data, cfg.model, objective="dpo")
    rows, _ = read_raw(cfg.data, 42, "dpo")
    pairs = tokenize_data(cfg.data, load_tokenizer(cfg.model), rows, []).train
    assert shape.lengths == tuple(p.prompt_ids.__len__() + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    estimate = run_cli("estimate", str(out))
    assert estimate.returncode == 0 and "peak" in estimate.stdout, estimate.stderr

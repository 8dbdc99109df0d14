"""Preference objectives (DPO, IPO, SimPO, ORPO) in the one loop: the loss module and the reference pass.

The loss module is the preference twin of `AnswerTokenLossSum`: the loop calls it per micro-batch, divides what it
returns by the step's pair count (so splitting a step into micro-batches or ranks cannot change the gradient) and
backpropagates. One forward gives every pair's chosen and rejected log-probabilities at once: the packed row holds
[prompt, chosen, rejected] per pair with the prompt computed once (tuneforge.data.batching.collate_pairs), and the
per-token log-probabilities come from the chunked head, never from a [tokens, vocab] logits tensor.

The formulas are TRL 1.16's, term for term (tests/unit/test_preference_trl.py holds them equal):
- dpo:   -log sigmoid(beta * ((c - c_ref) - (r - r_ref))), with label smoothing eps the conservative form
         -(1 - eps) log sigmoid(beta x) - eps log sigmoid(-beta x) (DPOTrainer's "sigmoid"; eps: the cDPO paper's)
- ipo:   ((c - c_ref) / |c| - (r - r_ref) / |r| - 1 / (2 beta))^2, log-ratios per completion token (DPOTrainer "ipo")
- simpo: -log sigmoid(beta * (c / |c| - r / |r|) - gamma), no reference (CPOTrainer "simpo", cpo_alpha 0)
- orpo:  NLL of the chosen sequences (prompt and answer, token mean) - lambda * log sigmoid(log odds(c/|c|) -
         log odds(r/|r|)), no reference (ORPOTrainer)
where c and r are the summed log-probabilities of the chosen and rejected answer tokens and |c|, |r| their counts.
Rewards (logged): beta times the log-ratio to the reference (DPO, IPO), beta times the mean log-probability (SimPO,
ORPO with lambda), as each TRL trainer logs them.

The reference costs no second copy of the model: its log-probabilities of every training and validation pair are
computed once before the first step, with the model as it starts (an adapter switched off: the base), and stored in
the run directory (reference_logps.json). A resumed run reads them back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tuneforge import run_dir as layout
from tuneforge.config import REFERENCE_FREE, RunConfig
from tuneforge.data.batching import Batch, collate_pairs
from tuneforge.data.preference_tokens import TokenizedPair, TokenizedUnpaired
from tuneforge.train import distributed
from tuneforge.train.forward import target_hidden
from tuneforge.train.loss import target_logprobs

log = logging.getLogger("tuneforge")

# What a micro-batch's statistics tensor holds (sums over its pairs; the loop adds them over a step or a validation).
STATS = ("pairs", "desirable", "undesirable", "rewards_chosen", "rewards_rejected", "reward_accuracy", "logps_chosen",
         "logps_rejected", "accuracy_length_normalised", "kl")


@dataclass(frozen=True)
class Objective:
    name: str
    beta: float  # dpo/ipo/simpo's beta; orpo's lambda
    label_smoothing: float = 0.0
    gamma: float = 0.0
    uses_reference: bool = True
    desirable_weight: float = 1.0  # KTO
    undesirable_weight: float = 1.0

    @property
    def per_token(self) -> bool:
        """Whether it compares mean log-probabilities per completion token rather than sums."""
        return self.name in ("simpo", "orpo")

    @property
    def nll(self) -> bool:
        """Whether it adds the chosen sequences' cross-entropy (ORPO), prompt tokens included as ORPO does."""
        return self.name == "orpo"


def objective_of(cfg: RunConfig) -> Objective:
    name = cfg.objective
    if name == "dpo":
        return Objective(name, cfg.dpo.beta, label_smoothing=cfg.dpo.label_smoothing,
                         uses_reference=cfg.preference.reference == "auto")
    if name == "ipo":
        return Objective(name, cfg.ipo.beta, uses_reference=cfg.preference.reference == "auto")
    if name == "simpo":
        return Objective(name, cfg.simpo.beta, gamma=cfg.simpo.gamma, uses_reference=False)
    if name == "kto":
        return Objective(name, cfg.kto.beta, uses_reference=cfg.preference.reference == "auto",
                         desirable_weight=cfg.kto.desirable_weight, undesirable_weight=cfg.kto.undesirable_weight)
    assert name == "orpo" and name in REFERENCE_FREE, name
    return Objective(name, cfg.orpo.weight, uses_reference=False)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def pair_losses(objective: Objective, logps: torch.Tensor, counts: torch.Tensor,
                reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses [n] and the (chosen, rejected) rewards [n] from summed log-probabilities [n, 2] of the answer
    tokens, their token counts [n, 2] and the reference's summed log-probabilities [n, 2]."""
    beta = objective.beta
    if objective.per_token:
        mean = logps / counts.clamp(min=1)
        chosen, rejected = mean[:, 0], mean[:, 1]
        if objective.name == "simpo":
            losses = -F.logsigmoid(beta * (chosen - rejected) - objective.gamma)
        else:  # orpo: the log odds ratio of the mean log-probabilities
            log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
            losses = -beta * F.logsigmoid(log_odds)
        return losses, beta * chosen.detach(), beta * rejected.detach()
    ratios = logps - reference.to(logps.dtype)  # [n, 2]: log pi / pi_ref of each side
    if objective.name == "dpo":
        x = beta * (ratios[:, 0] - ratios[:, 1])
        eps = objective.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x) if eps else -F.logsigmoid(x)
    else:  # ipo
        per_token = ratios / counts.clamp(min=1)
        losses = (per_token[:, 0] - per_token[:, 1] - 1 / (2 * beta)) ** 2
    return losses, beta * ratios[:, 0].detach(), beta * ratios[:, 1].detach()


def kto_losses(objective: Objective, logps: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor,
               kl: float) -> tuple[torch.Tensor, torch.Tensor]:
    """KTOTrainer's "kto" loss per example [n] and its reward [n]: a desirable answer's loss is
    1 - sigmoid(beta (log-ratio - KL)), an undesirable one's 1 - sigmoid(beta (KL - log-ratio)), each weighted;
    `kl`: the step's estimate of KL(policy || reference), clamped at 0 and held constant (no gradient)."""
    ratios = logps - reference.to(logps.dtype)
    beta = objective.beta
    losses = torch.where(desirable, objective.desirable_weight * (1 - torch.sigmoid(beta * (ratios - kl))),
                         objective.undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratios))))
    return losses, beta * ratios.detach()


def sequence_logps(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """([n, 2] summed log-probabilities of each pair's chosen and rejected answer tokens, [n, 2] their counts, the
    per-token log-probabilities [N] of every target, prompt targets (ORPO) included)."""
    hidden, head, softcap = target_hidden(model, batch)
    token_logps = target_logprobs(hidden, head, batch.targets, softcap=softcap)
    n = batch.num_pairs
    scored = batch.sequence_of >= 0  # prompt targets (ORPO's NLL) belong to no answer
    index = batch.sequence_of.clamp(min=0)
    sums = torch.zeros(2 * n, dtype=token_logps.dtype, device=token_logps.device)
    sums = sums.index_add(0, index, token_logps * scored)
    counts = torch.zeros(2 * n, dtype=token_logps.dtype, device=token_logps.device).index_add(0, index,
                                                                                             scored.to(token_logps))
    return sums.view(n, 2), counts.view(n, 2), token_logps


class PreferenceLossSum(torch.nn.Module):
    """forward(batch) -> (the micro-batch's summed per-pair loss, its statistics [len(STATS)] detached). ORPO's NLL
    term is a token mean over the whole step: the loop sets `batch.nll_scale` = step pairs / step NLL tokens."""

    def __init__(self, model: torch.nn.Module, objective: Objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logps, counts, token_logps = sequence_logps(self.model, batch)
        if self.objective.name == "kto":
            return self._kto(batch, logps[:, 0])
        losses, chosen_rewards, rejected_rewards = pair_losses(self.objective, logps, counts, batch.reference)
        loss = losses.sum()
        if self.objective.nll:
            chosen_side = (batch.sequence_of % 2 == 0) | (batch.sequence_of < 0)
            loss = loss - (token_logps * chosen_side).sum() * batch.nll_scale
        return loss, pair_statistics(logps, counts, chosen_rewards, rejected_rewards)

    def _kto(self, batch: Batch, logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.kl_pass:  # the KL estimate's part: sum of log-ratios of the mismatched completions, and how many
            return (logps.detach() - batch.reference[:, 1]).sum(), torch.tensor([float(len(logps))])
        losses, rewards = kto_losses(self.objective, logps, batch.reference[:, 0], batch.desirable, batch.kl)
        good, bad = batch.desirable, ~batch.desirable
        values = [float(len(logps)), good.sum(), bad.sum(), rewards[good].sum(), rewards[bad].sum(),
                  ((rewards > 0) == good).sum(), logps.detach()[good].sum(), logps.detach()[bad].sum(), 0.0,
                  batch.kl * len(logps)]
        return losses.sum(), torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in values])


def pair_statistics(logps, counts, chosen_rewards, rejected_rewards) -> torch.Tensor:
    """The STATS sums of a micro-batch (reward accuracy: chosen rewarded above rejected; per token: the chosen answer's
    mean log-probability above the rejected one's, which a length bias cannot fake)."""
    mean = logps.detach() / counts.clamp(min=1)
    n = float(len(logps))
    values = [n, n, n, chosen_rewards.sum(), rejected_rewards.sum(), (chosen_rewards > rejected_rewards).sum(),
              logps[:, 0].detach().sum(), logps[:, 1].detach().sum(), (mean[:, 0] > mean[:, 1]).sum(), 0.0]
    return torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in values])


def stats_record(sums: list[float], prefix: str = "", kto: bool = False) -> dict[str, float]:
    """Means of summed STATS: what the metrics line shows. KTO's rewards and log-probabilities are means over its
    desirable (chosen) and undesirable (rejected) answers; its reward accuracy counts a desirable answer rewarded
    above 0 and an undesirable one below; it logs its KL estimate instead of the length-normalised accuracy."""
    total = dict(zip(STATS, sums))
    pairs, good, bad = (max(total[k], 1.0) for k in ("pairs", "desirable", "undesirable"))
    record = {"rewards_chosen": total["rewards_chosen"] / good, "rewards_rejected": total["rewards_rejected"] / bad,
              "reward_accuracy": total["reward_accuracy"] / pairs, "logps_chosen": total["logps_chosen"] / good,
              "logps_rejected": total["logps_rejected"] / bad}
    record["reward_margin"] = record["rewards_chosen"] - record["rewards_rejected"]
    if kto:
        record["kl"] = total["kl"] / pairs
    else:
        record["accuracy_length_normalised"] = total["accuracy_length_normalised"] / pairs
    return {f"{prefix}{name}": value for name, value in record.items()}


@torch.no_grad()
def set_kl(loss_module, batches: list[Batch], passes: int, world: distributed.World, device: str,
           autocast_dtype=None, filler: Batch | None = None) -> float:
    """KTO: the KL estimate of a step (or a validation) from all of its micro-batches on every rank, mean over its
    examples of log pi(y'|x) - log pi_ref(y'|x) for mismatched completions y', clamped at 0 as TRL does, set on
    every batch before the losses. One estimate per step, so splitting it into micro-batches or ranks changes
    nothing. Every rank runs `passes` forwards (FSDP's collectives line up; a rank short of batches repeats one)."""
    total, count = 0.0, 0.0
    was_training = loss_module.training
    loss_module.eval()
    for i in range(passes):
        own = i < len(batches)
        kl_batch = (batches[i] if own else filler or batches[0]).kl_batch.to(device)
        with torch.autocast(device_type=device, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            kl_sum, n = loss_module(kl_batch)
        if own:
            total, count = total + float(kl_sum), count + float(n[0])
    loss_module.train(was_training)
    total, count = distributed.all_reduce_sum(world, [total, count])
    kl = max(total / max(count, 1.0), 0.0)
    for batch in batches:
        batch.kl = kl
    return kl


# ---------------------------------------------------------------------------------------------------------------------
# The reference pass.


def attach_reference(cfg: RunConfig, run_dir: Path, model: torch.nn.Module, train: list[TokenizedPair],
                     val: list[TokenizedPair], device: str, world: distributed.World, autocast_dtype) -> float:
    """Every pair's reference log-probabilities in `pair.reference`: read from the run directory when they were
    computed for these pairs and this base, else computed now with the model as it starts and stored there.
    Returns the seconds the reference pass took (0 when read back)."""
    fingerprint = _fingerprint(cfg, train, val)
    stored = layout.read_reference(run_dir)
    started = time.perf_counter()
    computed = stored is None or stored.get("fingerprint") != fingerprint
    if computed:
        stored = {"fingerprint": fingerprint,
                  "train": compute_reference(model, train, cfg.train.batch_size, device, world, autocast_dtype),
                  "val": compute_reference(model, val, cfg.train.batch_size, device, world, autocast_dtype)}
        if world.is_main:
            layout.write_reference(run_dir, stored)
            log.info("reference log-probabilities of %d training and %d validation pairs stored in %s", len(train),
                     len(val), layout.reference_path(run_dir))
    elif world.is_main:
        log.info("reference log-probabilities read from %s", layout.reference_path(run_dir))
    for pairs, values in ((train, stored["train"]), (val, stored["val"])):
        for pair, (chosen, rejected) in zip(pairs, values):
            pair.reference = (chosen, rejected)  # KTO: (its answer, its KL completion)
    return time.perf_counter() - started if computed else 0.0


@torch.no_grad()
def compute_reference(model: torch.nn.Module, pairs: list[TokenizedPair], batch_size: int, device: str,
                      world: distributed.World, autocast_dtype=None) -> list[list[float]]:
    """[[chosen, rejected], ...] summed log-probabilities of the answer tokens under the model with its adapter (if
    any) switched off, in eval mode (no dropout). Each rank computes its share of the batches; the sums are added."""
    if pairs and isinstance(pairs[0], TokenizedUnpaired):  # KTO: its answer and its KL completion, as two sides
        pairs = [TokenizedPair(p.prompt_ids, p.completion_ids, p.completion_target, p.kl_ids, p.kl_target, p.source)
                 for p in pairs]
    batches = [list(range(i, min(i + batch_size, len(pairs)))) for i in range(0, len(pairs), batch_size)]
    values = torch.zeros(len(pairs), 2, dtype=torch.float64)
    was_training = model.training
    model.eval()
    switched_off = model.disable_adapter() if callable(getattr(model, "disable_adapter", None)) else nullcontext()
    with switched_off, torch.autocast(device_type=device, dtype=autocast_dtype or torch.float32,
                                      enabled=autocast_dtype is not None):
        for indices in distributed.my_share(world, batches):
            logps, _, _ = sequence_logps(model, collate_pairs([pairs[i] for i in indices]).to(device))
            values[indices] = logps.double().cpu()
    model.train(was_training)
    if world.size > 1:
        flat = distributed.all_reduce_sum(world, values.flatten().tolist())
        values = torch.tensor(flat, dtype=torch.float64).view(-1, 2)
    return values.tolist()


def _fingerprint(cfg: RunConfig, train: list[TokenizedPair], val: list[TokenizedPair]) -> str:
    """What the stored values depend on: the base model, the method (what "switched off" leaves), the pairs' tokens."""
    digest = hashlib.sha256(json.dumps([cfg.model, cfg.method, cfg.train.dtype]).encode())
    for pair in [*train, *val]:
        digest.update(json.dumps([getattr(pair, key) for key in pair.__dataclass_fields__
                                  if key.endswith(("_ids", "_target"))]).encode())
    return digest.hexdigest()

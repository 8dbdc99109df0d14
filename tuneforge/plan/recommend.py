"""`tuneforge recommend`: the guide's decision tree and tables, applied to the user's own model, data and GPU.

The tree, in the guide's order:
  1. dataset size -> full fine-tuning or PEFT (full only with a lot of data: few examples cannot move billions of
     weights without overfitting, and PEFT matches full fine-tuning below that);
  2. memory -> the cheapest method that fits: full if chosen and it fits, else LoRA, else QLoRA;
  3. domain shift (and dataset size) -> LoRA rank and alpha; method -> learning rate; dataset size -> epochs and the
     effective batch (32-128), split into the largest per-device batch that fits times gradient accumulation.
"Fits" is decided by `estimate_memory` for the run tuneforge would really do, not by a rule of thumb.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tuneforge.config import DataSettings
from tuneforge.errors import UserError
from tuneforge.plan import DEFAULT_DOMAIN_SHIFT, DOMAIN_SHIFTS
from tuneforge.plan.data_shape import DataShape
from tuneforge.plan.memory import MemoryEstimate, MemorySpec, estimate_memory

GIB = 2**30

# The guide's tables. Each row: (examples up to, value, why). Looked up by the first row whose bound is not exceeded.
FULL_MIN_EXAMPLES = 100_000  # below this PEFT matches full fine-tuning; full only with lots of data...
FULL_MIN_EXAMPLES_VERY = 10_000  # ...or a very different domain with a solid dataset behind it
RANK_BY_SHIFT = {  # LoRA rank by how far the target is from what the base model already does
    "none": (8, "the task is close to what the model already does: a small update suffices"),
    "style": (8, "a style or format change is a low-rank update"),
    "somewhat": (16, "new task patterns on familiar ground need more directions than a style change"),
    "very": (64, "a very different domain needs the most capacity PEFT offers"),
}
RANK_SMALL_DATA = (1_000, 8)  # under 1,000 examples a larger rank mostly memorises: cap it
RANK_LARGE_DATA = (50_000, 32)  # with 50,000+ examples there is signal for a larger rank: raise it at least to this
LR_BY_METHOD = {
    "full": (2e-5, "full fine-tuning moves every pretrained weight: 1e-5..5e-5 keeps what the model knew"),
    "lora": (2e-4, "LoRA's update starts at zero and is scaled by alpha/r: 1e-4..3e-4 is the usual range"),
    "qlora": (2e-4, "QLoRA trains LoRA adapters: the same 2e-4 as LoRA (QLoRA paper, 7B-13B models)"),
}
# Preference objectives (`recommend --objective`): the objective's strength and a rate far below supervised tuning's,
# because they start from a model that already answers well and only shift probability between two answers.
PREFERENCE_STRENGTH = {
    "dpo": ("dpo.beta", 0.1, "the DPO paper's and TRL's beta: the policy may move as far from the reference as a "
                             "reward scale of 0.1 allows; raise it (0.3-0.5) for noisy pairs"),
    "ipo": ("ipo.beta", 0.1, "IPO's tau as TRL sets it: a target log-ratio margin of 1 / (2 x 0.1) = 5 per token"),
    "simpo": ("simpo.beta", 2.0, "the SimPO paper's range is 2.0-2.5, for a reward that is a mean per token"),
    "orpo": ("orpo.weight", 0.1, "the ORPO paper's lambda: the odds-ratio term at a tenth of the NLL"),
}
PREFERENCE_LR = {
    "full": (5e-7, "preference tuning of every weight: 5e-7 (Zephyr-7B-beta's DPO rate); supervised rates undo "
                   "what the model already does well"),
    "lora": (5e-6, "preference tuning with LoRA: 10x the full-weight rate, the same LoRA-to-full ratio as supervised "
                   "tuning"),
    "qlora": (5e-6, "QLoRA trains LoRA adapters: the same rate as LoRA"),
}
ORPO_LR = {"full": (8e-6, "ORPO replaces the supervised stage (it starts from a base model): 8e-6, the ORPO paper's "
                          "rate for full-weight tuning"),
           "lora": (8e-5, "ORPO with LoRA: 10x the full-weight rate, the LoRA-to-full ratio of supervised tuning"),
           "qlora": (8e-5, "QLoRA trains LoRA adapters: the same rate as LoRA")}
EPOCHS_BY_SIZE = [
    (1_000, 5, "fewer than 1,000 examples: more passes are needed to learn the pattern (watch val loss)"),
    (10_000, 3, "1,000-10,000 examples: 3 epochs is the usual balance of learning and overfitting"),
    (100_000, 2, "10,000-100,000 examples: 2 passes are enough"),
    (None, 1, "100,000+ examples: one pass sees enough; more mostly overfits"),
]
EFFECTIVE_BATCH_BY_SIZE = [
    (10_000, 32, "under 10,000 examples: 32 keeps enough optimizer steps per epoch"),
    (100_000, 64, "10,000-100,000 examples: 64 gives smoother gradients at a reasonable step count"),
    (None, 128, "100,000+ examples: 128, the top of the guide's 32-128 range"),
]
MAX_LENGTH_STEP = 64  # max_length is rounded up to a multiple of this from the longest example


@dataclass
class Choice:
    key: str  # dotted config key
    value: object
    why: str


@dataclass
class Recommendation:
    choices: list[Choice]
    estimate: MemoryEstimate
    summary: list[str] = field(default_factory=list)  # lines printed above the config

    def value(self, key: str):
        return next(c.value for c in self.choices if c.key == key)


def _lookup(table, n: int):
    for bound, value, why in table:
        if bound is None or n < bound:
            return value, why
    raise AssertionError("table without an open-ended last row")


def recommend(model: str, num_examples: int, gpu_mem_gib: float, domain_shift: str = DEFAULT_DOMAIN_SHIFT,
              shape: DataShape | None = None, data_path: str | None = None, seq_len: int | None = None,
              device: str = "cuda", objective: str = "sft") -> Recommendation:
    """Walk the decision tree for `num_examples` examples (token lengths from `shape` when given; for a preference
    objective, pairs: a pair's length is its prompt once and both answers, as it trains)."""
    if domain_shift not in DOMAIN_SHIFTS:
        raise UserError(f"--domain-shift: got {domain_shift!r}, allowed: {', '.join(DOMAIN_SHIFTS)}")
    if num_examples < 1:
        raise UserError(f"--examples: got {num_examples}, need at least 1 example")
    if gpu_mem_gib <= 0:
        raise UserError(f"--gpu-mem: got {gpu_mem_gib}, must be > 0 (GiB)")
    budget = int(gpu_mem_gib * GIB)
    choices: list[Choice] = [Choice("model", model, "the base model to fine-tune")]
    max_length, length_why = _max_length(shape, seq_len)

    wants_full = num_examples >= FULL_MIN_EXAMPLES or (
        domain_shift == "very" and num_examples >= FULL_MIN_EXAMPLES_VERY)
    effective, batch_why = _lookup(EFFECTIVE_BATCH_BY_SIZE, num_examples)
    effective = min(effective, _pow2_floor(num_examples))  # a batch larger than the data set is one step an epoch
    r, alpha, rank_why = _rank(domain_shift, num_examples)
    base = MemorySpec(model=model, method="lora", lora_r=r, lora_alpha=alpha, device=device,
                      compute_dtype="bf16" if device == "cuda" else "fp32")

    candidates = (["full"] if wants_full else []) + ["lora", "qlora"]
    fitted = None
    for method in candidates:
        fitted = _fit(base, method, effective, budget, shape, max_length)
        if fitted is not None:
            break
    if fitted is None:
        smallest = _fit(base, "qlora", 1, None, shape, max_length)
        raise UserError(
            f"recommend: {model} does not fit in {gpu_mem_gib:g} GiB even with QLoRA, batch 1 and gradient "
            f"checkpointing (estimated peak {smallest[2].peak / GIB:.1f} GiB); use a smaller model or more memory")
    method, batch, est = fitted
    ckpt = est.spec.gradient_checkpointing

    if method == "full":
        method_why = (f"{num_examples:,} examples is enough data to move every weight "
                      f"(full from {FULL_MIN_EXAMPLES:,}, or {FULL_MIN_EXAMPLES_VERY:,} with a very different "
                      f"domain), and it fits in {gpu_mem_gib:g} GiB")
    elif method == "lora":
        method_why = ("PEFT: " + (f"full fine-tuning does not fit in {gpu_mem_gib:g} GiB" if wants_full else
                                  f"{num_examples:,} examples is too few for full fine-tuning to beat LoRA")
                      + "; LoRA on the unquantized base fits")
    else:
        method_why = (f"{'full fine-tuning and ' if wants_full else ''}LoRA on the unquantized base do"
                      f"{'' if wants_full else 'es'} not fit in {gpu_mem_gib:g} GiB; a 4-bit base (NF4, double "
                      "quantization) does")
    choices.append(Choice("method", method, method_why))
    if method != "full":
        choices.append(Choice("lora.r", r, rank_why))
        choices.append(Choice("lora.alpha", float(alpha), "alpha = 2 x r: the guide's rule, an update scale of 2"))
    if data_path is not None:
        choices.append(Choice("data.train", data_path, "the data file these numbers were computed from"))
    choices.append(Choice("data.max_length", max_length, length_why))
    if objective != "sft":
        choices.insert(1, Choice("objective", objective, "you asked for preference tuning on pairs"))
        key, value, why = PREFERENCE_STRENGTH[objective]
        choices.append(Choice(key, value, why))
        if objective == "simpo":
            choices.append(Choice("simpo.gamma", 1.0, "the SimPO paper's gamma / beta of 0.5: a target margin of 1"))
    lr, lr_why = LR_BY_METHOD[method] if objective == "sft" else (ORPO_LR if objective == "orpo" else
                                                                  PREFERENCE_LR)[method]
    choices.append(Choice("train.lr", lr, lr_why))
    epochs, epochs_why = _lookup(EPOCHS_BY_SIZE, num_examples)
    choices.append(Choice("train.epochs", epochs, epochs_why))
    accum = effective // batch
    fit_why = (f"the largest power-of-two micro-batch whose estimated peak ({est.peak / GIB:.1f} GiB) fits in "
               f"{gpu_mem_gib:g} GiB")
    choices.append(Choice("train.batch_size", batch, fit_why))
    choices.append(Choice("train.grad_accum", accum, f"effective batch {batch} x {accum} = {effective}: {batch_why}"))
    if ckpt:
        choices.append(Choice("train.gradient_checkpointing", True,
                              "without it not even a micro-batch of 1 fits; costs ~30% speed, saves most "
                              "activation memory"))
    summary = [
        f"{num_examples:,} {'examples' if objective == 'sft' else 'pairs'}, domain shift {domain_shift!r}, "
        f"{gpu_mem_gib:g} GiB on {device}: {'' if objective == 'sft' else objective + ', '}"
        f"{method}{'' if method == 'full' else f' r={r}'}, micro-batch {batch} x accumulation {accum}"
        f"{', gradient checkpointing' if ckpt else ''}; estimated peak {est.peak / GIB:.1f} GiB",
    ]
    return Recommendation(choices, est, summary)


def _rank(shift: str, n: int) -> tuple[int, int, str]:
    r, why = RANK_BY_SHIFT[shift]
    if n < RANK_SMALL_DATA[0] and r > RANK_SMALL_DATA[1]:
        r, why = RANK_SMALL_DATA[1], f"{why}, but under {RANK_SMALL_DATA[0]:,} examples a larger rank memorises"
    elif n >= RANK_LARGE_DATA[0] and r < RANK_LARGE_DATA[1]:
        r, why = RANK_LARGE_DATA[1], f"{why}, raised: {n:,} examples carry signal for more directions"
    return r, 2 * r, f"domain shift: {why}"


def _max_length(shape: DataShape | None, seq_len: int | None) -> tuple[int, str]:
    if seq_len is not None:
        return seq_len, "the sequence length you asked for"
    default = DataSettings().max_length
    if shape is None or not shape.num_examples:
        return default, "tuneforge's default (give --data to size it from your examples)"
    longest = max(shape.lengths)
    rounded = max(DataSettings.__dataclass_fields__["max_length"].metadata["min"],
                  -(-longest // MAX_LENGTH_STEP) * MAX_LENGTH_STEP)
    return int(rounded), f"your longest example is {longest} tokens (rounded up to a multiple of {MAX_LENGTH_STEP})"


def _micro_batch(shape: DataShape | None, batch: int, max_length: int) -> tuple[tuple[int, ...], int | None]:
    if shape is not None and shape.num_examples:
        lengths, targets = shape.largest_micro_batch(batch)
        return tuple(min(n, max_length) for n in lengths), targets
    return (max_length,) * batch, None


def _fit(base: MemorySpec, method: str, effective: int, budget: int | None, shape: DataShape | None,
         max_length: int) -> tuple[str, int, MemoryEstimate] | None:
    """(method, micro-batch, estimate) with the largest power-of-two micro-batch <= effective that fits `budget`,
    trying without gradient checkpointing first; None when not even 1 fits. `budget=None`: batch 1, checkpointing."""
    from dataclasses import replace

    def est(batch: int, ckpt: bool) -> MemoryEstimate:
        lengths, targets = _micro_batch(shape, batch, max_length)
        accum = max(1, effective // batch)
        return estimate_memory(replace(base, method=method, example_lengths=lengths, target_tokens=targets,
                                       grad_accum=accum, gradient_checkpointing=ckpt))

    if budget is None:
        return method, 1, est(1, True)
    for ckpt in (False, True):
        one = est(1, ckpt)
        if one.peak > budget:
            continue
        # Peak memory is affine in the micro-batch's tokens: predict the largest fitting batch from two points,
        # then confirm it with a real estimate (and step down while it does not fit).
        two = est(min(2, effective), ckpt) if effective > 1 else one
        per_example = max(1, two.peak - one.peak)
        batch = _pow2_floor(min(effective, 1 + (budget - one.peak) // per_example))
        while batch > 1:
            guess = est(batch, ckpt)
            if guess.peak <= budget:
                return method, batch, guess
            batch //= 2
        return method, 1, one
    return None


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def render_yaml(rec: Recommendation) -> str:
    """A run file `load_config` accepts: nested sections, one why-comment per chosen value; defaults stay implicit
    (they live in tuneforge/config.py and `tuneforge train --help-config` lists them)."""
    import yaml

    lines = ["# Written by `tuneforge recommend`. Every value below was chosen for this model, data and GPU;",
             "# anything not listed keeps tuneforge's default (tuneforge train --help-config).",
             *(f"# {line}" for line in rec.summary)]
    current_section = None
    for choice in rec.choices:
        section, _, key = choice.key.rpartition(".")
        if section != current_section:
            if section:
                lines.append(f"{section}:")
            current_section = section
        indent = "  " if section else ""
        value = yaml.safe_dump(choice.value).split("\n...")[0].strip()  # a bare scalar ends with a "..." line
        lines.append(f"{indent}{key}: {value}  # {choice.why}")
    return "\n".join(lines) + "\n"


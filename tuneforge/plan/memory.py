"""Peak training memory, by component, for a model known only by its architecture config.

Two engines, because how a loop trains changes the answer:

- `tuneforge`: what `tuneforge train` does. Weights are held in fp32 (bf16 autocast where the hardware has it);
  examples are packed padding-free; the LM head and cross-entropy run only at answer positions, in chunks of
  `CHUNK_ELEMENTS` logits (tuneforge/train/loss.py), so no [tokens, vocab] tensor exists; AdamW is torch's
  `foreach` implementation, whose step allocates one temporary the size of the trainable parameters.
- `hf`: the standard Hugging Face setup the guide's tables assume. Full fine-tuning in mixed precision (16-bit
  weights and gradients, an fp32 master copy and fp32 Adam moments: 16 bytes a parameter); LoRA on a bf16 base;
  QLoRA with the non-quantized parameters cast to fp32 (PEFT's `prepare_model_for_kbit_training`); logits for every
  position, upcast to fp32 for the loss; a fused optimizer step without temporaries.
- `hf-bf16`: `hf` with full fine-tuning in pure bf16 (weights, gradients and both Adam moments in bf16: 8 bytes a
  parameter), the guide's "Full, 16-bit" row. PEFT methods are counted as under `hf`.

The peak is the larger of two moments: the end of a forward pass (weights, optimizer state, every saved activation,
the loss buffers and backward's first working set; gradients too when they are accumulated across micro-batches)
and the optimizer step (weights, gradients, optimizer state, the step's temporaries).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from dataclasses import dataclass, field

import torch

from tuneforge.errors import UserError
from tuneforge.plan import ENGINES, MEMORY_MODELS, OPTIMIZERS
from tuneforge.plan.activations import ActivationCount, count_saved_activations, decoder_layers
from tuneforge.plan.architectures import ParameterCounts, count_parameters, load_architecture, meta_model

DTYPE_BYTES = {"fp32": 4, "bf16": 2}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# bitsandbytes 4-bit (NF4/FP4): one absmax per block of 64 weights. Without double quantization the absmax is fp32
# (32/64 = 0.5 bits a weight); with it the absmax is 8-bit plus one fp32 constant per 256 blocks
# (8/64 + 32/(64*256) = 0.127 bits) -- the figures of the QLoRA paper, section 3.
QUANT_BLOCK = 64
DOUBLE_QUANT_BLOCK = 256
# bitsandbytes 8-bit optimizers: two uint8 states with an fp32 absmax per 256 values; tensors under 4096 values
# keep 32-bit states (its `min_8bit_size`).
OPTIM8_BLOCK = 256
OPTIM8_MIN_SIZE = 4096


@dataclass(frozen=True)
class MemorySpec:
    """What is being trained, on what, and how: everything the estimate depends on."""

    model: str
    method: str = "lora"
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"
    example_lengths: tuple[int, ...] = (512,)  # token counts of the examples in the largest micro-batch
    target_tokens: int | None = None  # answer tokens in that micro-batch; None = every position
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    engine: str = "tuneforge"
    compute_dtype: str = "fp32"  # the dtype activations are held in
    # dtype of PEFT adapters (and their gradients) and, with QLoRA, of the weights left unquantized: fp32 is what
    # tuneforge and PEFT's default do; the QLoRA paper's code casts LoRA layers, embeddings and head to bf16.
    adapter_dtype: str = "fp32"
    double_quant: bool = True
    packing: bool = True
    fuse_lora: bool = False  # tuneforge's fused LoRA projections (train.fuse_lora): one dropout copy per input
    device: str = "cpu"  # what the overhead line assumes: "cpu" (RSS) or "cuda"
    trust_remote_code: bool = False

    def __post_init__(self):
        for key, value, allowed in (("method", self.method, MEMORY_MODELS), ("engine", self.engine, ENGINES),
                                    ("optimizer", self.optimizer, OPTIMIZERS),
                                    ("compute dtype", self.compute_dtype, tuple(DTYPE_BYTES)),
                                    ("adapter dtype", self.adapter_dtype, tuple(DTYPE_BYTES))):
            if value not in allowed:
                raise UserError(f"{key}: got {value!r}, allowed: {', '.join(allowed)}")
        if not self.example_lengths or min(self.example_lengths) < 1:
            raise UserError(f"sequence lengths must be >= 1 token, got {list(self.example_lengths)}")
        if self.lora_r < 1:
            raise UserError(f"lora r: got {self.lora_r}, must be >= 1")

    @property
    def tokens(self) -> int:
        """Tokens in the largest micro-batch as laid out in memory (padded to the longest unless packed)."""
        if self.packing:
            return sum(self.example_lengths)
        return len(self.example_lengths) * max(self.example_lengths)

    @property
    def peft(self) -> bool:
        return self.method != "full"


@dataclass
class Component:
    name: str
    bytes: int
    note: str


@dataclass
class MemoryEstimate:
    spec: MemorySpec
    params: ParameterCounts
    trainable_params: int
    components: list[Component]
    forward_peak: int
    step_peak: int
    overhead: int
    activations: ActivationCount
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(self.forward_peak, self.step_peak) + self.overhead

    @property
    def peak_phase(self) -> str:
        return "end of forward" if self.forward_peak >= self.step_peak else "optimizer step"

    def component(self, name: str) -> int:
        return sum(c.bytes for c in self.components if c.name == name)


def estimate_memory(spec: MemorySpec) -> MemoryEstimate:
    config = load_architecture(spec.model, spec.trust_remote_code)
    act_dtype = TORCH_DTYPES[spec.compute_dtype]
    stored_bytes = _stored_bytes(config)  # read before building: from_config overwrites config.dtype
    model = meta_model(config, dtype=act_dtype, attn_implementation=_packed_attention(),
                       trust_remote_code=spec.trust_remote_code)
    params = count_parameters(model)  # before adapters wrap the linear layers
    # Tracing a forward pass on meta costs ~0.1 s a layer and PEFT wrapping more: an 80-layer model would take
    # 15 s. Identical layers save and train identical amounts, so a shallow copy of the model stands in for it.
    depth = len(decoder_layers(model))
    probe = _shallow_probe(config, model, depth, act_dtype, spec.trust_remote_code)
    trained = _with_adapters(probe, spec)
    trainable_tensors = _scale_to_depth(_trainable_sizes(trained), depth)
    trainable = sum(trainable_tensors)
    activations = _activations(trained, spec).scaled_to(depth)
    hidden = _hidden_size(config, model)
    vocab = model.get_output_embeddings().weight.shape[0]
    act_bytes = DTYPE_BYTES[spec.compute_dtype]

    comps: list[Component] = []
    add = lambda name, nbytes, note: comps.append(Component(name, int(nbytes), note))  # noqa: E731
    weights, weight_note = _base_weights(spec, params)
    add("base weights", weights, weight_note)
    adapter_bytes = DTYPE_BYTES[spec.adapter_dtype]
    if spec.peft:
        add("trainable params", adapter_bytes * trainable, f"{trainable:,} adapter parameters in {spec.adapter_dtype}")
    if spec.engine == "hf" and not spec.peft:
        add("fp32 master copy", 4 * trainable, "mixed precision keeps fp32 weights for the update")
    grad_bytes = adapter_bytes if spec.peft else (2 if spec.engine != "tuneforge" else 4)
    add("gradients", grad_bytes * trainable, f"{grad_bytes} bytes per trainable parameter")
    optimizer_bytes, optimizer_note = _optimizer_states(spec, trainable_tensors)
    add("optimizer states", optimizer_bytes, optimizer_note)
    step_temp = 4 * trainable if (spec.engine == "tuneforge" and spec.optimizer == "adamw") else 0
    add("optimizer step temporaries", step_temp,
        "torch foreach AdamW builds sqrt(v) for every parameter at once" if step_temp else "fused step: none")
    saved = activations.with_checkpointing if spec.gradient_checkpointing else activations.total
    ckpt = "with" if spec.gradient_checkpointing else "without"
    add("activations", saved, f"saved for backward, {ckpt} checkpointing, {spec.tokens:,} tokens a micro-batch "
        f"(without: {_gib(activations.total)}, with: {_gib(activations.with_checkpointing)})")
    logits, logits_note = _loss_buffers(spec, hidden, vocab, act_bytes)
    add("logits / loss buffers", logits, logits_note)
    # Backward's first steps hold the gradients of one layer's activations beside everything still saved.
    add("backward working set", activations.largest_layer, "about one decoder layer's activations")

    mapped, mapped_note = _mapped_checkpoint(spec, stored_bytes, params)
    if mapped:
        add("mapped checkpoint", mapped, mapped_note)
    if spec.device == "cpu":
        add("allocator retention", HEAP_RETENTION * activations.total,
            f"{HEAP_RETENTION:.0%} of a micro-batch's activation volume ({_gib(activations.total)}, recomputed or "
            "not): freed memory the heap keeps resident (calibrated on glibc malloc; tcmalloc keeps less)")

    get = lambda name: sum(c.bytes for c in comps if c.name == name)  # noqa: E731
    resident = (get("base weights") + get("trainable params") + get("fp32 master copy") + get("optimizer states")
                + get("mapped checkpoint"))
    forward_peak = (resident + get("activations") + get("logits / loss buffers") + get("backward working set")
                    + get("allocator retention"))
    if spec.grad_accum > 1:  # gradients of earlier micro-batches are alive during the next forward
        forward_peak += get("gradients")
    step_peak = resident + get("gradients") + get("optimizer step temporaries")
    overhead, overhead_note = _overhead(spec, max(forward_peak, step_peak))
    comps.append(Component("overhead", overhead, overhead_note))
    notes = []
    if spec.method == "qlora" and spec.engine == "tuneforge":
        notes.append("QLoRA activations counted as LoRA's on a base in the compute dtype (a 4-bit layer saves no "
                     "input, like a frozen one); the dequantized weight of one layer is a transient on top")
    if spec.compute_dtype == "bf16" and spec.engine == "tuneforge":
        notes.append("bf16 autocast counted as bf16 activations (norms and the residual stream stay fp32 in "
                     "practice, so this may read a little low)")
    return MemoryEstimate(spec, params, trainable, comps, forward_peak, step_peak, overhead, activations, notes)


def _packed_attention() -> str:
    from tuneforge.model.attention import PACKED_ATTENTION  # registering it is a side effect of the import

    return PACKED_ATTENTION


def _hidden_size(config, model) -> int:
    return model.get_output_embeddings().weight.shape[1]


def _peft_config(spec: MemorySpec, exclude: str | None = None):
    from peft import LoraConfig

    targets = spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules)
    # The same adapter `tuneforge.model.lora` builds (a unit test holds the two to the same parameter count).
    return LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                      target_modules=targets, exclude_modules=exclude, bias="none", task_type="CAUSAL_LM",
                      use_dora=spec.method == "dora")


def _with_adapters(model: torch.nn.Module, spec: MemorySpec) -> torch.nn.Module:
    """The model as training sees it: itself for full fine-tuning, wrapped by PEFT adapters (on meta) otherwise."""
    from tuneforge.model.families import freeze_beside_language_model

    exclude = freeze_beside_language_model(model)  # a multimodal checkpoint's vision tower: frozen, no adapters
    if not spec.peft:
        return model
    from peft import get_peft_model

    from tuneforge.model.lora import missing_targets

    targets = spec.target_modules
    if not isinstance(targets, str):
        missing = missing_targets(model, targets, exclude)
        if missing:
            raise UserError(f"lora target_modules: {', '.join(missing)} not found in {spec.model}")
    wrapped = get_peft_model(model, _peft_config(spec, exclude), low_cpu_mem_usage=True)
    if spec.fuse_lora and spec.engine == "tuneforge":
        from tuneforge.model.fused_lora import fuse_lora

        fuse_lora(wrapped)  # what is saved for backward changes with it (fewer dropout copies)
    return wrapped


PROBE_DEPTH = 2  # layer 0 (its input is the embedding output) and one representative of all the others


def _shallow_probe(config, model: torch.nn.Module, depth: int, dtype: torch.dtype,
                   trust_remote_code: bool) -> torch.nn.Module:
    """`model` with only PROBE_DEPTH decoder layers when all its layers are alike; else `model` itself."""
    layers = decoder_layers(model)
    shapes = [tuple((n, tuple(p.shape)) for n, p in layer.named_parameters()) for layer in layers]
    # A multimodal config (Gemma 3) keeps the decoder's fields in its text_config; a text-only one is its own.
    kinds = getattr(config.get_text_config(), "layer_types", None)  # e.g. sliding-window and full alternating
    if depth <= PROBE_DEPTH or len(set(shapes)) > 1 or (kinds and len(set(kinds)) > 1):
        return model
    shallow = copy.deepcopy(config)
    text = shallow.get_text_config()
    text.num_hidden_layers = PROBE_DEPTH  # attribute_map renames it for families that call it n_layer etc.
    if kinds:
        text.layer_types = list(kinds[:PROBE_DEPTH])
    probe = meta_model(shallow, dtype=dtype, attn_implementation=_packed_attention(),
                       trust_remote_code=trust_remote_code)
    return probe if len(decoder_layers(probe)) == PROBE_DEPTH else model


def _trainable_sizes(model: torch.nn.Module) -> list[list[int]]:
    """numel of every trainable tensor, tied weights once: [outside the decoder layers, layer 0, layer 1, ...]."""
    layer_of = {id(p): i for i, layer in enumerate(decoder_layers(model)) for p in layer.parameters()}
    groups: list[list[int]] = [[] for _ in range(1 + len(decoder_layers(model)))]
    seen: set[int] = set()
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            groups[1 + layer_of[id(p)] if id(p) in layer_of else 0].append(p.numel())
    return groups


def _scale_to_depth(groups: list[list[int]], depth: int) -> list[int]:
    """Flat trainable sizes of the full-depth model: the probe's last layer stands for every layer it lacks."""
    outside, layers = groups[0], groups[1:]
    if layers:
        layers = layers + [layers[-1]] * (depth - len(layers))
    return outside + [n for layer in layers for n in layer]


def _activations(model: torch.nn.Module, spec: MemorySpec) -> ActivationCount:
    """Count what a training forward pass of the body saves, laid out as the engine lays the micro-batch out."""
    model.train()  # dropout (LoRA's keeps a copy of its input) behaves as in training
    body = model.get_decoder()
    if spec.engine == "tuneforge" and spec.packing:
        lengths = list(spec.example_lengths)
    else:  # padded rows: every example as long as the longest (hf pads; so does tuneforge without packing)
        lengths = [max(spec.example_lengths)] * len(spec.example_lengths)
    total = sum(lengths)
    bounds = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)  # read on the host, as in training
    ids = torch.zeros(1, total, dtype=torch.long, device="meta")
    positions = torch.zeros(1, total, dtype=torch.long, device="meta")
    needs_input_grad = spec.gradient_checkpointing and spec.peft  # enable_input_require_grads in the loop

    def call():
        embeds = body.get_input_embeddings()(ids)
        if needs_input_grad:
            embeds.requires_grad_(True)
        body(inputs_embeds=embeds, position_ids=positions, use_cache=False,
             cu_seq_lens_q=bounds, cu_seq_lens_k=bounds)

    try:
        return count_saved_activations(model, call)
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
        raise UserError(f"model: cannot trace a {type(model).__name__} forward pass on the meta device to count "
                        f"activations ({str(exc).splitlines()[0]})") from None


def _base_weights(spec: MemorySpec, params: ParameterCounts) -> tuple[int, str]:
    if spec.method == "qlora":
        per_block = (1 + 4 / DOUBLE_QUANT_BLOCK) if spec.double_quant else 4  # bytes of constants per 64 weights
        packed = sum((n + 1) // 2 for n in params.linear_tensors)
        constants = sum(math.ceil(n / QUANT_BLOCK) * per_block for n in params.linear_tensors)
        constants += len(params.linear_tensors) * (256 * 4 if spec.double_quant else 0)  # 8-bit code tables
        rest = DTYPE_BYTES[spec.adapter_dtype] * params.unquantized
        bits = 8 * (packed + constants) / max(1, params.linear)
        dq = "with" if spec.double_quant else "without"
        return int(packed + constants + rest), (
            f"{params.linear:,} linear weights in 4-bit ({bits:.3f} bits each, {dq} double quantization: "
            f"{_gib(packed + constants)}) + {params.unquantized:,} others in {spec.adapter_dtype} ({_gib(rest)})")
    if spec.engine == "tuneforge":
        return 4 * params.total, f"{params.total:,} parameters in fp32 (tuneforge holds weights in fp32)"
    return 2 * params.total, f"{params.total:,} parameters in bf16"


def _optimizer_states(spec: MemorySpec, trainable_tensors: list[int]) -> tuple[int, str]:
    if spec.optimizer == "adamw" and spec.engine == "hf-bf16" and not spec.peft:
        return 4 * sum(trainable_tensors), "AdamW: two bf16 moments per parameter (pure bf16)"
    if spec.optimizer == "adamw":
        return 8 * sum(trainable_tensors), "AdamW: two fp32 moments per trainable parameter"
    total = 0
    for n in trainable_tensors:
        if n < OPTIM8_MIN_SIZE:
            total += 8 * n
        else:
            total += 2 * n + 2 * 4 * math.ceil(n / OPTIM8_BLOCK)
    return total, "8-bit AdamW: two uint8 moments + an fp32 absmax per 256 values (small tensors stay 32-bit)"


def _loss_buffers(spec: MemorySpec, hidden: int, vocab: int, act_bytes: int) -> tuple[int, str]:
    targets = spec.target_tokens if spec.target_tokens is not None else spec.tokens
    if spec.engine == "tuneforge":
        from tuneforge.train.loss import CHUNK_ELEMENTS  # the loop's chunk size: one source of truth

        rows = min(targets, max(16, CHUNK_ELEMENTS // vocab))
        nbytes = rows * vocab * 4 + 2 * targets * hidden * act_bytes
        note = (f"answer positions only: {targets:,} gathered hidden rows and their gradient, "
                f"one chunk of {rows:,} x {vocab:,} fp32 logits")
        if not spec.peft:  # the head trains: its fp32 gradient and one chunk's product are built in the same pass
            nbytes += 2 * vocab * hidden * 4
            note += ", the head's gradient"
        return nbytes, note
    positions = spec.tokens
    per = act_bytes + 4 + 4 if act_bytes < 4 else 4 + 4
    return positions * vocab * per, (f"[{positions:,} x {vocab:,}] logits for every position: {per} bytes each "
                                     "(the logits, their fp32 upcast when 16-bit, the log-softmax kept for backward)")


def _stored_bytes(config) -> int:
    """Bytes a parameter in the model's checkpoint files, from its config (2 when it does not say)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return {"float32": 4, "float16": 2, "bfloat16": 2}.get(str(dtype).replace("torch.", ""), 2)


def _mapped_checkpoint(spec: MemorySpec, stored_bytes: int, params: ParameterCounts) -> tuple[int, str]:
    """QLoRA on CPU: transformers quantizes the linear weights while reading them from a memory-mapped safetensors
    file and keeps the file mapped as long as the model lives, so those pages stay in the process's RSS. Measured
    after loading the embedded model in 4 bits: 416 MiB of file-backed RSS, against 405 MiB of fp32 linear weights
    in its 513 MiB file (the embedding is copied out, not kept mapped). Unquantized models use the file's pages as
    their weights, counted once as base weights; on CUDA the mapping is host memory, not GPU memory."""
    if spec.method != "qlora" or spec.device != "cpu":
        return 0, ""
    from tuneforge.config import EMBEDDED_MODEL
    from tuneforge.plan.architectures import bundled_name

    if bundled_name(spec.model) == bundled_name(EMBEDDED_MODEL):
        stored_bytes = 4  # the embedded GGUF is cached dequantized to fp32 (tuneforge/model/load.py)
    return stored_bytes * params.linear, (f"the checkpoint's linear weights ({stored_bytes} bytes each) stay "
                                          "memory-mapped while the 4-bit model lives: their pages count in RSS")


# CPU training allocates through glibc malloc. After the first backward its mmap threshold has risen to the largest
# freed activation (up to 32 MiB), so activations come from the heap, and freed heap memory stays resident and
# fragmented: a run's peak RSS exceeds its live tensors. Measured on the embedded model (bench/estimate_accuracy.py,
# glibc 2.36), peak RSS with the default allocator minus peak RSS with the threshold pinned (RSS = live tensors):
# 50-65% of a micro-batch's activation volume for LoRA/QLoRA (with or without gradient checkpointing: recomputed
# activations churn the heap alike), 23-51% for full fine-tuning (its weight gradients, allocated during backward,
# refill the holes). Pinning the threshold in training would remove it but cost ~35% more CPU time a step (every
# activation then pays fresh page faults), so the estimate counts it instead: 35%, which keeps all eight measured
# runs within 20% (2026-11-29). Measured again on 2026-12-05 (the README's table, both allocators): `tuneforge
# train` preloads tcmalloc where it is installed (tuneforge/allocator.py), and with it 10 of 11 runs are within 20%
# (-4% to +19%; DoRA +54%); with glibc the two largest micro-batches now read 23% and 31% low, and two runs with one
# estimate differ by 740 MiB, so no single figure fits glibc. A figure per allocator is the next step. jemalloc and
# CUDA are not covered.
HEAP_RETENTION = 0.35
# Measured on a 2-core CPU (bench/estimate_accuracy.py): a tuneforge run's RSS also holds the tokenizer, the
# tokenized data, the run's bookkeeping and allocator slack.
CPU_OVERHEAD_BYTES = 200 * 2**20
# On CUDA: the CUDA context and cuBLAS workspaces (outside PyTorch's allocator) and allocator fragmentation.
CUDA_OVERHEAD_BYTES = 2**30
OVERHEAD_FRACTION = 0.05


def _overhead(spec: MemorySpec, peak: int) -> tuple[int, str]:
    fixed = CUDA_OVERHEAD_BYTES if spec.device == "cuda" else CPU_OVERHEAD_BYTES
    what = "CUDA context and allocator" if spec.device == "cuda" else "tokenizer, data, runtime"
    return int(fixed + OVERHEAD_FRACTION * peak), f"{_gib(fixed)} fixed ({what}) + {OVERHEAD_FRACTION:.0%} slack"


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def replace(spec: MemorySpec, **changes) -> MemorySpec:
    return dataclasses.replace(spec, **changes)

"""The fine-tuning methods: ONE table of what each method is, and every fact the rest of tuneforge needs about it.

Why the facts live here and the code elsewhere: `tuneforge/config.py` takes its `method` choices from this table, and
config must import without torch (fast --help, validation before any model loads). So this module imports nothing
and holds only facts: name, config sections, what trains, how a run is saved, and what merge, serve, FSDP, gradient
checkpointing and the planner can do with it. Code asks these facts instead of keeping its own tuple of names:
loading the base asks `quantized_base`, loading a run back asks `saved_as` (three on-disk forms, each loaded by
`tuneforge.model.trained`), `tuneforge merge` asks `merges`. The one thing that is code per method, how it wraps a
fresh base model, is `tuneforge.model.methods.APPLY`: a dict keyed by these names (a test holds the two to the same
set), because an entry here cannot import torch and must never name code by a dotted string.

Adding a method: one `Method` entry below, its wrapping function in its own file under tuneforge/model/, and that
function in `APPLY`; its settings section, if new, in config.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SavedAs = Literal["model", "peft", "bottleneck"]
# What a run directory holds for each form (the README table says this).
SAVED_AS = {
    "model": "a Hugging Face model directory",
    "peft": "PEFT adapter",
    "bottleneck": "adapter_model + bottleneck_config",
}


@dataclass(frozen=True)
class Method:
    name: str
    trains: str  # one line: what trains (config help, README table)
    saved_as: SavedAs  # the whole model, or only what trained, to be put back onto the base (see SAVED_AS)
    sections: tuple[str, ...] = ()  # the RunConfig sections holding its settings
    quantized_base: bool = False  # trains on, and reloads onto, the base with 4-bit linear weights (qlora section)
    merges: bool = False  # `tuneforge merge` folds its update into the base weights (PEFT merge_and_unload)
    why_not_merged: str = ""  # for an adapter that does not merge: why, as `tuneforge merge` says it
    servable: bool = False  # `tuneforge serve --adapter` can switch it per request (a PEFT LoRA, mixed batches)
    fsdp_refused: str = ""  # when FSDP cannot shard it: what to do instead, as the config refusal says it
    gradient_checkpointing: bool = True  # whether train.gradient_checkpointing works with it
    planner: str | None = None  # the method tuneforge/plan models its memory as (MemorySpec.method); None: not modelled

    def __post_init__(self):
        # The code that merges and serves is PEFT's; a whole model has nothing to merge or attach.
        assert not (self.merges or self.servable) or self.saved_as == "peft", self.name
        assert self.merges or self.saved_as == "model" or self.why_not_merged, f"{self.name}: say why it cannot merge"


REGISTRY: tuple[Method, ...] = (
    Method("full", "every weight", "model", planner="full"),
    Method("lora", "low-rank updates B·A beside the linear layers (PEFT)", "peft", ("lora",),
           merges=True, servable=True, planner="lora"),
    Method("qlora", "LoRA on a base whose linear weights are 4-bit NF4 (bitsandbytes)", "peft", ("lora", "qlora"),
           quantized_base=True, merges=True, servable=True, planner="qlora",
           # Sharding bitsandbytes' packed 4-bit weights needs their storage dtype to match the compute dtype and is
           # not supported by bitsandbytes on CPU; DDP replicates the 4-bit base and works.
           fsdp_refused="use ddp (the 4-bit base is small enough to replicate)"),
    Method("dora", "LoRA plus a learned magnitude per output unit (PEFT use_dora)", "peft", ("lora",),
           merges=True, servable=True, planner="dora"),
    Method("adapter", "bottleneck layers after attention / MLP (tuneforge.model.bottleneck)", "bottleneck",
           ("adapter",), why_not_merged="its bottleneck layers are extra modules, not a change to existing weights"),
    Method("prefix", "learned key/value prefixes in every layer (PEFT)", "peft", ("prefix",),
           why_not_merged="its trained prefix is extra key/value states, not a change to existing weights",
           # Recomputing a layer would append its learned key/value prefix to the attention cache a second time.
           gradient_checkpointing=False),
    Method("prompt", "learned soft-prompt input embeddings (PEFT)", "peft", ("prompt",),
           why_not_merged="its trained soft prompt is extra input embeddings, not a change to existing weights"),
)

METHOD_NAMES = tuple(m.name for m in REGISTRY)  # config's `method` choices, in this order
MERGEABLE_METHODS = tuple(m.name for m in REGISTRY if m.merges)
SERVABLE_METHODS = tuple(m.name for m in REGISTRY if m.servable)
PLANNED_METHODS = tuple(m.name for m in REGISTRY if m.planner is not None)
_BY_NAME = {m.name: m for m in REGISTRY}


def find_method(name: str | None) -> Method | None:
    """The entry for `name`, or None for a name tuneforge does not know (a run directory from elsewhere)."""
    return _BY_NAME.get(name) if isinstance(name, str) else None


def method_named(name: str) -> Method:
    """The entry for a name already validated (a loaded RunConfig's `method`)."""
    return _BY_NAME[name]


def saves_whole_model(name: str | None) -> bool:
    """Whether a run of this method holds a complete model (a merged run says `full`), not an adapter on a base."""
    method = find_method(name)
    return method is not None and method.saved_as == "model"


def method_help() -> str:
    """The `method` field's help text (`tuneforge train --help-config`)."""
    return "How to fine-tune, by what trains: " + "; ".join(f"{m.name}: {m.trains}" for m in REGISTRY) + "."


def methods_table() -> str:
    """The Markdown table of every method, as the README's "Methods" section shows it (a test holds them equal)."""
    rows = ["| `method` | what trains | settings | saved as | `merge` | `serve --adapter` | FSDP | gradient "
            "checkpointing | `estimate` |",
            "|---|---|---|---|---|---|---|---|---|"]
    for m in REGISTRY:
        whole = m.saved_as == "model"
        cells = [f"`{m.name}`", m.trains, ", ".join(f"`{s}.*`" for s in m.sections) or "-", SAVED_AS[m.saved_as],
                 "-" if whole else "yes" if m.merges else "no", "-" if whole else "yes" if m.servable else "no",
                 f"no: {m.fsdp_refused}" if m.fsdp_refused else "yes", "yes" if m.gradient_checkpointing else "no",
                 "yes" if m.planner else "no"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)

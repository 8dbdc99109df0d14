"""Planning before spending compute: `recommend` (the guide's decision tree) and `estimate` (memory and time).

Everything here works from a model's architecture config alone: models are built on PyTorch's meta device (shapes,
no storage), so a 70B estimate needs no weights, no download and no GPU.
"""

from tuneforge.method_registry import PLANNED_METHODS, REGISTRY

# The choices the planner models; here (no torch import) so the CLI's --help stays fast.
METHODS = PLANNED_METHODS  # the run methods `estimate` accepts (method_registry: `planner`)
MEMORY_MODELS = tuple(dict.fromkeys(m.planner for m in REGISTRY if m.planner))  # what MemorySpec.method can be
ENGINES = ("tuneforge", "hf", "hf-bf16")
OPTIMIZERS = ("adamw", "adamw8bit")
DOMAIN_SHIFTS = ("none", "style", "somewhat", "very")
DEFAULT_DOMAIN_SHIFT = "somewhat"  # the middle ground when the user does not say

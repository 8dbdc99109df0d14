"""Planning before spending compute: `recommend` (the guide's decision tree) and `estimate` (memory and time).

Everything here works from a model's architecture config alone: models are built on PyTorch's meta device (shapes,
no storage), so a 70B estimate needs no weights, no download and no GPU.
"""

# The choices the planner models; here (no torch import) so the CLI's --help stays fast.
METHODS = ("full", "lora", "qlora", "dora")
ENGINES = ("tuneforge", "hf", "hf-bf16")
OPTIMIZERS = ("adamw", "adamw8bit")
DOMAIN_SHIFTS = ("none", "style", "somewhat", "very")
DEFAULT_DOMAIN_SHIFT = "somewhat"  # the middle ground when the user does not say

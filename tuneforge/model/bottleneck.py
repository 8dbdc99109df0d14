"""Bottleneck adapters (Houlsby et al., 2019): the one fine-tuning method PEFT lacks.

An adapter is a small residual MLP, `x + up(f(down(x)))`, applied to the output of the attention block and/or the MLP
block of every decoder layer, before that output joins the residual stream. The up-projection starts at zero, so until
the first update the adapted model computes exactly what the base model computes; only the adapters train.

The adapters live in a thin wrapper (`BottleneckModel`, shaped like PEFT's `PeftModel`: `get_base_model()`,
`save_pretrained`, attribute fallthrough to the base) and reach the base model through forward hooks on its attention
and MLP modules. The base model's parameter names and state dict therefore stay untouched, and saving writes only the
adapters: `adapter_model.safetensors` plus `bottleneck_config.json`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tuneforge.config import AdapterSettings
from tuneforge.errors import ConfigError, UserError

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "bottleneck_config.json"
ACTIVATIONS = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU, "tanh": torch.nn.Tanh}
# Attribute names of a decoder layer's attention and MLP blocks across transformers' causal LMs.
ATTENTION_NAMES = ("self_attn", "attention", "attn")
MLP_NAMES = ("mlp", "feed_forward", "ffn")


@dataclass
class BottleneckConfig:
    """What it takes to rebuild the adapters on a base model; saved as bottleneck_config.json."""

    hidden_size: int
    bottleneck_dim: int
    non_linearity: str
    placement: str  # both | attention | mlp
    num_layers: int

    @property
    def blocks(self) -> tuple[str, ...]:
        return ("attention", "mlp") if self.placement == "both" else (self.placement,)


class BottleneckAdapter(torch.nn.Module):
    """x + up(f(down(x))), with up = 0 at the start (the identity)."""

    def __init__(self, hidden_size: int, bottleneck_dim: int, non_linearity: str):
        super().__init__()
        self.down = torch.nn.Linear(hidden_size, bottleneck_dim)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = torch.nn.Linear(bottleneck_dim, hidden_size)
        # Down keeps nn.Linear's Kaiming init so the bottleneck carries signal from step one (as LoRA's A does);
        # a zero up-projection makes the whole adapter the identity until training moves it (as LoRA's B = 0 does).
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


def decoder_blocks(model: torch.nn.Module) -> list[dict[str, torch.nn.Module]]:
    """Per decoder layer, its attention and MLP modules: [{"attention": ..., "mlp": ...}, ...]."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ConfigError(f"method adapter: {type(model).__name__} has no decoder `layers` to put adapters in")
    blocks = []
    for index, layer in enumerate(layers):
        found = {}
        for block, names in (("attention", ATTENTION_NAMES), ("mlp", MLP_NAMES)):
            module = next((getattr(layer, n) for n in names if isinstance(getattr(layer, n, None), torch.nn.Module)),
                          None)
            if module is None:
                raise ConfigError(f"method adapter: decoder layer {index} of {type(model).__name__} has no {block} "
                                  f"block (looked for {', '.join(names)})")
            found[block] = module
        blocks.append(found)
    return blocks


def _through_adapter(adapter: BottleneckAdapter):
    def hook(module, args, output):
        # Attention modules return (hidden, attention weights, ...); MLPs return the hidden states alone.
        if isinstance(output, tuple):
            return (adapter(output[0]),) + output[1:]
        return adapter(output)

    return hook


class BottleneckModel(torch.nn.Module):
    """A causal LM with bottleneck adapters; only the adapters are trainable."""

    def __init__(self, model: torch.nn.Module, config: BottleneckConfig):
        super().__init__()
        blocks = decoder_blocks(model)
        if len(blocks) != config.num_layers or model.config.hidden_size != config.hidden_size:
            raise UserError(f"bottleneck adapters for {config.num_layers} layers of width {config.hidden_size} do not "
                            f"fit a model with {len(blocks)} layers of width {model.config.hidden_size}")
        for param in model.parameters():
            param.requires_grad_(False)
        self.base_model = model
        self.bottleneck_config = config
        reference = next(model.parameters())
        self.adapters = torch.nn.ModuleList(
            torch.nn.ModuleDict({
                block: BottleneckAdapter(config.hidden_size, config.bottleneck_dim, config.non_linearity)
                for block in config.blocks
            })
            for _ in blocks
        ).to(device=reference.device, dtype=reference.dtype)
        self._hooks = [
            layer_blocks[block].register_forward_hook(_through_adapter(layer_adapters[block]))
            for layer_blocks, layer_adapters in zip(blocks, self.adapters)
            for block in config.blocks
        ]

    def get_base_model(self) -> torch.nn.Module:
        return self.base_model

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name: str):
        # Everything the adapters do not define (config, generation_config, set_attn_implementation, ...) is the
        # base model's, as with PEFT's PeftModel.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_model"), name)

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                        **_ignored) -> None:
        """`state_dict`: this whole module's weights gathered by the caller (its own may be FSDP shards)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        own = self.adapters.state_dict() if state_dict is None else {
            name.removeprefix("adapters."): t for name, t in state_dict.items() if name.startswith("adapters.")}
        weights = {name: t.detach().contiguous() for name, t in own.items()}
        save_file(weights, directory / WEIGHTS_FILE, metadata={"format": "pt"})
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.bottleneck_config), indent=2) + "\n",
                                             encoding="utf-8")

    @classmethod
    def from_pretrained(cls, model: torch.nn.Module, directory: str | Path) -> "BottleneckModel":
        """The adapters saved in `directory`, put back onto `model` (the base they were trained on)."""
        directory = Path(directory)
        try:
            raw = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
            config = BottleneckConfig(**raw)
        except (OSError, ValueError, TypeError) as exc:
            raise UserError(f"{directory / CONFIG_FILE}: cannot read the bottleneck adapter config ({exc})") from None
        wrapped = cls(model, config)
        try:
            weights = load_file(directory / WEIGHTS_FILE)
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{directory / WEIGHTS_FILE}: not a readable safetensors file ({exc})") from None
        try:
            wrapped.adapters.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise UserError(f"{directory / WEIGHTS_FILE}: does not match {CONFIG_FILE}: {first}") from None
        return wrapped


def bottleneck_config_for(model: torch.nn.Module, settings: AdapterSettings) -> BottleneckConfig:
    hidden = model.config.hidden_size
    size = settings.bottleneck_dim or max(1, hidden // settings.reduction_factor)
    return BottleneckConfig(hidden_size=hidden, bottleneck_dim=size, non_linearity=settings.non_linearity,
                            placement=settings.placement, num_layers=len(decoder_blocks(model)))


def add_bottleneck_adapters(model: torch.nn.Module, settings: AdapterSettings) -> BottleneckModel:
    return BottleneckModel(model, bottleneck_config_for(model, settings))

"""Fused LoRA projections for training: the projections that read one input run as one.

q/k/v read the same normed hidden states, and so do gate/up. PEFT runs each as its own module: the base matmul, a
dropout of the input (a mask and a copy of the input per module), the A and B matmuls, a scale and an add, each
allocating its own tensor, seven times per layer. Here a group of projections that share an input does:

    y = x @ [W_q; W_k; W_v]^T            one base matmul (the frozen weights live in one buffer; each module's
                                          weight is a view of it, so nothing is stored twice)
    a = dropout(x) @ [A_q; A_k; A_v]^T    one dropout, one A matmul
    y += a @ blockdiag(s B_q, s B_k, s B_v)^T   in place, one matmul
    q, k, v = y.split(...)                views, no copies

and o_proj / down_proj (alone in their group) take the same path. The forward and the gradients equal PEFT's (within
float rounding; tests/unit/test_fused_lora.py compares them per family). What is saved stays PEFT's: the A and B
parameters are PEFT's own modules, only their forward changes, and `unfuse` gives every module its own weight back.

Dropout: PEFT draws a mask per module; a group draws one per input, shared by its modules (each module still sees
its input dropped with probability p, as LoRA's dropout means; the masks are correlated across q/k/v): one mask and
one dropped copy per input instead of one per module, and the mask is drawn by where its drops fall
(tuneforge/model/dropout.py), exactly distributed and several times cheaper than a random number per element.

How the group is reached: the attention (MLP) module calls q_proj(x), k_proj(x), v_proj(x) in turn. The first call
computes the whole group and keeps the others' outputs for the same input tensor; a later member called with that
tensor takes its output. A member called with any other tensor computes the group afresh, so a family that fed its
projections different inputs would still be right, only not faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.model.dropout import lora_dropout

# Projections that read one input in the decoder layers of the supported families (Phi-3's are fused already).
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
ADAPTER = "default"


class FusedGroup:
    """Projections of one parent module that share their input, run as one (see the module docstring)."""

    def __init__(self, members: list[torch.nn.Module]):
        self.members = members
        base = [m.base_layer for m in members]
        self.widths = [layer.out_features for layer in base]
        with torch.no_grad():
            # One module: its own weight, the Parameter itself (nothing new to store; the planner, which counts what
            # autograd saves, recognises parameters by identity).
            self.weight = torch.cat([layer.weight for layer in base]) if len(base) > 1 else base[0].weight
            biases = [layer.bias for layer in base]
            self.bias = (torch.cat([b if b is not None else torch.zeros(w, dtype=self.weight.dtype,
                                                                        device=self.weight.device)
                                    for b, w in zip(biases, self.widths)])
                         if any(b is not None for b in biases) else None)
        if len(base) > 1:  # each module's frozen weight becomes a view of the one buffer: stored once
            for layer, weight, bias in zip(base, self.weight.split(self.widths), self._bias_parts()):
                layer.weight = torch.nn.Parameter(weight, requires_grad=False)
                if layer.bias is not None:
                    layer.bias = torch.nn.Parameter(bias, requires_grad=False)
        self.dropout = members[0].lora_dropout[ADAPTER]
        self._input: torch.Tensor | None = None
        self._pending: list[torch.Tensor | None] = []
        self._forwards = []
        for index, member in enumerate(members):
            member._fused_group = self  # a plain attribute (not a submodule): how the planner finds the buffer
            self._forwards.append(member.__dict__.get("forward"))
            member.forward = self._member_forward(index)  # an instance attribute: nn.Module.__call__ calls it

    def _bias_parts(self) -> list[torch.Tensor | None]:
        return list(self.bias.split(self.widths)) if self.bias is not None else [None] * len(self.widths)

    def _member_forward(self, index: int):
        member = self.members[index]

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if member.disable_adapters or member.merged or args or kwargs:
                # PEFT's `disable_adapter()` (a preference objective's reference pass), a merge, or a call this
                # path does not know: PEFT's own forward.
                return type(member).forward(member, x, *args, **kwargs)
            if x is not self._input or self._pending[index] is None:
                self._pending = list(self.outputs(x))
                self._input = x
            out, self._pending[index] = self._pending[index], None
            if not any(p is not None for p in self._pending):
                self._input = None  # every member took its output: hold no activations between calls
            return out

        return forward

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every member's output for input `x` ([..., in_features])."""
        shape = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        y = F.linear(flat, self.weight, self.bias)
        # PEFT's dropout module says the rate and whether the model is training; the mask is drawn sparsely.
        dropped = lora_dropout(flat, getattr(self.dropout, "p", 0.0), self.dropout.training)
        a_weight = torch.cat([m.lora_A[ADAPTER].weight for m in self.members]) if len(self.members) > 1 else \
            self.members[0].lora_A[ADAPTER].weight
        b_weight = torch.block_diag(*[m.lora_B[ADAPTER].weight * m.scaling[ADAPTER] for m in self.members])
        # The base matmul's output is not saved by its backward, so the LoRA term can go into it in place (in its
        # dtype: under bf16 autocast the base matmul gives bf16, and an in-place op is not autocast).
        a = dropped @ a_weight.t()
        y = y.addmm_(a.to(y.dtype), b_weight.t().to(y.dtype))
        if len(self.members) == 1:
            return (y.reshape(*shape, -1),)
        return tuple(part.reshape(*shape, width) for part, width in zip(y.split(self.widths, dim=-1), self.widths))

    def unfuse(self) -> None:
        """PEFT's own forward back, and each module's own weight (a copy of its view)."""
        for member, forward in zip(self.members, self._forwards):
            del member._fused_group
            if forward is None:
                del member.forward
            else:
                member.forward = forward
        if len(self.members) > 1:
            for member in self.members:
                layer = member.base_layer
                layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
                if layer.bias is not None:
                    layer.bias = torch.nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self._input, self._pending = None, []


def fusable(module: torch.nn.Module) -> bool:
    """A plain PEFT LoRA linear layer on an unquantized nn.Linear, with the one adapter, active and unmerged."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    return (type(module) is LoraLinear and type(module.base_layer) is torch.nn.Linear
            and list(module.lora_A.keys()) == [ADAPTER] and list(module.active_adapters) == [ADAPTER]
            and ADAPTER not in module.lora_variant and not module.merged and not module.disable_adapters
            and module.lora_B[ADAPTER].bias is None)


def fuse_lora(model: torch.nn.Module) -> list[FusedGroup]:
    """Group the model's LoRA projections by shared input and switch them to the fused forward; returns the groups
    (give them to `unfuse_lora` before merging or saving a whole model). Modules that cannot fuse keep PEFT's."""
    groups, seen = [], set()
    for _, parent in model.named_modules():
        children = dict(parent.named_children())
        for names in SHARED_INPUTS:
            members = [children[n] for n in names if n in children and fusable(children[n])]
            same_dropout = len({getattr(m.lora_dropout[ADAPTER], "p", 0.0) for m in members}) == 1
            if members and same_dropout:
                groups.append(FusedGroup(members))
                seen.update(id(m) for m in members)
    for _, module in model.named_modules():
        if id(module) not in seen and fusable(module):
            groups.append(FusedGroup([module]))
            seen.add(id(module))
    return groups


def fused_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """The frozen weight buffers of the model's fused groups: weights, not activations, wherever autograd saves them."""
    groups = {id(g): g for m in model.modules() if (g := getattr(m, "_fused_group", None)) is not None}
    return [t for g in groups.values() for t in (g.weight, g.bias) if t is not None]


def unfuse_lora(groups: list[FusedGroup]) -> None:
    for group in groups:
        group.unfuse()

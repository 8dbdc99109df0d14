"""Several processes, one loop: torchrun starts them, PyTorch's DDP or FSDP2 keeps them in step.

tuneforge adds no distribution engine of its own. What it adds is the bookkeeping that makes a run's result independent
of the number of processes:
- every rank plans the same global step (batch_size x grad_accum x world_size micro-batches) and runs its own share of
  the micro-batches (packed per rank); all ranks run the same number of forward/backward passes, a rank with nothing
  left in a short last step runs a zero-weighted copy so that the collectives still line up;
- the loss is divided by the global step's answer-token count (all-reduced) and multiplied by the world size, because
  DDP and FSDP average gradients over ranks: the result is the same answer-token mean as in one process;
- checkpoints are written by rank 0 in the one-process format (full trainable weights and an index-keyed optimizer
  state, gathered from the shards under FSDP), so a checkpoint does not care how it was made.
Outside torchrun (WORLD_SIZE unset) every function here is a no-op and the loop is the plain one-process loop.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from tuneforge.errors import ConfigError
from tuneforge.train.checkpoint import load_trainable_state, trainable_state
from tuneforge.train.forward import causal_lm_of

WRAPPED_PREFIX = "model."  # the loss module holds the model as `.model`: FSDP's state-dict names carry this prefix


@dataclass(frozen=True)
class World:
    mode: str  # "none" | "ddp" | "fsdp"
    rank: int = 0
    size: int = 1
    owns_group: bool = False  # we created the process group (so we destroy it), not a caller that trains many runs

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mode != "none"


def start(requested: str, timeout_s: int, device: str) -> World:
    """Join the process group torchrun prepared (env:// rendezvous); `requested` is train.distributed."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    size = int(os.environ.get("WORLD_SIZE", "1")) if launched else 1
    mode = requested if requested != "auto" else ("ddp" if size > 1 else "none")
    if mode == "none" and size > 1:
        raise ConfigError(f"train.distributed: got 'none' but torchrun started {size} processes; use ddp or fsdp "
                          f"(or launch one process)")
    if mode != "none" and not launched:
        raise ConfigError(f"train.distributed: got {mode!r} outside torchrun; launch with `tuneforge train RUN.yaml "
                          f"--nproc N` or `torchrun --nproc_per_node N -m tuneforge train RUN.yaml`")
    if mode == "none":
        return World("none")
    owns_group = not dist.is_initialized()
    if owns_group:
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # The timeout bounds how long a rank waits for a peer that hangs (a dead peer fails the collective at once).
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return World(mode, dist.get_rank(), dist.get_world_size(), owns_group)


def stop(world: World) -> None:
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap(world: World, loss_module: torch.nn.Module, device: str) -> torch.nn.Module:
    """The module the loop calls for each micro-batch's summed loss: DDP around it, or FSDP2 per decoder layer."""
    if world.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # broadcast_buffers off: the model's buffers (rotary tables) never change, so there is nothing to sync.
        return DistributedDataParallel(loss_module, device_ids=[torch.cuda.current_device()] if device == "cuda"
                                       else None, broadcast_buffers=False)
    if world.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # One FSDP unit per decoder layer (all-gather one layer's weights at a time), then the root for the rest
        # (embeddings, final norm, head; and the adapters' or virtual tokens' parameters outside the layers).
        for layer in causal_lm_of(loss_module.model).get_decoder().layers:
            fully_shard(layer)
        fully_shard(loss_module)
    return loss_module


def gradient_sync(world: World, wrapped: torch.nn.Module, last_micro_batch: bool):
    """Reduce gradients across ranks only after the step's last micro-batch (accumulate locally before it)."""
    if world.mode == "ddp" and not last_micro_batch:
        return wrapped.no_sync()
    if world.mode == "fsdp":
        wrapped.set_requires_gradient_sync(last_micro_batch)
    return contextlib.nullcontext()


def my_share(world: World, items: list) -> list:
    """This rank's items of a global list (round-robin, so a short list spreads evenly)."""
    return items[world.rank :: world.size]


def shares(world: World, items: list) -> list[list]:
    """Every rank's items of a global list, by rank (what `my_share` gives each)."""
    return [items[rank :: world.size] for rank in range(world.size)]


def share_count(world: World, total: int) -> int:
    """How many passes every rank makes over a global list of `total` items (the largest share)."""
    return -(-total // world.size)


def all_reduce_sum(world: World, values: list[float]) -> list[float]:
    if not world.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_min(world: World, value: int) -> int:
    """The smallest of every rank's `value` (a setting each rank measured for itself, agreed on by all)."""
    if not world.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def total_norm(norm) -> float:
    """clip_grad_norm_ returns a replicated DTensor for FSDP gradients; the float is the same on every rank."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if callable(full) else norm)


# ---------------------------------------------------------------------------------------------------------------------
# State that checkpoints hold, gathered from (or spread back to) the ranks. Every rank must call these together.


def gather_trainable(world: World, model: torch.nn.Module, wrapped: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full trainable weights by parameter name; under FSDP only rank 0 receives them (others get {})."""
    if world.mode != "fsdp":
        return trainable_state(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name: t for fqn, t in full.items() if (name := fqn.removeprefix(WRAPPED_PREFIX)) in trainable}


def gather_full_model(world: World, wrapped: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Under FSDP: the whole model's state dict on rank 0, for saving the final output; None otherwise."""
    if world.mode != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Tied weights (head = embeddings) come back as two gathered copies; transformers recognises ties by shared
    # storage, so keep only the first name of each shared parameter, as the model's own state dict would.
    unique = {name for name, _ in wrapped.named_parameters()}
    aliases = {name for name, _ in wrapped.named_parameters(remove_duplicate=False)} - unique
    return {fqn.removeprefix(WRAPPED_PREFIX): t for fqn, t in full.items() if fqn not in aliases}


@contextlib.contextmanager
def root_unsharded(world: World, wrapped: torch.nn.Module):
    """Under FSDP: the root unit's weights whole on every rank for a while (collective on entry and exit). PEFT saves
    prompt and prefix tuning by running the prompt encoder, which lives in the root unit."""
    if world.mode != "fsdp":
        yield
        return
    wrapped.unshard()
    try:
        yield
    finally:
        wrapped.reshard()


def load_trainable(world: World, model: torch.nn.Module, wrapped: torch.nn.Module,
                   weights: dict[str, torch.Tensor]) -> None:
    """Put full trainable weights back. Under FSDP rank 0's full tensors are spread to every rank's shards (other ranks
    may pass {}, as `gather_trainable` gives them)."""
    if world.mode != "fsdp":
        load_trainable_state(model, weights)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(wrapped, {WRAPPED_PREFIX + n: t for n, t in weights.items()},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False))


def gather_optimizer(world: World, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state in torch's one-process format (parameters numbered in param-group order)."""
    if world.mode != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    by_name = get_optimizer_state_dict(wrapped, optimizer,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.is_main:
        return {}
    names = _names_in_optimizer_order(wrapped, optimizer)
    index = {name: i for i, name in enumerate(names)}
    groups, numbered = [], 0
    for group in optimizer.param_groups:
        settings = {k: v for k, v in group.items() if k != "params"}
        groups.append({**settings, "params": list(range(numbered, numbered + len(group["params"])))})
        numbered += len(group["params"])
    state = {index[name]: values for name, values in by_name["state"].items()}
    return {"state": state, "param_groups": groups}


def load_optimizer(world: World, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    if world.mode != "fsdp":
        optimizer.load_state_dict(state_dict)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _names_in_optimizer_order(wrapped, optimizer)
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state_dict["param_groups"]]
    by_name = {"state": {names[int(i)]: v for i, v in state_dict["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(wrapped, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def _names_in_optimizer_order(wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    name_of = {id(p): name for name, p in wrapped.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def gather_rng(world: World) -> dict[str, torch.Tensor]:
    """Every rank's torch RNG state (dropout draws differ per rank), for rank 0 to save."""
    if not world.distributed:
        return {}
    states: list = [None] * world.size
    mine = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        mine["cuda"] = torch.cuda.get_rng_state()
    dist.all_gather_object(states, mine)
    return {f"rank{r}_{kind}": t for r, s in enumerate(states) for kind, t in s.items()}


def restore_rng(world: World, saved: dict[str, torch.Tensor]) -> None:
    if not world.distributed:
        return
    if f"rank{world.rank}_cpu" in saved:
        torch.set_rng_state(saved[f"rank{world.rank}_cpu"])
    if torch.cuda.is_available() and f"rank{world.rank}_cuda" in saved:
        torch.cuda.set_rng_state(saved[f"rank{world.rank}_cuda"])


def memory_per_rank(world: World, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each rank's resident bytes of parameters, gradients and optimizer state (its shards under FSDP), and its peak
    RSS so far, in MiB: what FSDP divides by the number of processes."""
    import resource

    def local_bytes(tensors) -> int:
        total = 0
        for t in tensors:
            t = t.to_local() if hasattr(t, "to_local") else t
            total += t.numel() * t.element_size()
        return total

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer_tensors = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    mib = 1024 * 1024
    mine = {"params_mib": local_bytes(model.parameters()) / mib,
            "grads_mib": local_bytes(trainable) / mib,  # one gradient per trainable parameter, same shape
            "optimizer_mib": local_bytes(optimizer_tensors) / mib,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if not world.distributed:
        return [mine]
    everyone: list = [None] * world.size
    dist.all_gather_object(everyone, mine)
    return everyone


def _comm_device() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"

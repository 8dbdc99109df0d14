"""Several training sources in one run: which examples an epoch draws from each.

The guide's cure for catastrophic forgetting is to mix general instruction data into the task data. A source either
has a `weight` (its share of every epoch; an epoch has as many examples as all sources together) or `epochs` (passes
over it per epoch, default 1). An epoch's draw is a pure function of (seed, epoch), like its order, so a resumed run
continues the same sample stream. A source drawn more than once per epoch is repeated whole, then topped up with a
fresh sample; one drawn less than once gets a fresh sample every epoch, so over the run all of it is seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tuneforge.config import DataSource


@dataclass(frozen=True)
class SourceShare:
    name: str
    indices: tuple[int, ...]  # its examples' positions in the run's training list
    count: int  # examples drawn from it per epoch


def plan_shares(sources: list[DataSource], origins: list[str]) -> list[SourceShare]:
    """Per-epoch counts for each source, given the origin of every (tokenized) training example."""
    indices = {s.name: [] for s in sources}
    for i, origin in enumerate(origins):
        indices[origin].append(i)
    sizes = [len(indices[s.name]) for s in sources]
    if sources[0].weight is not None:
        counts = _largest_remainder([s.weight for s in sources], sum(sizes))
    else:
        counts = [round((s.epochs or 1.0) * n) for s, n in zip(sources, sizes)]
    return [SourceShare(s.name, tuple(indices[s.name]), count if indices[s.name] else 0)
            for s, count in zip(sources, counts)]


def epoch_pool(shares: list[SourceShare], seed: int, epoch: int) -> list[int]:
    """The training examples (indices, with repeats) of one epoch, unordered: `epoch_steps` shuffles them."""
    rng = np.random.default_rng([seed, epoch, 0x6D1C])  # a stream of its own, apart from the order's
    pool: list[int] = []
    for share in shares:
        n = len(share.indices)
        if not n:
            continue
        whole, rest = divmod(share.count, n)
        pool += list(share.indices) * whole
        pool += [share.indices[i] for i in sorted(rng.choice(n, rest, replace=False))]
    return pool


def describe(shares: list[SourceShare]) -> str:
    total = sum(s.count for s in shares) or 1
    return ", ".join(f"{s.name} {s.count} ({100 * s.count / total:.0f}%, {s.count / max(len(s.indices), 1):.2f}x "
                     f"of its {len(s.indices)})" for s in shares)


def _largest_remainder(weights: list[float], total: int) -> list[int]:
    """Integer counts summing to `total` in proportion to `weights` (Hamilton's method)."""
    exact = [w / sum(weights) * total for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts

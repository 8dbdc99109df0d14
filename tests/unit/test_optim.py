"""Learning-rate schedules and optimizer parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from tuneforge.config import TrainSettings
from tuneforge.train.optim import build_optimizer, lr_at, warmup_steps


def lrs(total, **kw):
    t = TrainSettings(lr=1.0, **kw)
    return [lr_at(s, total, t) for s in range(total)]


def test_warmup_is_linear_then_cosine_decays_to_zero():
    values = lrs(100, warmup_ratio=0.1, scheduler="cosine")
    assert warmup_steps(TrainSettings(warmup_ratio=0.1), 100) == 10
    assert values[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert values[10] == pytest.approx(1.0)
    assert values[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[-1] < 0.001


def test_linear_and_constant():
    linear = lrs(20, warmup_ratio=0.0, scheduler="linear")
    assert linear[0] == pytest.approx(1.0) and linear[10] == pytest.approx(0.5)
    assert lrs(20, warmup_ratio=0.0, scheduler="constant") == [1.0] * 20
    assert lrs(10, warmup_ratio=0.5, scheduler="constant")[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, TrainSettings(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and [p.ndim for p in decay["params"]] == [2]
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])

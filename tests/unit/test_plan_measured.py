"""The memory estimate against measurement: real `tuneforge train` runs of the embedded default model on this CPU
(full / LoRA / QLoRA x two micro-batch shapes), each two optimizer steps in its own process so its peak RSS growth
is its own, with the allocator `tuneforge train` has (tcmalloc, which `make test-tools` installs; see
tuneforge.plan.calibrate). The cases are bench/estimate_accuracy.py's quick set; the bench prints the
table (README, "Plan: recommend and estimate").
"""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

TOLERANCE = 0.20  # the bound: estimated peak within +-20% of the measured peak RSS growth


def _bench():
    spec = importlib.util.spec_from_file_location("estimate_accuracy", ROOT / "bench" / "estimate_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


BENCH = _bench()


@pytest.mark.parametrize("case", [c for c in BENCH.CASES if c.name in BENCH.QUICK], ids=lambda c: c.name)
def test_estimated_peak_within_20_percent_of_measured(case):
    result = BENCH.run_case(case)
    assert result.skipped is None, result.skipped
    ratio = result.estimated / result.measured
    print(f"{case.name}: estimated {result.estimated / 2**20:.0f} MiB, measured {result.measured / 2**20:.0f} MiB, "
          f"ratio {ratio:.3f}")
    assert abs(ratio - 1) <= TOLERANCE, (
        f"{case.name}: estimated {result.estimated / 2**20:.0f} MiB, measured {result.measured / 2**20:.0f} MiB")

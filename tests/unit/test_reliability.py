"""Fault injection on the tiny model: kill -9 anywhere, SIGTERM, NaNs, tampered and unwritable checkpoints.

The reference for every "continues as if nothing happened" check is an uninterrupted run of the same config.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, write_jsonl
from tests.unit import fault_driver
from tuneforge.config import load_config
from tuneforge.errors import ConfigError, OutputWriteError, TrainingStopped, UserError
from tuneforge.train import checkpoint as ckpt
from tuneforge.train import forward
from tuneforge.train.loop import train
from tuneforge.run_dir import read_status


def rows(n=40):
    rng = random.Random(5)
    return [{"instruction": f"Echo {rng.randint(0, 99)} twice.", "output": f"{i} {i} done"} for i in range(n)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows())


def overrides(tiny_model_dir, data_file, out, *extra):
    # 40 rows, batch 4 -> 10 steps per epoch, 2 epochs; LoRA dropout on, so RNG state matters for exact resume.
    return [f"model={tiny_model_dir}", f"data.train={data_file}", f"output_dir={out}", "train.epochs=2",
            "train.batch_size=4", "train.lr=5e-3", "train.save_every=1", "train.keep_last=2", "lora.dropout=0.1",
            "train.warmup_ratio=0.1", *extra]


def step_records(run_dir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "loss" in r}


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter_model.safetensors")


def run_driver(mode: str, n: int, args: list[str]) -> fault_driver.Driven:
    return fault_driver.run(mode, n, args)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, data_file, tmp_path_factory):
    """Uninterrupted runs, keyed by the extra overrides that define them."""
    cache = {}

    def get(*extra):
        if extra not in cache:
            out = tmp_path_factory.mktemp("reference")
            train(load_config(None, overrides(tiny_model_dir, data_file, out, *extra)), show_progress=False)
            cache[extra] = out
        return cache[extra]

    return get


def assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    a, b = step_records(resumed), step_records(uninterrupted)
    assert sorted(a) == sorted(b) == list(range(1, len(b) + 1))
    for step in b:
        assert a[step]["lr"] == b[step]["lr"], step
        assert abs(a[step]["loss"] - b[step]["loss"]) < 1e-6, step
    wa, wb = adapter(resumed), adapter(uninterrupted)
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6


def test_same_seed_twice_is_bitwise_identical(tiny_model_dir, data_file, tmp_path):
    first = train(load_config(None, overrides(tiny_model_dir, data_file, tmp_path / "a")), show_progress=False)
    second = train(load_config(None, overrides(tiny_model_dir, data_file, tmp_path / "b")), show_progress=False)
    la, lb = step_records(first.run_dir), step_records(second.run_dir)
    assert [la[s]["loss"] for s in sorted(la)] == [lb[s]["loss"] for s in sorted(lb)]
    wa, wb = adapter(first.run_dir), adapter(second.run_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize(
    "kill_at_microbatch, extra",
    [
        (random.Random(1).randint(3, 8), ()),  # mid-epoch, at a random step
        (11, ()),  # the first step of epoch 2: the last checkpoint sits exactly on the epoch boundary
        (2 * random.Random(2).randint(3, 8), ("train.batch_size=2", "train.grad_accum=2")),  # 2nd micro-batch of a step
    ],
    ids=["mid-epoch", "epoch-boundary", "grad-accum"],
)
def test_kill_9_then_resume_matches_uninterrupted(tiny_model_dir, data_file, tmp_path, reference,
                                                  kill_at_microbatch, extra):
    out = tmp_path / "run"
    args = overrides(tiny_model_dir, data_file, out, *extra)
    killed = run_driver("microbatch", kill_at_microbatch, args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "adapter_model.safetensors").exists()
    latest = ckpt.latest_checkpoint(out)
    assert latest is not None
    resumed = train(load_config(None, args + ["train.resume=auto"]), show_progress=False)
    assert resumed.steps == 20
    assert_same_run(out, reference(*extra))
    assert len(ckpt.complete_checkpoints(out)) == 2  # keep_last


def test_kill_9_during_checkpoint_writes(tiny_model_dir, data_file, tmp_path, reference):
    rng = random.Random(3)
    # ~8 write events per checkpoint (3 safetensors, 2 JSON, fsync, rename, prune): kill at 4 random ones, spread
    # over the run's 20 checkpoints (each kill and resume costs a process start).
    points = sorted(rng.sample(range(2, 120), 4))
    for n in points:
        out = tmp_path / f"run-{n}"
        args = overrides(tiny_model_dir, data_file, out)
        killed = run_driver("write", n, args)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        for path in ckpt.complete_checkpoints(out):  # every directory under a final name is whole and loads
            ckpt.load_checkpoint(path)
        resumed = train(load_config(None, args + ["train.resume=auto"]), show_progress=False)
        assert resumed.steps == 20
        assert not list((out / "checkpoints").glob(".tmp-*")), n  # partial writes were cleaned up
        assert_same_run(out, reference())


def test_sigterm_checkpoints_and_exits_75_then_resume_matches(tiny_model_dir, data_file, tmp_path, reference):
    out = tmp_path / "run"
    args = overrides(tiny_model_dir, data_file, out, "train.save_every=0")
    proc = fault_driver.start("slow", 150, args)
    target = random.Random(4).randint(2, 12)
    deadline = time.time() + 300
    while time.time() < deadline and len(step_records(out) if (out / "metrics.jsonl").exists() else {}) < target:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    err = proc.stderr
    assert proc.returncode == 75, err
    assert "stopped by signal" in err
    stopped = read_status(out)
    assert stopped["state"] == "stopped" and stopped["pid"] == proc.pid and "stopped by signal" in stopped["error"]
    latest = ckpt.latest_checkpoint(out)
    assert latest is not None and int(latest.name.split("-")[1]) >= target
    train(load_config(None, args + ["train.resume=auto"]), show_progress=False)
    assert read_status(out)["state"] == "finished"
    assert_same_run(out, reference("train.save_every=0"))


def test_second_signal_exits_at_once(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    proc = fault_driver.start("slow", 3000, overrides(tiny_model_dir, data_file, out))
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.05)
    time.sleep(0.5)  # inside the first (3 s long) micro-batch
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    err = proc.stderr
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "exiting now" in err


def test_nan_step_is_skipped_and_the_run_goes_on(tiny_model_dir, data_file, tmp_path, monkeypatch):

    original, calls = forward.batch_loss_sum, {"n": 0}

    def nan_at_step_4(model, batch):
        calls["n"] += 1
        loss = original(model, batch)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(forward, "batch_loss_sum", nan_at_step_4)
    result = train(load_config(None, overrides(tiny_model_dir, data_file, tmp_path / "r")), show_progress=False)
    assert result.steps == 20
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped_step")] == [4]
    assert all(torch.isfinite(t).all() for t in adapter(result.run_dir).values())


def test_nan_every_step_stops_and_writes_no_nan_weights(tiny_model_dir, data_file, tmp_path, monkeypatch):

    original = forward.batch_loss_sum
    monkeypatch.setattr(forward, "batch_loss_sum", lambda m, b: original(m, b) * float("nan"))
    out = tmp_path / "r"
    with pytest.raises(TrainingStopped, match="6 non-finite steps in a row"):
        train(load_config(None, overrides(tiny_model_dir, data_file, out)), show_progress=False)
    assert not (out / "adapter_model.safetensors").exists()
    for path in ckpt.complete_checkpoints(out):
        weights = load_file(path / ckpt.WEIGHTS_FILE)
        assert all(torch.isfinite(t).all() for t in weights.values())


def test_nan_weights_are_never_saved(tiny_model):
    with torch.no_grad():
        next(tiny_model.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingStopped, match="NaN or Inf"):
        ckpt.assert_finite(tiny_model)


def test_loss_spike_stops_the_run(tiny_model_dir, data_file, tmp_path, monkeypatch):

    original, calls = forward.batch_loss_sum, {"n": 0}

    def spike_after_8(model, batch):
        calls["n"] += 1
        return original(model, batch) * (50.0 if calls["n"] > 8 else 1.0)

    monkeypatch.setattr(forward, "batch_loss_sum", spike_after_8)
    cfg = load_config(None, overrides(tiny_model_dir, data_file, tmp_path / "r", "train.loss_spike_factor=3",
                                      "train.loss_spike_patience=4"))
    with pytest.raises(TrainingStopped, match="stayed above 3.0x its running mean"):
        train(cfg, show_progress=False)


def test_pickle_in_place_of_weights_is_refused_and_never_runs(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "r"
    args = overrides(tiny_model_dir, data_file, out, "train.max_steps=3")
    train(load_config(None, args), show_progress=False)
    marker = tmp_path / "pwned"
    payload = (
        "import pickle, os\n"
        "class Evil:\n"
        f"    def __reduce__(self): return (os.system, ('touch {marker}',))\n"
        f"pickle.dump(Evil(), open({str(ckpt.latest_checkpoint(out) / ckpt.WEIGHTS_FILE)!r}, 'wb'))\n"
    )
    subprocess.run([sys.executable, "-c", payload], check=True)
    with pytest.raises(UserError, match="not a valid safetensors file"):
        train(load_config(None, args + ["train.resume=auto", "train.max_steps=5"]), show_progress=False)
    assert not marker.exists()


def test_no_unsafe_torch_load_in_the_package():
    for path in (ROOT / "tuneforge").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}:{number}"


def _small_tmpfs(path: Path, size_kb: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


def test_full_disk_gives_clear_error_and_keeps_last_checkpoint(tiny_model_dir, data_file, tmp_path, monkeypatch):
    mount = tmp_path / "tiny-fs"
    if _small_tmpfs(mount, 600):
        out = mount / "run"  # a real full filesystem: checkpoints pile up (keep_last=100) until it is full
        cleanup = lambda: subprocess.run(["umount", "--lazy", str(mount)], capture_output=True)  # noqa: E731
    else:  # no permission to mount here: inject the same error the kernel would give
        import errno

        out, cleanup = tmp_path / "run", (lambda: None)
        original, calls = ckpt.save_file, {"n": 0}

        def enospc_from_third_checkpoint(tensors, path, *a, **k):
            calls["n"] += 1
            if calls["n"] > 8:
                raise OSError(errno.ENOSPC, "No space left on device")
            return original(tensors, path, *a, **k)

        monkeypatch.setattr(ckpt, "save_file", enospc_from_third_checkpoint)
    try:
        cfg = load_config(None, overrides(tiny_model_dir, data_file, out, "train.keep_last=100"))
        with pytest.raises(OutputWriteError) as info:
            train(cfg, show_progress=False)
        assert "No space left on device" in str(info.value) and "\n" not in str(info.value)
        latest = ckpt.latest_checkpoint(out)
        assert latest is not None and "is intact" in str(info.value)
        loaded = ckpt.load_checkpoint(latest)
        assert all(torch.isfinite(t).all() for t in loaded["weights"].values())
        assert not list((out / "checkpoints").glob(".tmp-*"))
    finally:
        cleanup()


def test_resume_refuses_a_different_method_and_fresh_run_refuses_old_checkpoints(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "r"
    args = overrides(tiny_model_dir, data_file, out, "train.max_steps=2")
    train(load_config(None, args), show_progress=False)
    with pytest.raises(ConfigError, match=r"resume: method is 'full' but checkpoint step-00000002 was trained with "
                                          r"'lora'"):
        train(load_config(None, args + ["train.resume=auto", "method=full"]), show_progress=False)
    with pytest.raises(ConfigError, match="already holds checkpoints of an earlier run"):
        train(load_config(None, args), show_progress=False)


def test_resume_never_wraps_a_second_adapter(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "r"
    args = overrides(tiny_model_dir, data_file, out, "train.max_steps=2")
    train(load_config(None, args), show_progress=False)
    result = train(load_config(None, args + ["train.resume=auto", "train.max_steps=4"]), show_progress=False)
    names = [n for n, _ in result.model.named_parameters() if "lora_A" in n]
    assert names and all(n.count("lora_A") == 1 for n in names)
    assert all("base_model.model.base_model" not in n for n in names)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16

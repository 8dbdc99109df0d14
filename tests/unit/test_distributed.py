"""Two processes (torchrun, gloo on CPU) give the results of one process with the same global batch.

The 1-process reference accumulates 4 micro-batches per step; the 2-process runs accumulate 2 per process. 38 rows in
micro-batches of 3 make 13 per epoch, so each epoch's last step has a single micro-batch and one rank has none: the
zero-weighted filler pass is exercised too. LoRA dropout is 0 in the comparisons (each rank draws its own masks).

AdamW's epsilon is 1e-6 here, not the default 1e-8: Adam scales every gradient element to about lr, however small, so
an element whose gradient is a near-cancelling sum (1e-8 and below) turns float summation-order noise into weight
differences of 1e-5 and more, a different element at each learning rate (measured: 0.8e-5 to 1.6e-5 at lr 5e-4 to
2e-3 with a step laid out in one packed row or four). With 1e-6 those elements get damped updates and every
comparison stays under 1e-6, a tenth of the bound, while the weights still move by about lr per step.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import ROOT, run_cli, write_jsonl
from tuneforge.config import load_config
from tuneforge.train.loop import train

pytestmark = pytest.mark.distributed
TOLERANCE = 1e-5  # the bar for "the same result": summation order across ranks differs, nothing else


def rows(n=38):
    rng = random.Random(11)
    return [{"instruction": f"Repeat {rng.randint(0, 99)} then add one.", "output": f"{i} {i + 1} ok"}
            for i in range(n)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("dist-data") / "train.jsonl", rows())


def write_config(path: Path, tiny_model_dir, data_file, out: Path, method: str, **train) -> Path:
    config = {"model": str(tiny_model_dir), "method": method, "output_dir": str(out), "lora": {"dropout": 0.0},
              "data": {"train": str(data_file)},
              "train": {"epochs": 2, "batch_size": 3, "grad_accum": 2, "lr": 2e-3, "adam_eps": 1e-6, "save_every": 0,
                        **train}}
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def torchrun(*args: str, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **popen)


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tuneforge", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def step_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (run_dir / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(run_dir / name)


def assert_same_run(reference: Path, other: Path, tolerance: float = TOLERANCE, steps: int = 8) -> None:
    ref_losses, losses = step_losses(reference), step_losses(other)
    assert len(ref_losses) == len(losses) == steps
    assert max(abs(a - b) for a, b in zip(ref_losses, losses)) < tolerance, (ref_losses, losses)
    ref_w, w = weights(reference), weights(other)
    assert ref_w.keys() == w.keys()
    worst = max((ref_w[k] - w[k]).abs().max().item() for k in ref_w)
    print(f"{other.name}: max |weight difference| vs reference = {worst:.2e}")
    assert worst < tolerance


def assert_trained(run_dir: Path, tiny_model_dir: Path) -> None:
    """The compared runs really learned: weights moved far beyond the tolerance (LoRA B starts at zero)."""
    final = weights(run_dir)
    start = load_file(tiny_model_dir / "model.safetensors")
    moved = max((t - start.get(k, torch.zeros_like(t))).abs().max().item() for k, t in final.items()
                if "lora_A" not in k)
    assert moved > 100 * TOLERANCE


@pytest.fixture(scope="module")
def one_process_lora(tmp_path_factory, tiny_model_dir, data_file):
    tmp = tmp_path_factory.mktemp("one-lora")
    cfg_file = write_config(tmp / "run.yaml", tiny_model_dir, data_file, tmp / "run", "lora")
    train(load_config(cfg_file, ["train.grad_accum=4"]), show_progress=False)
    return tmp / "run"


def test_ddp_two_processes_equal_one(tmp_path, tiny_model_dir, data_file, one_process_lora):
    # Through the `--nproc` shortcut (which launches torchrun) with the default train.distributed=auto -> ddp.
    cfg_file = write_config(tmp_path / "run.yaml", tiny_model_dir, data_file, tmp_path / "ddp", "lora")
    done = cli("train", str(cfg_file), "--nproc", "2", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: 8 steps") == 1  # one summary, from rank 0
    start = json.loads((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["processes"] == 2 and start["distributed"] == "ddp"
    assert_same_run(one_process_lora, tmp_path / "ddp")
    assert_trained(one_process_lora, tiny_model_dir)


@pytest.fixture(scope="module")
def fsdp_lora(driven):
    """The ddp test's run under FSDP, trained in `driven`'s launch (the CLI under torchrun is the --nproc tests')."""
    return driven["out"] / "fsdp-lora"


def test_fsdp_two_processes_equal_one(fsdp_lora, one_process_lora):
    assert_same_run(one_process_lora, fsdp_lora)


def test_fsdp_full_fine_tuning_equals_one_process_and_halves_state(tmp_path, driven):
    cfg_file, two = driven["full"], driven["out"] / "full-fsdp"
    train(load_config(cfg_file, ["train.grad_accum=4", f"output_dir={tmp_path / 'one'}"]), show_progress=False)
    assert_same_run(tmp_path / "one", two)
    assert_trained(tmp_path / "one", driven["model"])
    # Each process holds half of the parameters, gradients and optimizer state (the per-process memory FSDP saves).
    def memory(run):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return next(r["memory_per_process"] for r in records if "memory_per_process" in r)
    (one,), two = memory(tmp_path / "one"), memory(two)
    assert len(two) == 2
    for part in ("params_mib", "grads_mib", "optimizer_mib"):
        for rank in two:
            assert 0.45 < rank[part] / one[part] < 0.55, (part, rank[part], one[part])


def test_killed_two_process_run_resumes_exactly(tmp_path, tiny_model_dir, data_file, fsdp_lora):
    cfg_file = write_config(tmp_path / "run.yaml", tiny_model_dir, data_file, tmp_path / "run", "lora",
                            distributed="fsdp", save_every=2)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    # Slowed down (300 ms per micro-batch) so the kill lands mid-run, after the step-4 checkpoint.
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "tests.unit.fault_driver", "slow", "300", "--config", str(cfg_file)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000004" / "trainer_state.json"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers at once, like a lost machine
    proc.wait()
    assert checkpoint.exists()
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()  # it really died before the end
    done = cli("train", str(cfg_file), "--resume", "--nproc", "2", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(fsdp_lora, tmp_path / "run", tolerance=1e-6)


def test_a_failing_rank_stops_the_whole_run(tmp_path, tiny_model_dir, data_file):
    cfg_file = write_config(tmp_path / "run.yaml", tiny_model_dir, data_file, tmp_path / "run", "lora",
                            distributed="ddp")
    started = time.monotonic()
    done = torchrun("-m", "tests.unit.fault_driver", "fail_rank1", "3", "--config", str(cfg_file), timeout=180)
    assert done.returncode != 0
    assert "injected failure on rank 1" in done.stderr
    assert time.monotonic() - started < 150  # not a hang until the 30-minute collective timeout
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_distributed_outside_torchrun_and_fsdp_qlora_are_refused(tmp_path, tiny_model_dir, data_file):
    cfg_file = write_config(tmp_path / "run.yaml", tiny_model_dir, data_file, tmp_path / "run", "lora")
    done = run_cli("train", str(cfg_file), "train.distributed=fsdp", "--quiet")
    assert done.returncode == 2
    assert "outside torchrun" in done.stderr and "--nproc" in done.stderr
    done = run_cli("train", str(cfg_file), "method=qlora", "train.distributed=fsdp", "--nproc", "2")
    assert done.returncode == 2 and "use ddp" in done.stderr
    assert not (tmp_path / "run").exists()


def test_resume_with_another_process_count_is_refused(tmp_path, tiny_model_dir, data_file, fsdp_lora):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(fsdp_lora, run)
    cfg_file = write_config(tmp_path / "run.yaml", tiny_model_dir, data_file, run, "lora", distributed="fsdp")
    done = run_cli("train", str(cfg_file), "train.distributed=none", "--resume", "--quiet")
    assert done.returncode == 2
    assert "trained by 2 process(es), this run has 1" in done.stderr


OTHER_METHODS = ["dora:fsdp", "adapter:fsdp", "prefix:fsdp", "prompt:fsdp", "qlora:ddp", "full:ddp"]
EARLY_VAL_ANSWER = "zebra violet harbour"


@pytest.fixture(scope="module")
def driven(tmp_path_factory, tiny_model_dir, data_file):
    """The two-process side of the method, LoRA-FSDP, full-FSDP and early-stopping comparisons: one torchrun launch
    for all of them (tests.unit.dist_methods_driver), since each launch pays two interpreters' torch start-up."""
    tmp = tmp_path_factory.mktemp("driven")
    methods = write_config(tmp / "methods.yaml", tiny_model_dir, data_file, tmp / "unused", "lora", max_steps=3,
                           lr=1e-3)
    full = write_config(tmp / "full.yaml", tiny_model_dir, data_file, tmp / "unused", "full")
    lora = write_config(tmp / "lora.yaml", tiny_model_dir, data_file, tmp / "unused", "lora")
    # Early stopping must trigger, and the best weights (gathered on rank 0, spread back to the shards) must be
    # what is saved. It is made to trigger by the data, not by an overshooting learning rate: the validation
    # answers are words the training answers never use, so every step that teaches the training answers takes
    # probability from them and validation loss rises from the first evaluation on. At the suite's usual lr (2e-3)
    # the two trajectories stay within float reduction order of each other; the earlier lr of 8e-2 over 4 epochs
    # amplified that order into 1e-4 weight differences on some machines.
    val_file = write_jsonl(tmp / "val.jsonl", [{**row, "output": EARLY_VAL_ANSWER} for row in rows()[:12]])
    early = write_config(tmp / "early.yaml", tiny_model_dir, data_file, tmp / "unused", "lora", epochs=4,
                         grad_accum=1, eval_every=1, early_stopping_patience=2)
    config = yaml.safe_load(early.read_text())
    config["data"]["val"] = str(val_file)
    early.write_text(yaml.safe_dump(config))
    done = torchrun("-m", "tests.unit.dist_methods_driver", str(methods), str(tmp / "two"), *OTHER_METHODS,
                    f"full:fsdp@{full}", f"lora:fsdp@{early}", f"fsdp-lora=lora:fsdp@{lora}")
    assert done.returncode == 0, done.stderr[-3000:]
    return {"out": tmp / "two", "methods": methods, "full": full, "early": early, "model": tiny_model_dir}


def test_other_methods_under_ddp_and_fsdp_equal_one_process(tmp_path, driven):
    for run in OTHER_METHODS:
        method, mode = run.split(":")
        one = tmp_path / "one" / method
        train(load_config(driven["methods"], [f"method={method}", "train.grad_accum=4", f"output_dir={one}"]),
              show_progress=False)
        two = driven["out"] / f"{method}-{mode}"
        ref, other = step_losses(one), step_losses(two)
        assert len(ref) == len(other) == 3 and max(abs(a - b) for a, b in zip(ref, other)) < TOLERANCE, (run, ref, other)
        ref_w, w = weights(one), weights(two)
        assert ref_w.keys() == w.keys(), run
        assert max((ref_w[k] - w[k]).abs().max().item() for k in ref_w) < TOLERANCE, run


def test_fsdp_early_stopping_keeps_the_same_best_weights(tmp_path, driven):
    one = train(load_config(driven["early"], ["train.grad_accum=2", f"output_dir={tmp_path / 'one'}"]),
                show_progress=False)
    assert one.stopped_early and one.steps < 4 * 7  # it stopped before the end of 4 epochs of 7 steps
    two = driven["out"] / "lora-fsdp"
    two_end = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()][-1]
    assert two_end["stopped_early"] and two_end["step"] == one.steps
    assert abs(two_end["final_val_loss"] - one.val_loss) < TOLERANCE
    ref_w, w = weights(tmp_path / "one"), weights(two)
    worst = max((ref_w[k] - w[k]).abs().max().item() for k in ref_w)
    print(f"early-stopped FSDP vs one process: max |weight difference| = {worst:.2e}")
    assert worst < TOLERANCE
    assert_trained(tmp_path / "one", driven["model"])  # the kept best weights are trained ones, not the start

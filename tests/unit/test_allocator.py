"""`tuneforge train` runs with tcmalloc preloaded when it is installed (tuneforge/allocator.py), says which allocator
it has, and leaves the choice to the user when asked to or when something else is preloaded."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT, write_jsonl
from tuneforge import allocator


def test_train_re_executes_itself_with_tcmalloc(tiny_model_dir, tmp_path):
    library = allocator.find_tcmalloc()
    assert library is not None, "tcmalloc is missing: run `make test-tools` (Debian's libtcmalloc-minimal4)"
    data = write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"Say {i}.", "output": str(i)} for i in range(4)])
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {{train: {data}}}\noutput_dir: {tmp_path / 'run'}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.MARK, "TUNEFORGE_ALLOCATOR")}
    done = subprocess.run([sys.executable, "-m", "tuneforge", "train", str(config), "train.max_steps=1", "--quiet"],
                          cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"allocator: tcmalloc ({library}" in done.stderr
    assert "done: 1 steps" in done.stdout


def test_the_allocator_line_and_what_turns_it_off(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator.os, "execve", lambda *args: calls.append(args))
    for name in ("LD_PRELOAD", allocator.MARK, "TUNEFORGE_ALLOCATOR"):
        monkeypatch.delenv(name, raising=False)
    assert allocator.allocator_line().startswith("allocator: glibc malloc (installing tcmalloc")
    monkeypatch.setenv("TUNEFORGE_ALLOCATOR", "system")
    allocator.use_tcmalloc(["train", "run.yaml"])
    monkeypatch.delenv("TUNEFORGE_ALLOCATOR")
    monkeypatch.setenv("LD_PRELOAD", "/opt/libjemalloc.so")
    allocator.use_tcmalloc(["train", "run.yaml"])
    assert allocator.allocator_line() == "allocator: LD_PRELOAD=/opt/libjemalloc.so"
    assert calls == []  # asked for the system allocator, or another one preloaded: never re-executed
    monkeypatch.delenv("LD_PRELOAD")
    allocator.use_tcmalloc(["train", "run.yaml"])
    (executable, argv, env), = calls
    assert argv[1:] == ["-m", "tuneforge", "train", "run.yaml"] and env["LD_PRELOAD"] == env[allocator.MARK]


def test_memory_measurements_run_with_the_allocator_train_runs_with(monkeypatch, tmp_path):
    """`estimate --calibrate` and the measured-memory tests (tuneforge.plan.calibrate.measure_run) measure a child
    process's heap: it must be the heap `tuneforge train` has (tcmalloc where installed), not the caller's."""
    from tuneforge.config import load_config
    from tuneforge.errors import UserError
    from tuneforge.plan import calibrate

    for name in ("LD_PRELOAD", allocator.MARK, "TUNEFORGE_ALLOCATOR"):
        monkeypatch.delenv(name, raising=False)
    seen = []

    def child(command, env, **kwargs):
        seen.append(env)
        return subprocess.CompletedProcess(command, 1, "", "stopped by the test\n")

    monkeypatch.setattr(calibrate.subprocess, "run", child)
    data = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "Say 1.", "output": "1"}])
    cfg = load_config(None, [f"data.train={data}", f"output_dir={tmp_path / 'run'}"])
    for system in (False, True):
        if system:
            monkeypatch.setenv("TUNEFORGE_ALLOCATOR", "system")
        try:
            calibrate.measure_run(cfg, steps=1)
        except UserError as exc:
            assert "stopped by the test" in str(exc)
    preloaded, chosen = seen
    assert preloaded["LD_PRELOAD"] == str(allocator.find_tcmalloc()) == preloaded[allocator.MARK]
    assert "LD_PRELOAD" not in chosen and chosen["TUNEFORGE_ALLOCATOR"] == "system"

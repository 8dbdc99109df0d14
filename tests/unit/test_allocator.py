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

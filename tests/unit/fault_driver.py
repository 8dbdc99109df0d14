"""Fault injection for the reliability tests: run `train` in this process and SIGKILL it at a chosen point.

usage: python -m tests.unit.fault_driver MODE N [--config RUN.yaml] [key=value ...]
   or: fault_driver.run / fault_driver.start from a test: the same, in a process forked from a server that has
       imported torch, transformers, PEFT and tuneforge once per session (a fresh interpreter spends ~6 s importing
       them; the process is still a process of its own, killed, signalled and exiting as one)
  MODE=microbatch  die when the N-th loss forward starts: a training micro-batch (mid-step when grad_accum > 1),
                   or a validation batch
  MODE=write       die at the N-th checkpoint write event; a safetensors file being written is left torn
  MODE=slow        every micro-batch sleeps N ms (to give signal tests a wide window); no kill
  MODE=fail_rank1  under torchrun: rank 1 raises an error at its N-th micro-batch (a crashed peer)
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tuneforge.cli import quiet_libraries
from tuneforge.config import load_config
from tuneforge.errors import UserError
from tuneforge.train import checkpoint, forward, loop, preference
from tuneforge.tune.trial_process import ForkedProcess, redirect_output


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    mode, n, overrides = argv[0], int(argv[1]), argv[2:]
    config_file = None
    if overrides[:1] == ["--config"]:
        config_file, overrides = overrides[1], overrides[2:]
    calls = {"n": 0}
    if mode in ("microbatch", "slow", "fail_rank1"):
        # Every micro-batch goes through the loss module's forward: the supervised one or a preference objective's.
        def counting(original):
            def counted(*args, **kwargs):
                calls["n"] += 1
                if mode == "microbatch" and calls["n"] == n:
                    die()
                if mode == "fail_rank1" and calls["n"] == n and os.environ.get("RANK") == "1":
                    raise RuntimeError("injected failure on rank 1")
                if mode == "slow":
                    time.sleep(n / 1000)
                return original(*args, **kwargs)
            return counted

        forward.AnswerTokenLossSum.forward = counting(forward.AnswerTokenLossSum.forward)
        preference.PreferenceLossSum.forward = counting(preference.PreferenceLossSum.forward)
    elif mode == "write":
        def hook(name, original, tear=False):
            def wrapped(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == n:
                    if tear:  # write the file, then cut it in half: a torn write
                        original(*args, **kwargs)
                        path = args[1]
                        os.truncate(path, os.path.getsize(path) // 2)
                    die()
                return original(*args, **kwargs)
            return wrapped

        checkpoint.save_file = hook("save_file", checkpoint.save_file, tear=True)
        checkpoint._write_text = hook("_write_text", checkpoint._write_text)
        checkpoint._fsync_tree = hook("_fsync_tree", checkpoint._fsync_tree)
        checkpoint._remove_dir = hook("_remove_dir", checkpoint._remove_dir)
        real_replace = os.replace
        checkpoint.os = type(sys)("os_proxy")
        checkpoint.os.__dict__.update({k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
        checkpoint.os.replace = hook("replace", real_replace)
    quiet_libraries()
    try:
        loop.train(load_config(config_file, overrides), show_progress=False)
    except UserError as exc:
        print(f"tuneforge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# From a test: forked from a server that imported the training stack once (multiprocessing's forkserver, which
# imports nothing else and starts no thread, so forking it is safe; pytest's own process has run torch and is not).

ROOT = Path(__file__).resolve().parents[2]
PRELOAD = ["tests.unit.fault_driver", "peft", "safetensors.torch", "transformers.models.llama.modeling_llama"]


@functools.cache
def _server():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


@functools.cache
def _log_dir() -> str:
    path = tempfile.mkdtemp(prefix="fault-driver-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


class Driven(ForkedProcess):
    """A driver process (tuneforge.tune.trial_process.ForkedProcess: pid, send_signal, wait -> exit code, -9 when
    killed, returncode) and `stderr`, its stdout and stderr together."""

    def __init__(self, argv: list[str], env: dict[str, str] | None):
        handle, name = tempfile.mkstemp(suffix=".log", dir=_log_dir())
        os.close(handle)
        self.log = Path(name)
        super().__init__(_server(), _child, (argv, str(self.log), env or {}))

    def wait(self, timeout: float | None = None) -> int:
        try:
            return super().wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            super().wait()
            raise

    @property
    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


def start(mode: str, n: int, args: list[str], env: dict[str, str] | None = None) -> Driven:
    return Driven([mode, str(n), *args], env)


def run(mode: str, n: int, args: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> Driven:
    driven = start(mode, n, args, env)
    driven.wait(timeout)
    return driven


def _child(argv: list[str], log: str, env: dict[str, str]) -> None:
    os.chdir(ROOT)
    os.environ.update(env)
    redirect_output(log, append=False)
    raise SystemExit(main(argv))


if __name__ == "__main__":
    sys.exit(main())

"""A trial's `tuneforge train` process, forked from a server that imported the training stack once per study.

A fresh interpreter spends 6-7 s importing torch, transformers and PEFT before a trial's first step, as long as a
short trial trains. The study starts multiprocessing's forkserver once, with those modules imported and with the
allocator `tuneforge train` re-executes itself with (tcmalloc, tuneforge.allocator), and forks each trial from it:
the trial is still a process of its own (a crash, an out-of-memory, SIGTERM and its exit code are its own) that
runs `tuneforge train RUN.yaml --quiet` with its output in the trial's log. The server imports and starts nothing
else (no thread, no torch op), so forking it is safe; it holds the imported modules' memory (~0.5 GB) while the
study runs and exits with the study, and then the kernel's parent-death signal SIGTERMs a running trial (which
checkpoints: `tune --resume` goes on from there). Where the forkserver is not available, the trial is a fresh
`python -m tuneforge train` process.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

from tuneforge.allocator import train_environment

PRELOAD = ["tuneforge.cli", "tuneforge.train.loop", "peft", "safetensors.torch"]


class ForkedProcess:
    """A multiprocessing process with the part of subprocess.Popen the study uses (pid, poll, returncode,
    send_signal, kill, wait): exit codes as Popen gives them, -N when killed by signal N."""

    def __init__(self, context, target, args: tuple):
        self._process = context.Process(target=target, args=args)
        self._process.start()
        self.pid = self._process.pid

    def poll(self) -> int | None:
        return self._process.exitcode

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self._process.kill()

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(f"process {self.pid}", timeout)
        return self._process.exitcode


def redirect_output(log: str, append: bool) -> None:
    """In a forked child: `log` as its stdout and stderr, stdout line-buffered as a terminal's would be."""
    output = os.open(log, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC), 0o644)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(output)
    sys.stdout.reconfigure(line_buffering=True)


def start_trial(run_file: Path, log: Path):
    """The trial's process, training `run_file` with its output appended to `log`."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        try:
            return ForkedProcess(_server(), _trial, (str(run_file.resolve()), str(log.resolve())))
        except RuntimeError:  # multiprocessing refuses a main script that starts processes outside its
            pass              # `if __name__ == "__main__":` (tuneforge.tune called from a user's script)
    with log.open("a", encoding="utf-8") as out:  # (the child keeps its own copy of the descriptor)
        return subprocess.Popen([sys.executable, "-m", "tuneforge", "train", str(run_file), "--quiet"],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@functools.cache
def _server():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    # LD_PRELOAD only takes effect when a program starts: the server starts with the allocator's environment, and
    # every trial forked from it has that heap. (This process is single-threaded and starts nothing meanwhile.)
    with _environment(train_environment()):
        from multiprocessing import forkserver

        forkserver.ensure_running()
    return context


@contextlib.contextmanager
def _environment(env: dict[str, str] | None):
    if env is None:
        yield
        return
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _trial(run_file: str, log: str) -> None:
    """In the forked trial: SIGTERM when the server dies (it exits when the study dies, however the study dies), the
    log as stdout and stderr, then the command."""
    import ctypes
    from multiprocessing import forkserver

    # multiprocessing hands every forked process the server's keep-alive pipe (so that it may fork processes of its
    # own) and the server lives while any holder does: the trial, which forks nothing, lets go of it, so the server
    # exits when the study does and the kernel's parent-death signal reaches the trial.
    alive = getattr(forkserver._forkserver, "_forkserver_alive_fd", None)
    if alive is not None:
        os.close(alive)
        forkserver._forkserver._forkserver_alive_fd = None
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: a killed study may leave its trial running to the end
    redirect_output(log, append=True)
    from tuneforge.cli import main

    raise SystemExit(main(["train", run_file, "--quiet"]))

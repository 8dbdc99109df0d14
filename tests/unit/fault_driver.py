"""Fault injection for the reliability tests: run `train` in this process and SIGKILL it at a chosen point.

usage: python -m tests.unit.fault_driver MODE N [--config RUN.yaml] [key=value ...]
  MODE=microbatch  die when the N-th loss forward starts: a training micro-batch (mid-step when grad_accum > 1),
                   or a validation batch
  MODE=write       die at the N-th checkpoint write event; a safetensors file being written is left torn
  MODE=slow        every micro-batch sleeps N ms (to give signal tests a wide window); no kill
  MODE=fail_rank1  under torchrun: rank 1 raises an error at its N-th micro-batch (a crashed peer)
"""

from __future__ import annotations

import os
import signal
import sys
import time

from tuneforge.cli import quiet_libraries
from tuneforge.config import load_config
from tuneforge.errors import UserError
from tuneforge.train import checkpoint, forward, loop, preference


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    mode, n, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
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


if __name__ == "__main__":
    sys.exit(main())

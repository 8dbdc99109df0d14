"""Preemption: the first SIGTERM/SIGINT asks the loop to stop after the current step (it then checkpoints and exits
with a distinct code); a second one exits at once."""

from __future__ import annotations

import os
import signal
import sys
import threading


class StopRequests:
    """Context manager that turns SIGTERM/SIGINT into a flag the loop polls between steps."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # Python only delivers signals to the main thread
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            print(f"\ntuneforge: second {signal.Signals(signum).name}: exiting now without a checkpoint", file=sys.stderr)
            os._exit(128 + signum)
        self.received = signum
        print(f"\ntuneforge: {signal.Signals(signum).name} received: finishing this step, then saving a checkpoint "
              "(send it again to exit at once)", file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.received is not None

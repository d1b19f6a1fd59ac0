"""Stopping cleanly on SIGTERM (what a cluster sends before preempting a job) and Ctrl-C.

During training, the first signal only asks the loop to stop: it finishes the optimizer step it
is in, saves a checkpoint and exits with the conventional status (128 + the signal's number). A
second signal stops at once, as the signal would without preftune. A launcher that relays the
terminal's Ctrl-C to its workers (which also get it from the terminal) makes one interruption
arrive twice within milliseconds: a repeat within ``REPEAT_WINDOW`` seconds counts as the same.
Outside training, both signals stop the command at once with one line.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_WINDOW = 0.5


class Stopped(BaseException):
    """A signal stopped the command at once. A ``BaseException``, like ``KeyboardInterrupt``, so
    that no ``except Exception`` swallows it; cleanup in ``finally`` blocks still runs."""

    def __init__(self, signum: int, repeated: bool = False) -> None:
        self.signum = signum
        name = signal.Signals(signum).name
        what = f"a second {name} during training" if repeated else name
        super().__init__(f"stopped at once by {what}; the checkpoints saved so far are intact")

    @property
    def status(self) -> int:
        return 128 + self.signum


class Interrupted(Exception):
    """Training stopped at a signal after saving a checkpoint at ``step``."""

    def __init__(self, step: int, steps: int, signum: int) -> None:
        self.step, self.steps, self.signum = step, steps, signum
        super().__init__(
            f"interrupted ({signal.Signals(signum).name}) at step {step} of {steps}; checkpoint "
            "saved; run the same command to resume"
        )

    @property
    def status(self) -> int:
        return 128 + self.signum


def stop_at_once(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signum)


@contextmanager
def signals_stop_at_once() -> Iterator[None]:
    """Within the context, SIGINT and SIGTERM raise :class:`Stopped` (the main thread only:
    Python delivers signals there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, stop_at_once) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class StopRequest:
    """Within :meth:`watch`, the first SIGINT or SIGTERM is only recorded in ``signum``."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first = 0.0

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _record(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first = signum, now
        elif now - self._first > REPEAT_WINDOW:
            raise Stopped(signum, repeated=True)

    @contextmanager
    def watch(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {signum: signal.signal(signum, self._record) for signum in SIGNALS}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

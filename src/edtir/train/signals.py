"""SIGINT and SIGTERM during training: the first one asks the loop to stop after the current step, save a
checkpoint and exit (130 / 143, as a shell reports those signals); a second one acts as usual (stops at once;
checkpoints are written atomically, so the newest complete one is still there)."""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Records the first SIGINT/SIGTERM in ``signum`` instead of dying of it, from :meth:`arm` (when the steps
    begin: before that, a Ctrl-C stops the set-up at once) until the context exits. Only the main thread can
    install signal handlers; elsewhere it records nothing."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        return self

    def arm(self) -> None:
        if threading.current_thread() is threading.main_thread() and not self._previous:
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self.disarm()  # a second signal: the usual behaviour (KeyboardInterrupt, termination)

    def disarm(self) -> None:
        for s, old in self._previous.items():
            signal.signal(s, old)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self.disarm()


def ignore_in_worker() -> None:
    """For data-loading worker processes: a Ctrl-C or SIGTERM sent to the whole process group is the main
    process's to handle (it stops the workers after saving)."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)

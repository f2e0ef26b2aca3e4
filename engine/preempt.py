"""Preemption: SIGTERM (what cluster schedulers send before they kill a job) and SIGUSR1 (what SLURM can send
ahead of time, `--signal=USR1@120`) let the current step finish, write a checkpoint and exit with
EXIT_PREEMPTED, so `--resume` continues where the run stopped. With several processes they agree after every
step (Backend.any_rank), so all of them stop at the same step, whichever received the signal."""
from __future__ import annotations

import signal
import threading

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped cleanly, run again with --resume
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self):
        self.signal: str | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self.previous = {s: signal.signal(s, self._on_signal) for s in SIGNALS}

    def release(self):
        """Back to the handlers before: outside the loop (final save, samples) a signal stops the run at once."""
        for s, h in self.previous.items():
            signal.signal(s, h)
        self.previous = {}

    def _on_signal(self, signum, frame):
        self.signal = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal is not None

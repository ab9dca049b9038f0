"""SIGTERM and SIGUSR1 end a run cleanly: a checkpoint at the next step boundary, then exit with
``REQUEUE_EXIT`` so the launcher can requeue it (``launch/slurm/pretrain.sbatch``).

SLURM sends SIGTERM at the time limit (and with ``#SBATCH --signal=TERM@<s>`` that many seconds
ahead), torchrun forwards a SIGTERM it receives to its workers, and SIGUSR1 is the usual
"checkpoint now" signal. Without a handler everything since the last checkpoint was lost. The
handler only records the signal; the training loop reads it in the step's one all-reduce (the
non-finite guard's), so every rank stops after the same step even if only one was signalled.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

REQUEUE_EXIT = 75  # EX_TEMPFAIL: "try again later"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(RuntimeError):
    """A signal asked the run to stop; its checkpoint is saved."""

    def __init__(self, message: str, signal_name: str, checkpoint: str | None) -> None:
        super().__init__(message)
        self.signal_name, self.checkpoint = signal_name, checkpoint


class PreemptionHandler:
    """Records SIGTERM/SIGUSR1 while installed (main thread only, else a no-op: signal handlers
    can only be set there)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)

    def restore(self) -> None:
        """Put the handlers back that were there before ``install``."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

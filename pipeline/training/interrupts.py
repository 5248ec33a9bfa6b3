"""Stopping a training run cleanly: SIGINT (Ctrl-C) or SIGTERM (a scheduler, `kill`, DVC passing a signal on)
ends the step in progress, the loop saves its checkpoint, and the process exits with ``128 + signum`` (130 or
143). The same command then resumes from that step, and ends with the bytes an uninterrupted run gives.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Any, Iterator, Optional


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during training: raised once the checkpoint of the step in progress is saved. The
    process exits with ``128 + signum`` (130 for Ctrl-C, 143 for SIGTERM); the same command resumes."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        super().__init__(f"{signal.Signals(signum).name} at step {step}: checkpoint saved in {checkpoint}; "
                         "rerun the same command to resume")


class StopRequests:
    """SIGINT / SIGTERM noted instead of acted on, so the loop can finish its step and save it first. A second
    SIGINT while the first is pending stops at once (KeyboardInterrupt). Only the main thread can install
    handlers; elsewhere (a test's worker thread) signals keep their usual effect."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: Optional[int] = None

    def _note(self, signum: int, frame: Any) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopRequests"]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._note) for s in self.SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

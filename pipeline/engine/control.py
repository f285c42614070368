"""Run control on the driver: signals that end a run at a commit boundary, and the timings of delivered blocks."""

from __future__ import annotations

import threading


class Interrupt(BaseException):
    def __init__(self, signame: str):
        super().__init__(signame)
        self.signame = signame


class Signals:
    """SIGTERM and SIGINT end a run at a commit boundary. Inside hold() a signal is only noted (the driver
    finishes the block or commit in hand, then stops); outside (waiting on Ray for the next block) it raises
    Interrupt at once. Installed only in the main thread; elsewhere signals keep their handlers."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._holding = 0
        self._old: dict = {}

    def install(self) -> None:
        import signal

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                old = signal.signal(sig, self._handle)
                self._old.setdefault(sig, old)

    def uninstall(self) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        import signal

        first = self.received is None
        self.received = self.received or signal.Signals(signum).name
        if self._holding == 0 and first and self._old:
            raise Interrupt(self.received)

    def hold(self):
        import contextlib

        @contextlib.contextmanager
        def _hold():
            self._holding += 1
            try:
                yield
            finally:
                self._holding -= 1

        return _hold()


def steady(timings: dict) -> dict:
    """timings plus steady_audio_s_per_s: the rate between the first and the last delivered block, i.e. without
    Ray start-up, the actors' model load and the first batch (None with fewer than two blocks)."""
    out = dict(timings)
    span = out.get("last_output_s", 0.0) - out.get("first_output_s", 0.0)
    if "steady_audio_s" in out:
        out["steady_audio_s"] = round(out["steady_audio_s"], 3)
    out["steady_audio_s_per_s"] = round(out["steady_audio_s"] / span, 3) if span > 0 else None
    return out

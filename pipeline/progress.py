"""What a run shows while it works: a progress bar on a terminal, plain lines in logs and jobs, and metrics.

Progress counts audio as it is embedded (every segment that reaches the driver), not only when a whole recording
is complete, so a run over a few long tracks moves from its first block on. It shows audio seconds embedded,
inputs done, the rate, an ETA and the errors so far:

    [mert] 412.5 audio s embedded (3/8 inputs done: 3 ok, 0 error, 0 too short), 27.5 audio s/s, ETA ~43 s

The ETA scales the audio embedded so far by the input bytes still to come (audio seconds per input byte of the
recordings finished), so it appears once the first recording is done. Nothing here knows about Ray: the engine
hands in a MetricsSink that forwards the same events to Ray's metrics API (exported to Prometheus).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Protocol

Log = Callable[[str], None]


class MetricsSink(Protocol):
    """Receives what the run did; the engine's implementation records Ray metrics."""

    def segments(self, audio_s: float, count: int) -> None: ...

    def input_done(self, status: str, error_kind: str | None) -> None: ...

    def rate(self, segments_per_s: float, audio_s_per_s: float) -> None: ...


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Progress:
    """The run's progress. `counts` is the engine's counts dict (processed, ok, error, too_short, errors_by_kind),
    read, never written. Call `segments()` for each delivered block's segment rows and `input_done()` for each
    finished recording; `close()` stops the bar and the timer thread and prints the last line.

    bar: a tqdm bar on `stream` (default: when stderr is a terminal); otherwise a plain line every `every_s`
    seconds through `log` (0 = no periodic lines).
    """

    def __init__(
        self,
        counts: dict,
        total_inputs: int,
        total_bytes: int,
        log: Log,
        *,
        every_s: float = 10.0,
        bar: bool | None = None,
        stream: IO[str] | None = None,
        metrics: MetricsSink | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.counts = counts
        self.total_inputs = total_inputs
        self.total_bytes = max(0, int(total_bytes))
        self.log = log
        self.metrics = metrics
        self.clock = clock
        self.t0 = clock()
        self.audio_s = 0.0  # segment audio embedded so far
        self.segment_count = 0
        self.done_bytes = 0  # input bytes of the recordings finished
        self.done_audio_s = 0.0  # decoded audio of the recordings finished ok
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last_rate = (self.t0, 0, 0.0)
        stream = stream if stream is not None else sys.stderr
        use_bar = bar if bar is not None else bool(getattr(stream, "isatty", lambda: False)())
        self._bar = None
        if use_bar and every_s > 0:
            from tqdm import tqdm

            self._bar = tqdm(
                total=None,
                unit="audio s",
                unit_scale=False,
                file=stream,
                dynamic_ncols=True,
                bar_format="{desc} {n:.1f} audio s embedded, {rate_fmt}, {postfix} [{elapsed}]",
                desc="[mert]",
            )
        self._every = 1.0 if self._bar is not None else every_s
        self._thread = None
        if every_s > 0:
            self._thread = threading.Thread(target=self._tick, name="mert-progress", daemon=True)
            self._thread.start()

    # -- events
    def segments(self, audio_s: float, count: int) -> None:
        with self._lock:
            self.audio_s += audio_s
            self.segment_count += count
            if self._bar is not None:
                self._bar.update(audio_s)
        if self.metrics is not None and count:
            self.metrics.segments(audio_s, count)

    def input_done(self, record: dict, size: int) -> None:
        with self._lock:
            self.done_bytes += max(0, int(size))
            if record.get("status") == "ok":
                self.done_audio_s += float(record.get("duration_s") or 0.0)
        if self.metrics is not None:
            self.metrics.input_done(str(record.get("status")), record.get("error_kind"))

    # -- figures
    def rate(self) -> float:
        """Audio seconds embedded per wall second since the run's progress started."""
        el = self.clock() - self.t0
        return self.audio_s / el if el > 0 else 0.0

    def eta_s(self) -> float | None:
        """Seconds left: the audio still to come (input bytes left x audio seconds per byte of the recordings
        finished so far) at the current rate. None before the first recording finishes."""
        rate = self.rate()
        if not (self.done_bytes and self.done_audio_s and rate > 0 and self.total_bytes):
            return None
        total_audio = self.total_bytes * self.done_audio_s / self.done_bytes
        return max(0.0, total_audio - self.audio_s) / rate

    def _inputs(self) -> str:
        c = self.counts
        text = (
            f"{c.get('processed', 0)}/{self.total_inputs} inputs done: {c.get('ok', 0)} ok, "
            f"{c.get('error', 0)} error, {c.get('too_short', 0)} too short"
        )
        kinds = c.get("errors_by_kind") or {}
        if kinds:
            text += " (" + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) + ")"
        return text

    def line(self) -> str:
        eta = self.eta_s()
        return (
            f"[mert] {self.audio_s:.1f} audio s embedded ({self._inputs()}), {self.rate():.1f} audio s/s, "
            f"ETA {'~' + _duration(eta) if eta is not None else 'unknown until the first input is done'}, "
            f"{_duration(self.clock() - self.t0)} elapsed"
        )

    # -- output
    def _emit(self) -> None:
        now = self.clock()
        t, n, a = self._last_rate
        if self.metrics is not None and now > t:
            self.metrics.rate((self.segment_count - n) / (now - t), (self.audio_s - a) / (now - t))
        self._last_rate = (now, self.segment_count, self.audio_s)
        if self._bar is not None:
            with self._lock:
                eta = self.eta_s()
                self._bar.set_postfix_str(
                    self._inputs() + (f", ETA ~{_duration(eta)}" if eta is not None else ""), refresh=False
                )
                self._bar.refresh()
        else:
            self.log(self.line())

    def _tick(self) -> None:
        while not self._stop.wait(self._every):
            self._emit()

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._emit()
        if self._bar is not None:
            self._bar.close()
            self.log(self.line())

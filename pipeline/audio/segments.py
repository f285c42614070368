"""Cutting a recording into model-sized windows: THE segment rule, as one function, plus its streaming form.

The rule (DESIGN.md, "Data flow" -> Segments), in samples at the model rate:
  W = round(window_s * sr), H = round(hop_s * sr), M = round(min_segment_s * sr).
  Windows start at k*H. Every full window [kH, kH + W) that fits in the recording is kept. Then at most ONE
  partial window: the first start kH whose window runs past the end. It is kept when its length (N - kH) is at
  least M and it adds at least M samples not covered by the previous kept window (N - (prev_start + W) >= M;
  with no previous window only the length counts). With H > W the gaps between windows are skipped.
A recording that yields no segment is `too_short`.

`segment_bounds` is the rule; `Segmenter` applies it to audio that arrives in chunks and keeps at most about
W + H samples buffered, so memory does not grow with the recording. Both agree exactly (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import SegmentConfig


@dataclass
class Segment:
    """One window of a recording, ready for the model."""

    index: int  # 0-based segment number within the recording
    start_s: float  # start time in seconds (= start_sample / sample_rate)
    duration_s: float  # length in seconds (= len(samples) / sample_rate)
    samples: np.ndarray  # (N,) float32 mono at the model rate

    @property
    def num_samples(self) -> int:
        return int(self.samples.shape[0])


def window_samples(sample_rate: int, cfg: SegmentConfig) -> tuple[int, int, int]:
    """(W, H, M): window, hop and minimum segment length in samples at `sample_rate` (Hz)."""
    if not (isinstance(sample_rate, int) and sample_rate > 0):
        raise ValueError(f"sample_rate={sample_rate!r}: must be a positive integer number of Hz")
    w = int(round(cfg.window_s * sample_rate))
    h = int(round(cfg.hop * sample_rate))
    m = int(round(cfg.min_segment_s * sample_rate))
    if w < 1 or h < 1 or m < 1:
        raise ValueError(
            f"window {cfg.window_s} s, hop {cfg.hop} s, min segment {cfg.min_segment_s} s at {sample_rate} Hz "
            "round to fewer than one sample: use longer durations"
        )
    return w, h, m


def _partial_kept(start: int, num_samples: int, w: int, h: int, m: int) -> bool:
    """Whether the partial window starting at sample `start` (the first one running past the end) is kept."""
    length = num_samples - start
    if length < m:
        return False
    if start == 0:  # no previous window
        return True
    prev_end = start - h + w
    return num_samples - prev_end >= m


def segment_bounds(num_samples: int, sample_rate: int, cfg: SegmentConfig) -> list[tuple[int, int]]:
    """THE segment rule: [(start_sample, length_samples)] for a recording of `num_samples` samples at
    `sample_rate` Hz. Empty list = too short for any segment."""
    if num_samples < 0:
        raise ValueError(f"num_samples={num_samples}: must be >= 0")
    w, h, m = window_samples(sample_rate, cfg)
    out: list[tuple[int, int]] = []
    start = 0
    while start + w <= num_samples:
        out.append((start, w))
        start += h
    if start < num_samples and _partial_kept(start, num_samples, w, h, m):
        out.append((start, num_samples - start))
    return out


class Segmenter:
    """Streaming `segment_bounds`: push chunks of mono audio at `sample_rate`, get segments as soon as a window
    is complete; `finish()` returns the trailing partial window if the rule keeps it.

    Holds at most about W + H samples (plus the chunk being pushed) at any time.
    """

    def __init__(self, sample_rate: int, cfg: SegmentConfig):
        self.sample_rate = sample_rate
        self.cfg = cfg
        self.window, self.hop, self.min_len = window_samples(sample_rate, cfg)
        self._buf = np.zeros(0, dtype=np.float32)
        self._buf_start = 0  # absolute sample index of _buf[0]
        self._next_start = 0  # absolute start of the next window
        self._total = 0  # samples pushed so far
        self._index = 0
        self._finished = False

    @property
    def total_samples(self) -> int:
        """Samples pushed so far (at the model rate)."""
        return self._total

    @property
    def num_segments(self) -> int:
        """Segments emitted so far."""
        return self._index

    def _make(self, start: int, length: int) -> Segment:
        off = start - self._buf_start
        samples = np.array(self._buf[off : off + length], dtype=np.float32, copy=True)
        seg = Segment(
            index=self._index,
            start_s=start / self.sample_rate,
            duration_s=length / self.sample_rate,
            samples=samples,
        )
        self._index += 1
        return seg

    def push(self, chunk: np.ndarray) -> list[Segment]:
        """Add (n,) float32 samples; return the full windows completed by them (possibly none)."""
        if self._finished:
            raise RuntimeError("Segmenter.push after finish()")
        chunk = np.asarray(chunk, dtype=np.float32).reshape(-1)
        if chunk.size == 0:
            return []
        self._buf = np.concatenate([self._buf, chunk]) if self._buf.size else chunk.copy()
        self._total += chunk.size
        out: list[Segment] = []
        while self._next_start + self.window <= self._total:
            out.append(self._make(self._next_start, self.window))
            self._next_start += self.hop
        # drop what no future window needs: everything before the next window start
        drop = min(self._next_start, self._total) - self._buf_start
        if drop > 0:
            self._buf = self._buf[drop:]
            self._buf_start += drop
        return out

    def finish(self) -> list[Segment]:
        """The trailing partial window, if the rule keeps it (a list of 0 or 1 segments)."""
        if self._finished:
            return []
        self._finished = True
        start, n = self._next_start, self._total
        out: list[Segment] = []
        if start < n and _partial_kept(start, n, self.window, self.hop, self.min_len):
            out.append(self._make(start, n - start))
        self._buf = np.zeros(0, dtype=np.float32)
        return out

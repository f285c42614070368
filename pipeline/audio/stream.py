"""An input as a stream of model-sized segments: decode and resample to the model's rate (in the isolated child by
default, or in this process: pipeline.audio.decode.LocalDecoder does both) and cut into segments here, with memory bounded by a few windows whatever the
recording's length (read_segments, SegmentStream); and the whole recording at once for tests and benchmarks
(decode_audio). Every failure is an InputFault subclass (pipeline.errors) whose message names the input, the
cause and what to do; a recording that yields no segment raises TooShort (ledger status `too_short`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.audio.decode import LocalDecoder, SourceInfo
from pipeline.audio.isolate import DecoderProcess, default_decoder
from pipeline.audio.segments import Segment, Segmenter
from pipeline.config import SegmentConfig
from pipeline.errors import TooShort


class SegmentStream:
    """Iterator of Segment over one input (a context manager). `info` is set once the input is open; its
    duration_s, truncated and warning are final when the iteration ends. Iteration raises InputFault subclasses,
    and TooShort when the recording yields no segment."""

    def __init__(self, source: Any, uri: str, sample_rate: int, segments: SegmentConfig):
        self._source = (
            source  # LocalDecoder or the DecoderProcess's remote source: .info, .chunks(), .close()
        )
        self.uri = uri
        self.sample_rate = sample_rate
        self.segment_config = segments
        self.info: SourceInfo = source.info
        self.num_segments = 0
        self._iterated = False

    def __iter__(self) -> Iterator[Segment]:
        if self._iterated:
            raise RuntimeError(f"{self.uri}: a SegmentStream can be iterated once")
        self._iterated = True
        try:
            if self._source.rate != self.sample_rate:
                raise ValueError(
                    f"{self.uri}: the source yields {self._source.rate} Hz, the stream wants {self.sample_rate} Hz"
                )
            segmenter = Segmenter(self.sample_rate, self.segment_config)
            # borrowed: a chunk of the isolated source may view shared memory that the child reuses once the
            # next chunk is asked for; Segmenter.push copies what it keeps before that
            for chunk in self._source.chunks(borrow=True):
                for seg in segmenter.push(chunk):
                    self.num_segments += 1
                    yield seg
            self.info = self._source.info
            for seg in segmenter.finish():
                self.num_segments += 1
                yield seg
            if self.num_segments == 0:
                dur = self.info.duration_s or 0.0
                raise TooShort(
                    self.uri,
                    f"decoded {dur:.3f} s of audio, shorter than the minimum segment of "
                    f"{self.segment_config.min_segment_s:g} s",
                    "nothing to embed",
                )
        finally:
            self.close()

    def close(self) -> None:
        if self._source is not None:
            self._source.close()
            self.info = self._source.info
            self._source = None

    def __enter__(self) -> SegmentStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_segments(
    uri: str,
    *,
    sample_rate: int,
    segments: SegmentConfig,
    storage_options: dict | None = None,
    isolate: bool = True,
    time_limit_s: float = 600.0,
    decoder: DecoderProcess | None = None,
    chunk_s: float = 2.0,
) -> SegmentStream:
    """Open `uri` (plain path, file://, s3://, gs://, az://) and return a SegmentStream of its segments: mono
    (mean over channels), resampled to `sample_rate` Hz, cut by `segments` (pipeline.audio.segments rule).

    The input is streamed (never read whole); decoding proceeds `chunk_s` seconds at a time, so memory is bounded
    by a few windows. isolate=True decodes in `decoder` (default: this thread's shared DecoderProcess), where a
    crash becomes DecoderCrashed and a stall or more than `time_limit_s` seconds of decoding DecodeTimeout.
    Raises InputFault subclasses at open; the stream raises them during iteration.
    """
    source: Any  # the child's _RemoteSource, or a LocalDecoder: the same .info/.rate/.chunks()/.close()
    if isolate:
        dec = decoder if decoder is not None else default_decoder()
        source = dec.open(
            uri,
            storage_options=storage_options,
            time_limit_s=time_limit_s,
            chunk_s=chunk_s,
            sample_rate=sample_rate,
        )
    else:
        source = LocalDecoder(
            uri, storage_options, chunk_s=chunk_s, time_limit_s=time_limit_s, sample_rate=sample_rate
        )
    return SegmentStream(source, uri, sample_rate, segments)


def decode_audio(
    uri: str,
    *,
    sample_rate: int | None = None,
    storage_options: dict | None = None,
    isolate: bool = False,
    time_limit_s: float = 600.0,
) -> tuple[np.ndarray, SourceInfo]:
    """The whole recording as (N,) float32 mono at `sample_rate` Hz (None = the source rate), and its SourceInfo.
    For tests, benchmarks and parity checks: holds the whole recording in memory."""
    if isolate:
        source: Any = default_decoder().open(
            uri, storage_options=storage_options, time_limit_s=time_limit_s, sample_rate=sample_rate
        )
    else:
        source = LocalDecoder(uri, storage_options, time_limit_s=time_limit_s, sample_rate=sample_rate)
    try:
        parts = [np.zeros(0, dtype=np.float32), *source.chunks()]
        info = source.info
    finally:
        source.close()
    return np.concatenate(parts).astype(np.float32, copy=False), info

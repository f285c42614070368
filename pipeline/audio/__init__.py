"""The audio stage: an input (any fsspec URI) as mono segments at the model's rate. Nothing here knows about Ray
or imports torch or pyarrow. Each module imports only those listed before it:

  container.py  opening an input (fsspec + the demuxer's file object + PyAV), probe_duration (the declared
                duration, never raises), structure checks at the end of a file (cut short, trailing bytes)
  resample.py   StreamResampler: torchaudio's default sinc filter as a polyphase bank, any rate, bounded memory
  segments.py   THE segment rule (segment_bounds) and its streaming form (Segmenter)
  decode.py     LocalDecoder: fsspec open + PyAV decode + downmix + resample, in chunks; SourceInfo; fault kinds
  isolate.py    DecoderProcess: the decoder child (`python -m pipeline.audio`), its pipe protocol and the
                shared-memory ring the samples cross
  stream.py     read_segments / SegmentStream (decode + resample, isolated or not -> segment), decode_audio

    with read_segments(uri, sample_rate=24000, segments=SegmentConfig()) as stream:
        for seg in stream:            # Segment(index, start_s, duration_s, samples (N,) float32)
            ...
        stream.info                   # SourceInfo: source rate, channels, codec, decoded duration, truncated
"""

from pipeline.audio.container import READ_BLOCK_BYTES, probe_duration
from pipeline.audio.decode import MAX_SOURCE_RATE_HZ, MIN_SOURCE_RATE_HZ, LocalDecoder, SourceInfo
from pipeline.audio.isolate import (
    FAULT_ENV,
    PARENT_ENV,
    RING_SLOT_BYTES,
    RING_SLOTS,
    DecoderProcess,
    default_decoder,
    injected,
)
from pipeline.audio.resample import LOWPASS_FILTER_WIDTH, ROLLOFF, StreamResampler, sinc_filter_bank
from pipeline.audio.segments import Segment, Segmenter, segment_bounds, window_samples
from pipeline.audio.stream import SegmentStream, decode_audio, read_segments

__all__ = [
    "FAULT_ENV",
    "LOWPASS_FILTER_WIDTH",
    "MAX_SOURCE_RATE_HZ",
    "MIN_SOURCE_RATE_HZ",
    "PARENT_ENV",
    "READ_BLOCK_BYTES",
    "RING_SLOTS",
    "RING_SLOT_BYTES",
    "ROLLOFF",
    "DecoderProcess",
    "LocalDecoder",
    "Segment",
    "SegmentStream",
    "Segmenter",
    "SourceInfo",
    "StreamResampler",
    "decode_audio",
    "default_decoder",
    "injected",
    "probe_duration",
    "read_segments",
    "segment_bounds",
    "sinc_filter_bank",
    "window_samples",
]

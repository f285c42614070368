"""The segment rule (DESIGN.md, Segments) on edge lengths, with overlap and gaps; the streaming Segmenter agrees."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.audio.segments import Segmenter, segment_bounds
from pipeline.config import SegmentConfig

SR = 24000


def secs(bounds: list[tuple[int, int]]) -> list[tuple[float, float]]:
    return [(round(s / SR, 4), round(n / SR, 4)) for s, n in bounds]


DEFAULT = SegmentConfig()  # window 5, hop 5, min 1
OVERLAP = SegmentConfig(window_s=5.0, hop_s=2.5)
GAPS = SegmentConfig(window_s=5.0, hop_s=7.0)


@pytest.mark.parametrize(
    "cfg, length_s, expected",
    [
        (DEFAULT, 0.0, []),
        (DEFAULT, 0.5, []),
        (DEFAULT, 0.99, []),
        (DEFAULT, 1.0, [(0.0, 1.0)]),
        (DEFAULT, 4.99, [(0.0, 4.99)]),
        (DEFAULT, 5.0, [(0.0, 5.0)]),
        (DEFAULT, 5.01, [(0.0, 5.0)]),  # 0.01 s tail < min segment
        (DEFAULT, 5.99, [(0.0, 5.0)]),
        (DEFAULT, 6.0, [(0.0, 5.0), (5.0, 1.0)]),
        (DEFAULT, 12.0, [(0.0, 5.0), (5.0, 5.0), (10.0, 2.0)]),
        (DEFAULT, 15.0, [(0.0, 5.0), (5.0, 5.0), (10.0, 5.0)]),
        # overlap: the partial window must add >= 1 s not covered by the previous window
        (OVERLAP, 0.5, []),
        (OVERLAP, 1.0, [(0.0, 1.0)]),
        (OVERLAP, 4.99, [(0.0, 4.99)]),
        (OVERLAP, 5.0, [(0.0, 5.0)]),  # partial at 2.5 s adds nothing new
        (OVERLAP, 5.01, [(0.0, 5.0)]),
        (OVERLAP, 5.5, [(0.0, 5.0)]),  # adds 0.5 s only
        (OVERLAP, 6.0, [(0.0, 5.0), (2.5, 3.5)]),  # adds exactly 1 s
        (OVERLAP, 12.0, [(0.0, 5.0), (2.5, 5.0), (5.0, 5.0), (7.5, 4.5)]),
        # gaps: hop > window skips audio between windows
        (GAPS, 5.0, [(0.0, 5.0)]),
        (GAPS, 6.5, [(0.0, 5.0)]),  # the next window would start after the end
        (GAPS, 7.5, [(0.0, 5.0)]),  # partial at 7 s is 0.5 s
        (GAPS, 8.5, [(0.0, 5.0), (7.0, 1.5)]),
        (GAPS, 12.0, [(0.0, 5.0), (7.0, 5.0)]),
    ],
)
def test_segment_rule_edges(cfg: SegmentConfig, length_s: float, expected: list[tuple[float, float]]) -> None:
    assert secs(segment_bounds(int(round(length_s * SR)), SR, cfg)) == expected


def test_one_sample_below_min_segment_is_too_short() -> None:
    assert segment_bounds(SR - 1, SR, DEFAULT) == []
    assert segment_bounds(SR, SR, DEFAULT) == [(0, SR)]


def test_invalid_rate_is_refused() -> None:
    with pytest.raises(ValueError, match="sample_rate"):
        segment_bounds(100, 0, DEFAULT)


def _run_segmenter(x: np.ndarray, sr: int, cfg: SegmentConfig, rng: np.random.Generator, max_chunk: int):
    seg = Segmenter(sr, cfg)
    out = []
    pos = 0
    peak_buffer = 0
    while pos < x.size:
        n = int(rng.integers(0, max_chunk + 1))
        out += seg.push(x[pos : pos + n])
        peak_buffer = max(peak_buffer, seg._buf.size)
        pos += n
    out += seg.finish()
    return out, peak_buffer


@pytest.mark.parametrize("seed", range(12))
def test_segmenter_matches_segment_bounds_for_random_chunkings(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sr = int(rng.choice([100, 1000, 16000]))
    window = float(rng.choice([0.5, 1.0, 5.0]))
    hop = float(rng.choice([window * 0.3, window * 0.5, window, window * 1.7]))
    cfg = SegmentConfig(window_s=window, hop_s=hop, min_segment_s=float(rng.uniform(0.05, 1.0)) * window)
    n = int(rng.integers(0, int(12 * window * sr)))
    x = np.arange(n, dtype=np.float32)  # sample value = its index: checks contents too
    max_chunk = int(rng.choice([1, 7, int(window * sr), int(3 * window * sr)]))
    segs, peak = _run_segmenter(x, sr, cfg, rng, max(1, max_chunk))
    bounds = segment_bounds(n, sr, cfg)
    assert [(round(s.start_s * sr), s.num_samples) for s in segs] == bounds
    assert [s.index for s in segs] == list(range(len(bounds)))
    for s, (start, length) in zip(segs, bounds, strict=True):
        assert s.samples.dtype == np.float32
        np.testing.assert_array_equal(s.samples, x[start : start + length])
        assert s.duration_s == pytest.approx(length / sr)
    w = round(window * sr)
    h = round(hop * sr)
    assert peak <= w + h + max_chunk  # bounded by a window + hop + the chunk being pushed


def test_segmenter_push_after_finish_is_an_error() -> None:
    seg = Segmenter(SR, DEFAULT)
    seg.push(np.zeros(10, dtype=np.float32))
    assert seg.finish() == []
    with pytest.raises(RuntimeError):
        seg.push(np.zeros(10, dtype=np.float32))

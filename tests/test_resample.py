"""The resampler (pipeline.audio.StreamResampler): torchaudio's default filter on every common rate, streamed in
pieces; real odd rates in bounded memory and time; and faithful to the windowed-sinc formula itself."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torchaudio

from pipeline import synth
from pipeline.audio import LOWPASS_FILTER_WIDTH, ROLLOFF, StreamResampler

REPO = Path(__file__).resolve().parent.parent
COMMON_RATES = [8000, 11025, 16000, 22050, 32000, 44100, 48000, 88200, 96000, 192000]
MODEL_RATES = [16000, 24000]
ODD_RATES = [6001, 44056, 44101]


def _signal(seconds: float, rate: int, seed: int) -> np.ndarray:
    """(n,) float32 music-like audio with a burst of noise, peaking near full scale."""
    rng = np.random.default_rng(seed)
    x = synth.music_like(seconds, rate, channels=1, seed=seed)[0]
    x[: rate // 10] += 0.2 * rng.standard_normal(rate // 10).astype(np.float32)
    return x


def _streamed(x: np.ndarray, orig: int, new: int, sizes: list[int], seed: int) -> np.ndarray:
    """x resampled by one StreamResampler fed pieces whose sizes are drawn from `sizes`."""
    rng = np.random.default_rng(seed)
    r = StreamResampler(orig, new)
    parts, pos = [], 0
    while pos < x.size:
        n = int(rng.choice(sizes))
        parts.append(r.push(x[pos : pos + n]))
        pos += n
    parts.append(r.flush())
    return np.concatenate(parts)


def _sinc_reference(x: np.ndarray, orig: int, new: int) -> np.ndarray:
    """float64, straight from the formula: y[m] = sum_i x[i] * h((i / orig - m / new) * base) with
    base = rolloff * min(orig, new) and h(t) = sinc(t) * cos^2(pi t / 2w) * base / orig for |t| <= w (w = 6)."""
    base = ROLLOFF * min(orig, new)
    w = LOWPASS_FILTER_WIDTH
    n_out = math.ceil(new * x.size / orig)
    t = (np.arange(x.size)[None, :] / orig - np.arange(n_out)[:, None] / new) * base  # (n_out, n_in)
    h = np.where(np.abs(t) <= w, np.sinc(t) * np.cos(np.pi * t / (2 * w)) ** 2, 0.0) * (base / orig)
    return h @ x.astype(np.float64)


@pytest.mark.parametrize("orig", COMMON_RATES)
def test_common_rates_match_torchaudio_when_streamed_in_pieces(orig: int) -> None:
    x = _signal(1.3, orig, seed=orig)
    for new in MODEL_RATES:
        # torchaudio's own float32 path builds its kernel in float32 (off by up to ~2e-5 at 11025/22050 Hz);
        # its float64 path is the filter without that rounding: the bar is 1e-5 of full scale against it
        ref64 = torchaudio.functional.resample(torch.from_numpy(x).double(), orig, new).numpy()
        ref32 = torchaudio.functional.resample(torch.from_numpy(x), orig, new).numpy()
        # varied sizes (1 sample to 3 s), only tiny ones, and one piece: every evaluation order the resampler has
        for sizes in ([1, 3, 97, 1001, 4097, 12345, 3 * orig], [1, 2, 5, 17, 50], [x.size]):
            y = _streamed(x, orig, new, sizes, seed=len(sizes))
            assert y.shape == ref64.shape, (orig, new, sizes)
            assert y.dtype == np.float32
            assert np.max(np.abs(y - ref64)) < 1e-5, (orig, new, sizes)
            assert np.max(np.abs(y - ref32)) < 3e-5, (orig, new, sizes)


@pytest.mark.parametrize("orig", ODD_RATES)
def test_odd_rates_are_faithful_to_the_sinc_formula(orig: int) -> None:
    x = _signal(0.1, orig, seed=1)
    for new in MODEL_RATES:
        ref = _sinc_reference(x, orig, new)
        y = _streamed(x, orig, new, [1, 7, 333, 2000], seed=orig)
        one = _streamed(x, orig, new, [x.size], seed=0)
        assert y.shape == ref.shape == one.shape, (orig, new)
        assert np.max(np.abs(y - ref)) < 2e-6, (orig, new)
        assert np.max(np.abs(one - ref)) < 2e-6, (orig, new)


@pytest.mark.parametrize("orig, new", [(44101, 24000), (6001, 16000), (44056, 24000)])
def test_a_sine_at_an_odd_rate_keeps_its_frequency_and_amplitude(orig: int, new: int) -> None:
    freq = 1000.0
    x = synth.tone(freq, 2.0, orig)[0]
    y = _streamed(x, orig, new, [orig // 3, 4096, 100000], seed=2)
    assert y.size == math.ceil(new * x.size / orig)
    spec = np.abs(np.fft.rfft(y * np.hanning(y.size)))
    assert abs(np.argmax(spec) * new / y.size - freq) <= new / y.size
    core = y[new // 10 : -new // 10]
    assert np.max(np.abs(core)) == pytest.approx(0.5, abs=0.005)
    assert float(np.sqrt(np.mean(core**2))) == pytest.approx(0.5 / np.sqrt(2), rel=0.005)


_MEASURE = textwrap.dedent("""
    import json, os, resource, sys, time
    import numpy as np
    import torch  # loaded before measuring: a resampler that builds torch kernels is charged for them alone
    from pipeline.audio import StreamResampler
    orig, new = int(sys.argv[1]), int(sys.argv[2])
    x = (0.5 * np.sin(2 * np.pi * 1000.0 * np.arange(10 * orig) / orig)).astype(np.float32)  # 10 s
    # a wrong resampler must fail here, not take the machine's memory: cap the address space at +2 GB
    vsz = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (vsz + (2 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    r = StreamResampler(orig, new)
    n = sum(r.push(x[i : i + orig // 2]).size for i in range(0, x.size, orig // 2)) + r.flush().size
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"samples": n, "seconds": seconds, "peak_growth_mb": (peak - before) / 1024}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("orig", ODD_RATES)
def test_odd_rates_resample_in_bounded_memory_and_time(orig: int) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    for new in MODEL_RATES[-1:]:  # the larger model rate: the larger filter bank
        out = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(orig), str(new)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        m = json.loads(out.stdout.strip().splitlines()[-1])
        assert m["samples"] == 10 * new
        assert m["peak_growth_mb"] < 100, (orig, new, m)
        assert m["seconds"] < 10, (orig, new, m)


def test_rates_must_be_positive_integers() -> None:
    for orig, new in [(0, 16000), (44100, -1), (44100.0, 16000)]:
        with pytest.raises(ValueError, match="must be positive integers"):
            StreamResampler(orig, new)  # type: ignore[arg-type]

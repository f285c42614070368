"""Resampling: torchaudio's default windowed-sinc filter as a polyphase bank (numpy only, no torch), streamed in
pieces with memory bounded by the rates' reduced ratio whatever the source rate.

    r = StreamResampler(44100, 24000)
    out = [r.push(chunk) for chunk in chunks] + [r.flush()]   # equals torchaudio.functional.resample(whole)
"""

from __future__ import annotations

import math

import numpy as np

# torchaudio.functional.resample's defaults: the filter that every resampling here applies
LOWPASS_FILTER_WIDTH = 6  # zero crossings of the sinc on each side
ROLLOFF = 0.99  # cut-off as a fraction of the lower rate's Nyquist frequency
_BLOCK_KERNEL_FLOATS = 1 << 20  # the largest dense block kernel StreamResampler builds (4 MB)


def sinc_filter_bank(orig: int, new: int) -> tuple[np.ndarray, int]:
    """The polyphase windowed-sinc filter from `orig` to `new` (rates reduced by their gcd): (bank, width).

    bank[j, q] (shape (new, 2 * width + 2), float32) weighs input sample floor(m * orig / new) - width + q for
    every output sample m with m mod new == j. Weights are computed in float64 from the exact integer offset
    i * new - m * orig, then rounded to float32; rows are built a slice at a time so that the float64
    temporaries stay a few MB.
    """
    if not (orig > 0 and new > 0):
        raise ValueError(f"rates {orig!r} -> {new!r}: must be positive integers")
    base = min(orig, new) * ROLLOFF
    width = math.ceil(LOWPASS_FILTER_WIDTH * orig / base)
    taps = 2 * width + 2
    bank = np.empty((new, taps), dtype=np.float32)
    q = np.arange(taps, dtype=np.int64) - width  # (taps,)
    step = max(1, (1 << 18) // taps)
    for j0 in range(0, new, step):
        j = np.arange(j0, min(new, j0 + step), dtype=np.int64)[:, None]  # (J, 1) phases
        d = (j * orig // new + q) * new - j * orig  # (J, taps) exact: (i / orig - m / new) * orig * new
        t = d * (base / (orig * new))  # in units of the filter's zero crossings
        h = np.sinc(t) * np.cos(t * (math.pi / (2 * LOWPASS_FILTER_WIDTH))) ** 2 * (base / orig)
        bank[j0 : j0 + j.shape[0]] = np.where(np.abs(t) <= LOWPASS_FILTER_WIDTH, h, 0.0)
    return bank, width


class StreamResampler:
    """Band-limited resampling (windowed sinc) of a stream pushed in pieces, with memory bounded by the rates'
    reduced ratio: the same filter as torchaudio.functional.resample's defaults (sinc_interp_hann,
    lowpass_filter_width=6, rolloff=0.99), evaluated as a polyphase filter.

    Output sample m (at new_sr) is sum_i x[i] * h(i / orig - m / new) over input samples i (at orig_sr, zero
    outside the signal), rates reduced by their gcd, with h(t) = sinc(pi * b * t) * cos^2(pi * b * t / 12) * b / orig
    for |b * t| <= 6 and 0 beyond, b = 0.99 * min(orig, new). The output needs only the `taps` = 2 * width + 2 input
    samples from floor(m * orig / new) - width on (width = ceil(6 * orig / b)), and its weights depend only on the
    phase m mod new. So the filter bank is (new, taps) float32 (torchaudio builds (new, 2 * width + orig), which for a
    44101 Hz source is 24000 x 44127 floats: ~4 GB), and each output costs `taps` multiply-adds.

    push() returns every output whose inputs have all arrived; flush() pads the end with zeros and trims the total
    to ceil(new_sr * n / orig_sr) samples, as torchaudio does. The concatenated output equals torchaudio's
    whole-signal result to float32 rounding; equal rates are the identity.
    """

    def __init__(self, orig_sr: int, new_sr: int):
        if not (isinstance(orig_sr, int) and isinstance(new_sr, int) and orig_sr > 0 and new_sr > 0):
            raise ValueError(f"rates {orig_sr!r} -> {new_sr!r}: must be positive integers (Hz)")
        self.orig_sr = orig_sr
        self.new_sr = new_sr
        self.identity = orig_sr == new_sr
        g = math.gcd(orig_sr, new_sr)
        self._orig = orig_sr // g
        self._new = new_sr // g
        self._in = 0  # input samples pushed
        self._out = 0  # output samples returned (= index of the next output sample)
        self._flushed = False
        if self.identity:
            return
        self._bank, self._width = sinc_filter_bank(self._orig, self._new)
        self._taps = int(self._bank.shape[1])
        # For small reduced ratios (every common rate) the same weights also serve as one dense block kernel:
        # all `new` phases of block b read the `span` inputs from b * orig - width on, so whole blocks are one
        # BLAS matrix product (more multiply-adds than the gather, far less overhead). Not built when it would
        # pass _BLOCK_KERNEL_FLOATS (odd rates): their outputs are gathered.
        self._block_t: np.ndarray | None = None
        first = np.arange(self._new) * self._orig // self._new  # (new,) each phase's first input in its block
        span = int(first[-1]) + self._taps  # at most orig + taps - 1
        if self._new * span <= _BLOCK_KERNEL_FLOATS:
            block = np.zeros((self._new, span), dtype=np.float32)
            block[np.arange(self._new)[:, None], first[:, None] + np.arange(self._taps)] = self._bank
            self._block_t = np.ascontiguousarray(block.T)  # (span, new)
        # input samples held, with the global index of the first one: `width` zeros of front padding to start
        self._buf = np.zeros(self._width, dtype=np.float32)
        self._buf0 = -self._width

    def _emit(self, limit: int | None) -> np.ndarray:
        """Every output sample m >= self._out (and < limit) whose `taps` inputs are all in the buffer."""
        end = self._buf0 + self._buf.size  # global index one past the last buffered input
        last = end - self._taps + self._width  # outputs m with floor(m * orig / new) <= last are ready
        ready = -(-(last + 1) * self._new // self._orig) if last >= -1 else 0  # ceil((last + 1) * new / orig)
        if limit is not None:
            ready = min(ready, limit)
        count = ready - self._out
        if count <= 0:
            return np.zeros(0, dtype=np.float32)
        out = np.empty(count, dtype=np.float32)
        done = 0
        if self._block_t is not None:
            # whole blocks of `new` outputs as one BLAS product: block b's inputs start at b * orig - width
            head = min(count, (-self._out) % self._new)  # outputs before the next block boundary
            blocks = (count - head) // self._new
            if blocks > 0:
                self._gather(self._out, head, out[:head])
                start = (self._out + head) // self._new * self._orig - self._width - self._buf0
                rows = np.lib.stride_tricks.sliding_window_view(self._buf, self._block_t.shape[0])
                np.matmul(
                    rows[start : start + (blocks - 1) * self._orig + 1 : self._orig],  # (blocks, span) view
                    self._block_t,  # (span, new)
                    out=out[head : head + blocks * self._new].reshape(blocks, self._new),
                )
                done = head + blocks * self._new
        self._gather(self._out + done, count - done, out[done:])
        self._out = ready
        keep = self._out * self._orig // self._new - self._width - self._buf0  # the next output's first input
        self._buf = self._buf[keep:].copy()
        self._buf0 += keep
        return out

    def _gather(self, m0: int, count: int, out: np.ndarray) -> None:
        """Output samples m0 .. m0 + count - 1 into `out`: each one's `taps` inputs times its phase's weights."""
        if count <= 0:
            return
        windows = np.lib.stride_tricks.sliding_window_view(self._buf, self._taps)  # (n - taps + 1, taps) view
        step = max(1, (1 << 20) // self._taps)  # ~4 MB of gathered inputs (and as many weights) per slice
        for i in range(0, count, step):
            m = np.arange(m0 + i, m0 + min(count, i + step), dtype=np.int64)
            start = m * self._orig // self._new - self._width - self._buf0  # (M,) into the buffer
            np.einsum("ij,ij->i", windows[start], self._bank[m % self._new], out=out[i : i + m.size])

    def push(self, x: np.ndarray) -> np.ndarray:
        """Add (n,) float32 samples at orig_sr; return the (m,) float32 samples at new_sr ready so far."""
        if self._flushed:
            raise RuntimeError("StreamResampler.push after flush()")
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        self._in += x.size
        if self.identity:
            self._out += x.size
            return x
        if x.size == 0:
            return np.zeros(0, dtype=np.float32)
        self._buf = np.concatenate([self._buf, x])
        return self._emit(None)

    def flush(self) -> np.ndarray:
        """The last samples, trimmed so that the total output is ceil(new_sr * n_in / orig_sr)."""
        if self._flushed:
            return np.zeros(0, dtype=np.float32)
        self._flushed = True
        if self.identity:
            return np.zeros(0, dtype=np.float32)
        self._buf = np.concatenate([self._buf, np.zeros(self._taps, dtype=np.float32)])
        out = self._emit(-(-self._new * self._in // self._orig))
        self._buf = np.zeros(0, dtype=np.float32)
        return out

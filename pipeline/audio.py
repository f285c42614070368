"""The audio stage: open an input through fsspec, decode it with PyAV incrementally, downmix to mono, resample to
the model's rate and cut it into segments, with memory bounded by a few windows whatever the recording's length.

    with read_segments(uri, sample_rate=24000, segments=SegmentConfig()) as stream:
        for seg in stream:            # Segment(index, start_s, duration_s, samples (N,) float32)
            ...
        stream.info                   # SourceInfo: source rate, channels, codec, decoded duration, truncated

Decoding runs in a DecoderProcess child by default (pipeline.decoder), so a decoder crash or hang on one file
becomes that file's fault; resampling (StreamResampler: torchaudio's default sinc filter as a polyphase bank, any
source rate in bounded memory) and segmenting run in the calling process. Every failure is an InputFault
subclass (pipeline.errors) whose message names the input, the cause and what to do; a recording that yields no
segment raises TooShort (ledger status `too_short`). Nothing here knows about Ray.

Where a failure happened decides its kind: FFmpeg reads through _DemuxerIO, so only a read or seek that the
STORAGE layer failed is a storage fault (transient or not, as pipeline.storage.storage_fault says); an impossible
request of the demuxer (a header whose sizes point outside the file) and whatever FFmpeg reports are permanent
`decode` faults, as is a header declaring a source rate outside MIN_SOURCE_RATE_HZ..MAX_SOURCE_RATE_HZ.

A file whose audio is cut short or followed by other bytes keeps what decoded: SourceInfo.truncated is True and
SourceInfo.warning says why. Signals checked: a decode error after some audio; errors the demuxer or decoder
reports; a decoded duration shorter than the container declares; and the container's own structure at the end of
the file (RIFF/FORM sizes for WAV/AIFF, top-level boxes for MP4/M4A, objects for ASF/WMA, the final page and its
end-of-stream flag for Ogg).
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import SegmentConfig
from pipeline.errors import (
    DecodeError,
    DecodeTimeout,
    EmptyAudio,
    InputFault,
    NoAudioStream,
    NonFiniteAudio,
    TooShort,
)
from pipeline.segments import Segment, Segmenter
from pipeline.storage import get_fs, storage_fault

if TYPE_CHECKING:
    from pipeline.decoder import DecoderProcess

# fsspec read block for remote inputs: big enough for few requests, small enough to keep memory flat (bytes)
READ_BLOCK_BYTES = 4 * 1024 * 1024
# the shortfall against the declared duration that counts as "cut short": max(seconds, fraction of declared)
_SHORTFALL_S = 0.1
_SHORTFALL_FRAC = 0.02
# a native-order channel layout per channel count (FFmpeg's defaults)
_NATIVE_LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "4.0", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}
# source rates a header may declare (Hz): below, a few bytes would become minutes of audio (a 1 Hz header turns
# 844 bytes into 80 segments); above, no real recording (768 kHz is the highest rate audio interfaces offer)
MIN_SOURCE_RATE_HZ = 1_000
MAX_SOURCE_RATE_HZ = 768_000


@dataclass
class SourceInfo:
    """What the input holds, as decoded."""

    uri: str
    sample_rate: int  # source rate, Hz
    channels: int  # source channel count (downmixed to mono by the mean)
    codec: str  # decoder name, e.g. "mp3", "flac", "pcm_s16le"
    container: str  # demuxer name, e.g. "wav", "ogg", "mov,mp4,m4a,3gp,3g2,mj2"
    duration_s: float | None  # duration of the DECODED audio in seconds (known after the stream is exhausted)
    truncated: bool = False  # the audio was cut short or followed by other bytes: what decoded is kept
    warning: str | None = None  # human text when truncated etc.

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------- resampling


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


# ------------------------------------------------------------------------------------------------------ decoding


def _av_fault(uri: str, exc: BaseException, codec: str | None) -> InputFault:
    """An exception from PyAV/FFmpeg as a DecodeError naming the input and the decoder."""
    import av

    if isinstance(exc, av.FFmpegError):
        text = (getattr(exc, "strerror", None) or str(exc)).strip().lower()
    else:
        text = f"{type(exc).__name__}: {exc}"
    where = f" ({codec} decoder)" if codec else ""
    return DecodeError(
        uri,
        f"cannot decode: {text}{where}",
        "the file is damaged or not in an audio format FFmpeg reads; re-export or replace it",
    )


def _frame_to_mono(frame: Any) -> np.ndarray:
    """A PyAV AudioFrame -> (samples,) float32 mono (mean over channels), integers scaled to [-1, 1].

    Packed formats (s16, flt, ...) come as one interleaved plane (1, samples * channels); planar ones (s16p,
    fltp, ...) as one plane per channel. Planes are read directly: PyAV's to_ndarray mis-counts planes at 8 channels.
    """
    fmt = frame.format
    n = frame.samples
    ch = frame.layout.nb_channels
    name = fmt.packed.name
    dtype = {
        "u8": np.uint8,
        "s16": np.int16,
        "s32": np.int32,
        "s64": np.int64,
        "flt": np.float32,
        "dbl": np.float64,
    }.get(name)
    if dtype is None:
        raise ValueError(f"unsupported sample format {fmt.name}")
    if fmt.is_planar:
        arr = np.stack([np.frombuffer(frame.planes[c], dtype=dtype, count=n) for c in range(ch)])  # (ch, n)
    else:
        arr = np.frombuffer(frame.planes[0], dtype=dtype, count=n * ch).reshape(n, ch).T  # (ch, n)
    if name == "u8":
        x = (arr.astype(np.float32) - 128.0) / 128.0
    elif name == "s16":
        x = arr.astype(np.float32) / 32768.0
    elif name == "s32":
        x = (arr.astype(np.float64) / 2147483648.0).astype(np.float32)
    elif name == "s64":
        x = (arr.astype(np.float64) / 9223372036854775808.0).astype(np.float32)
    else:
        x = arr.astype(np.float32, copy=False)
    if ch == 1:
        return np.array(x[0], dtype=np.float32)
    if name == "dbl":
        return arr.mean(axis=0).astype(np.float32)
    return x.mean(axis=0, dtype=np.float32)


def _tail_check(f: Any, size: int, container: str) -> str | None:
    """Check the container's structure at the end of the file. Returns a warning (cut short / trailing bytes)
    or None. Reads a few small ranges only."""
    try:
        f.seek(0)
        head = f.read(16)
        if container in ("wav",) and head[:4] == b"RIFF" and head[8:12] == b"WAVE":
            declared = struct.unpack("<I", head[4:8])[0] + 8
            return _size_verdict(size, declared, "RIFF")
        if container in ("aiff",) and head[:4] == b"FORM":
            declared = struct.unpack(">I", head[4:8])[0] + 8
            return _size_verdict(size, declared, "AIFF FORM")
        if container.startswith("mov") or "mp4" in container:
            return _walk_boxes(f, size)
        if container == "asf":
            return _walk_asf(f, size)
        if container == "ogg":
            return _ogg_tail(f, size)
    except Exception as exc:  # a failed structure check is a warning, never a failure
        return f"could not check the end of the file ({type(exc).__name__})"
    return None


def _size_verdict(size: int, declared: int, what: str) -> str | None:
    if size < declared:
        return f"the file is cut short: its {what} header declares {declared} bytes, the file has {size}"
    if size > declared + 1:  # one pad byte is legal
        return (
            f"{size - declared} bytes of other data follow the audio (the {what} header declares {declared})"
        )
    return None


def _walk_boxes(f: Any, size: int) -> str | None:
    pos = 0
    for _ in range(10000):
        if pos == size:
            return None
        if size - pos < 8:
            return f"{size - pos} bytes of other data follow the last MP4 box"
        f.seek(pos)
        hdr = f.read(16)
        box = struct.unpack(">I", hdr[:4])[0]
        kind = hdr[4:8]
        if not all(32 <= b < 127 for b in kind):
            return f"{size - pos} bytes of other data follow the last MP4 box"
        if box == 1:
            box = struct.unpack(">Q", hdr[8:16])[0]
        elif box == 0:
            return None  # extends to the end of the file
        if box < 8:
            return f"{size - pos} bytes of other data follow the last MP4 box"
        if pos + box > size:
            return f"the file is cut short inside its {kind.decode('ascii', 'replace')!r} box"
        pos += box
    return None


def _walk_asf(f: Any, size: int) -> str | None:
    pos = 0
    for _ in range(10000):
        if pos == size:
            return None
        if size - pos < 24:
            return f"{size - pos} bytes of other data follow the last ASF object"
        f.seek(pos)
        hdr = f.read(24)
        obj = struct.unpack("<Q", hdr[16:24])[0]
        if obj < 24 or obj > 1 << 48:
            return f"{size - pos} bytes of other data follow the last ASF object"
        if pos + obj > size:
            return "the file is cut short inside an ASF object"
        pos += obj
    return None


def _ogg_tail(f: Any, size: int) -> str | None:
    span = min(size, 65536 + 27 + 255)
    f.seek(size - span)
    tail = f.read(span)
    i = tail.rfind(b"OggS")
    while i >= 0:  # the last capture pattern that starts a parseable page header
        if len(tail) - i < 27 or len(tail) - i < 27 + tail[i + 26]:
            return "the file is cut short: its last Ogg page is incomplete"
        nseg = tail[i + 26]
        if tail[i + 4] == 0:  # stream structure version 0: a real page header
            end = i + 27 + nseg + sum(tail[i + 27 : i + 27 + nseg])
            if end > len(tail):
                return "the file is cut short: its last Ogg page is incomplete"
            if end < len(tail):
                return f"{len(tail) - end} bytes of other data follow the last Ogg page"
            if tail[i + 5] & 0x04:
                return None
            return "the file is cut short: the Ogg stream ends without its end-of-stream page"
        i = tail.rfind(b"OggS", 0, i)
    return "the file is cut short or damaged: no complete Ogg page at its end"


class _DemuxerIO:
    """The file object FFmpeg reads through (PyAV calls read/seek/tell from the demuxer): it keeps what the
    STORAGE layer failed at apart from what the DEMUXER asked for wrongly.

    - A seek before the start of the file (or with an unknown `whence`) is an invalid request: it raises
      InvalidRequest and is remembered in `invalid`; it never reaches the storage layer.
    - A seek at or past the end (a damaged header's object size, say) is answered here: the position moves, reads
      there return b"" (end of file), as a local file does; it never reaches the storage layer either (a local
      lseek past the filesystem's largest offset fails with EINVAL, an object store would fetch nothing).
    - An exception of the underlying read or seek is the storage layer's: it is remembered in `storage_failure`
      and re-raised.

    PyAV keeps only one of the exceptions its callbacks raise (and may report an FFmpegError instead), so the
    decoder classifies a failure by what was remembered here, not by the exception that came out of av.
    """

    def __init__(self, f: Any, size: int):
        self._f = f
        self.size = size
        self._pos = 0
        self.invalid: str | None = None  # the first invalid request the demuxer made
        self.past_end: int | None = None  # the farthest offset past the end it asked for
        self.storage_failure: BaseException | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence not in (0, 1, 2):
            self.invalid = self.invalid or f"a seek with whence={whence!r}"
            raise InvalidRequest(self.invalid)
        target = offset + (0, self._pos, self.size)[whence]
        if target < 0:
            self.invalid = self.invalid or f"a seek to byte {target} (before the start of the file)"
            raise InvalidRequest(self.invalid)
        if target >= self.size:
            if target > self.size:
                self.past_end = max(self.past_end or 0, target)
            self._pos = target
            return target
        try:
            self._f.seek(target)
        except Exception as exc:
            self.storage_failure = self.storage_failure or exc
            raise
        self._pos = target
        return target

    def read(self, n: int = -1) -> bytes:
        if self._pos >= self.size:
            return b""
        try:
            data = self._f.read(n)
        except Exception as exc:
            self.storage_failure = self.storage_failure or exc
            raise
        self._pos += len(data)
        return data


class InvalidRequest(Exception):
    """The demuxer asked _DemuxerIO for something no file can give (a seek before the start)."""


def _io_fault(uri: str, io: _DemuxerIO, exc: BaseException, codec: str | None) -> InputFault:
    """A failure that came out of PyAV while it read through `io`, classified by where it really happened.

    Only a failed read or seek of the storage layer is a storage fault (transient when the storage layer says so:
    timeouts, resets, throttling, EIO); one that failed with EINVAL was an impossible request of the demuxer.
    An invalid request, and anything FFmpeg itself reports, is a DecodeError (permanent).
    """
    import errno

    import av

    failure = io.storage_failure
    if failure is not None and not (isinstance(failure, OSError) and failure.errno == errno.EINVAL):
        return storage_fault(uri, failure)
    where = f" ({codec} decoder)" if codec else ""
    hint = "the file is damaged or not in an audio format FFmpeg reads; re-export or replace it"
    if io.invalid is not None or failure is not None:
        what = io.invalid or f"a request the {'file' if failure is None else 'storage'} refused ({failure})"
        return DecodeError(uri, f"cannot decode: the demuxer made an invalid request: {what}{where}", hint)
    if isinstance(exc, av.FFmpegError):
        fault = _av_fault(uri, exc, codec)
    else:
        fault = DecodeError(uri, f"cannot decode: {type(exc).__name__}: {exc}{where}", hint)
    if io.past_end is not None:
        fault = DecodeError(
            uri,
            f"{fault.cause}; its headers point past the end of the file (to byte {io.past_end}; the file has "
            f"{io.size})",
            fault.hint,
        )
    return fault


def _open_input(uri: str, storage_options: dict | None) -> tuple[Any, int]:
    """Open `uri` as a seekable binary stream through fsspec. Returns (file object, size in bytes)."""
    try:
        fs, path = get_fs(uri, storage_options)
        f = fs.open(path, "rb", block_size=READ_BLOCK_BYTES)
    except ImportError:
        raise
    except Exception as exc:  # every storage failure becomes a classified fault
        raise storage_fault(uri, exc) from None
    try:
        size = getattr(f, "size", None)
        if size is None:
            size = f.seek(0, 2)
            f.seek(0)
        return f, int(size)
    except Exception as exc:
        f.close()
        raise storage_fault(uri, exc) from None


class LocalDecoder:
    """Decode one input in this process: `info` after construction, then `chunks()` of (n,) float32 mono at the
    SOURCE rate (about `chunk_s` seconds each); when the chunks are exhausted `info.duration_s`, `truncated` and
    `warning` are final. Raises InputFault subclasses at construction or during iteration.

    This is what the DecoderProcess child runs; read_segments(isolate=False) runs it directly.
    """

    def __init__(
        self,
        uri: str,
        storage_options: dict | None = None,
        chunk_s: float = 2.0,
        time_limit_s: float | None = None,
    ):
        import av
        import av.logging

        self.uri = uri
        self.chunk_s = chunk_s
        self.time_limit_s = time_limit_s
        self._t0 = time.monotonic()
        self._file, self._size = _open_input(uri, storage_options)
        self._io = _DemuxerIO(self._file, self._size)
        self._container = None
        try:
            if self._size == 0:
                raise EmptyAudio(uri, "the file is empty (0 bytes)", "re-upload or remove it")
            try:
                self._container = av.open(self._io, mode="r", metadata_errors="ignore")
            except InputFault:
                raise
            except Exception as exc:  # FFmpeg's error, or one of its I/O callbacks': classified
                raise _io_fault(uri, self._io, exc, None) from None
            streams = self._container.streams.audio
            if not streams:
                kinds: list[str] = sorted({str(s.type) for s in self._container.streams}) or ["none"]
                raise NoAudioStream(
                    uri,
                    f"no audio stream in the {self._container.format.name} file "
                    f"(streams: {', '.join(kinds)})",
                    "it is not an audio file; remove it",
                )
            self._stream = streams[0]
            cc = self._stream.codec_context
            cc.thread_count = 1  # one core per decode; no FFmpeg threads calling back into Python
            rate = int(cc.sample_rate or self._stream.rate or 0)
            channels = int(cc.channels or 0)
            if channels in _NATIVE_LAYOUTS:
                # PyAV 18 double-frees custom-order channel layouts (e.g. 8-channel AIFF) as soon as one is read:
                # give the decoder a native layout with the same channel count (order is irrelevant to the mean)
                cc.layout = _NATIVE_LAYOUTS[channels]
            if rate <= 0 or channels <= 0:
                raise DecodeError(
                    uri,
                    f"cannot decode: the audio stream declares {rate} Hz and {channels} channels "
                    f"({cc.name} decoder)",
                    "the header is damaged; re-export the file",
                )
            if not MIN_SOURCE_RATE_HZ <= rate <= MAX_SOURCE_RATE_HZ:
                raise DecodeError(
                    uri,
                    f"cannot decode: the audio stream declares a sample rate of {rate} Hz, outside the "
                    f"{MIN_SOURCE_RATE_HZ}-{MAX_SOURCE_RATE_HZ} Hz that real recordings use ({cc.name} decoder)",
                    "the header is damaged or the file is not a recording; re-export it at a standard rate "
                    "(e.g. 44100 or 48000 Hz), or remove it",
                )
            self._declared = None
            if self._stream.duration and self._stream.time_base:
                self._declared = float(self._stream.duration * self._stream.time_base)
            elif self._container.duration:
                self._declared = self._container.duration / 1_000_000
            self.info = SourceInfo(
                uri=uri,
                sample_rate=rate,
                channels=channels,
                codec=cc.name,
                container=self._container.format.name,
                duration_s=None,
            )
        except BaseException:
            self.close()
            raise

    def _check_time(self) -> None:
        if self.time_limit_s is not None and time.monotonic() - self._t0 > self.time_limit_s:
            raise DecodeTimeout(
                self.uri,
                f"decoding took longer than the limit of {self.time_limit_s:g} s",
                "raise the decode time limit, or check the file",
            )

    def chunks(self) -> Iterator[np.ndarray]:
        """(n,) float32 mono chunks at info.sample_rate; sets info.duration_s/truncated/warning at the end."""
        import av
        import av.logging

        uri, info = self.uri, self.info
        target = max(1, int(self.chunk_s * info.sample_rate))
        pending: list[np.ndarray] = []
        n_pending = 0
        total = 0
        error: BaseException | None = None
        logged: list[str] = []
        level = av.logging.get_level()
        av.logging.set_level(av.logging.ERROR)
        try:
            with av.logging.Capture() as logs:
                if self._container is None:
                    raise RuntimeError(f"{uri}: chunks() after close()")
                demux = self._container.demux(self._stream)
                while True:
                    try:
                        packet = next(demux)
                        frames = list(packet.decode())
                    except StopIteration:
                        break
                    except (InputFault, MemoryError):
                        raise
                    except Exception as exc:  # FFmpeg's error, or one of its I/O callbacks'
                        fault = _io_fault(uri, self._io, exc, info.codec)
                        if not isinstance(fault, DecodeError):
                            raise fault from None  # the storage layer failed: not the content's fault
                        error = exc
                        break
                    for frame in frames:
                        x = _frame_to_mono(frame)
                        if not np.isfinite(x).all():
                            bad = total + n_pending + int(np.argmin(np.isfinite(x)))
                            raise NonFiniteAudio(
                                uri,
                                f"non-finite samples (NaN or inf) at {bad / info.sample_rate:.3f} s",
                                "the file's float samples are corrupt; re-export it",
                            )
                        pending.append(x)
                        n_pending += x.size
                    if n_pending >= target:
                        chunk = np.concatenate(pending) if len(pending) > 1 else pending[0]
                        pending, n_pending = [], 0
                        total += chunk.size
                        self._check_time()
                        yield chunk
                # flush the decoder (frames held back by codec delay)
                if error is None:
                    try:
                        for frame in self._stream.decode(None):
                            x = _frame_to_mono(frame)
                            if np.isfinite(x).all():
                                pending.append(x)
                                n_pending += x.size
                    except av.FFmpegError:
                        pass
                logged = [str(m[2]).strip() for m in logs if m[0] <= av.logging.ERROR]
        finally:
            av.logging.set_level(level)
        if pending:
            chunk = np.concatenate(pending) if len(pending) > 1 else pending[0]
            total += chunk.size
            yield chunk
        info.duration_s = total / info.sample_rate
        reasons: list[str] = []
        if error is not None:
            if total == 0:
                raise _io_fault(uri, self._io, error, info.codec)
            text = _io_fault(uri, self._io, error, None).cause.removeprefix("cannot decode: ")
            reasons.append(f"decoding stopped at {info.duration_s:.2f} s: {text} ({info.codec} decoder)")
        if total == 0:
            if logged:
                raise DecodeError(
                    uri,
                    f"cannot decode: {logged[0].lower()} ({info.codec} decoder)",
                    "the file is damaged or not audio; re-export or replace it",
                )
            raise EmptyAudio(uri, "the audio stream holds no samples", "re-export the file")
        if self._declared and info.duration_s < self._declared - max(
            _SHORTFALL_S, _SHORTFALL_FRAC * self._declared
        ):
            reasons.append(f"decoded {info.duration_s:.2f} s of the {self._declared:.2f} s the file declares")
        tail = _tail_check(self._file, self._size, info.container)
        if tail:
            reasons.append(tail)
        if logged and error is None:
            uniq = list(dict.fromkeys(logged))
            reasons.append(f"the decoder reported errors: {'; '.join(uniq[:3])}")
        if reasons:
            info.truncated = True
            info.warning = f"{uri}: kept the {info.duration_s:.2f} s that decoded; " + "; ".join(reasons)

    def close(self) -> None:
        if self._container is not None:
            try:
                self._container.close()
            except Exception:
                pass
            self._container = None
        if self._file is not None:
            try:
                self._file.close()
            except Exception:
                pass
            self._file = None


# ---------------------------------------------------------------------------------------------------- segments


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
            resampler = StreamResampler(self.info.sample_rate, self.sample_rate)
            segmenter = Segmenter(self.sample_rate, self.segment_config)
            for chunk in self._source.chunks():
                for seg in segmenter.push(resampler.push(chunk)):
                    self.num_segments += 1
                    yield seg
            self.info = self._source.info
            for seg in segmenter.push(resampler.flush()) + segmenter.finish():
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
    (mean over channels), resampled to `sample_rate` Hz, cut by `segments` (pipeline.segments rule).

    The input is streamed (never read whole); decoding proceeds `chunk_s` seconds at a time, so memory is bounded
    by a few windows. isolate=True decodes in `decoder` (default: this thread's shared DecoderProcess), where a
    crash becomes DecoderCrashed and a stall or more than `time_limit_s` seconds of decoding DecodeTimeout.
    Raises InputFault subclasses at open; the stream raises them during iteration.
    """
    source: Any  # the child's _RemoteSource, or a LocalDecoder: the same .info/.chunks()/.close()
    if isolate:
        from pipeline.decoder import default_decoder

        dec = decoder if decoder is not None else default_decoder()
        source = dec.open(uri, storage_options=storage_options, time_limit_s=time_limit_s, chunk_s=chunk_s)
    else:
        source = LocalDecoder(uri, storage_options, chunk_s=chunk_s, time_limit_s=time_limit_s)
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
        from pipeline.decoder import default_decoder

        source: Any = default_decoder().open(uri, storage_options=storage_options, time_limit_s=time_limit_s)
    else:
        source = LocalDecoder(uri, storage_options, time_limit_s=time_limit_s)
    try:
        rate = sample_rate or source.info.sample_rate
        resampler = StreamResampler(source.info.sample_rate, rate)
        parts = [resampler.push(c) for c in source.chunks()]
        parts.append(resampler.flush())
        info = source.info
    finally:
        source.close()
    return np.concatenate(parts).astype(np.float32, copy=False), info

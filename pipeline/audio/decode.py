"""Decoding in this process: open an input through fsspec, decode it with PyAV incrementally, downmix to mono
(straight into the chunk being filled) and resample to the model's rate as it decodes (LocalDecoder), with what
decoded described by SourceInfo.

Where a failure happened decides its kind: FFmpeg reads through container.DemuxerIO, so only a read or seek that the
STORAGE layer failed is a storage fault (transient or not, as pipeline.storage.storage_fault says); an impossible
request of the demuxer (a header whose sizes point outside the file) and whatever FFmpeg reports are permanent
`decode` faults, as is a header declaring a source rate outside MIN_SOURCE_RATE_HZ..MAX_SOURCE_RATE_HZ.

A file whose audio is cut short or followed by other bytes keeps what decoded: SourceInfo.truncated is True and
SourceInfo.warning says why. Signals checked: a decode error after some audio; errors the demuxer or decoder
reports; a decoded duration shorter than the container declares; and the container's own structure at the end of
the file (pipeline.audio.container).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.audio.container import DemuxerIO, av_open, open_input, tail_check
from pipeline.audio.resample import StreamResampler
from pipeline.errors import DecodeError, DecodeTimeout, EmptyAudio, InputFault, NoAudioStream, NonFiniteAudio
from pipeline.storage import storage_fault

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


# PyAV sample formats the fast downmix handles (1 or 2 channels): numpy dtype and the scale to [-1, 1]
_FAST_FORMATS = {"flt": (np.float32, None), "s16": (np.int16, 2.0**-15), "s32": (np.int32, 2.0**-31)}


def downmix_into(frame: Any, out: np.ndarray) -> None:
    """A PyAV AudioFrame's mono mix (mean over channels, integers scaled to [-1, 1]) written into `out`
    ((frame.samples,) float32), in one or two numpy passes over the frame's planes.

    Mono and stereo float32, int16 and int32 frames (what the MP3, AAC, Vorbis, Opus and FLAC decoders and most
    WAVs give) take the fast path; its result is bit for bit _frame_to_mono's (tested): the sum of two scaled
    integers is exact in float32, and scaling by a power of two commutes with rounding. Anything else goes
    through _frame_to_mono.
    """
    fmt = frame.format
    n = frame.samples
    ch = frame.layout.nb_channels
    fast = _FAST_FORMATS.get(fmt.packed.name) if ch <= 2 else None
    if fast is None:
        out[:] = _frame_to_mono(frame)
        return
    dtype, scale = fast
    if fmt.is_planar:
        planes = [np.frombuffer(frame.planes[c], dtype=dtype, count=n) for c in range(ch)]
    else:
        interleaved = np.frombuffer(frame.planes[0], dtype=dtype, count=n * ch)
        planes = [interleaved[c::ch] for c in range(ch)]
    if ch == 1:
        out[:] = planes[0]
    elif scale is None:  # float stereo: +0.0 first, so that -0.0 + -0.0 gives +0.0 as the mean does
        np.add(planes[0], 0.0, out=out)
        out += planes[1]
        scale = 0.5
    else:
        np.add(planes[0], planes[1], out=out, dtype=np.float32)
        scale *= 0.5
    if scale is not None:
        out *= np.float32(scale)


def _io_fault(uri: str, io: DemuxerIO, exc: BaseException, codec: str | None) -> InputFault:
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


def _grown(buf: np.ndarray, used: int, need: int) -> np.ndarray:
    """`buf` with room for `need` samples, its first `used` kept."""
    new = np.empty(max(need, 2 * buf.size), dtype=np.float32)
    new[:used] = buf[:used]
    return new


class LocalDecoder:
    """Decode one input in this process: `info` after construction, then `chunks()` of (n,) float32 mono at
    `rate` Hz (about `chunk_s` seconds of source audio each): `sample_rate` (resampled by StreamResampler as they
    are decoded), or the source rate when it is None. When the chunks are exhausted `info.duration_s`,
    `truncated` and `warning` are final. Raises InputFault subclasses at construction or during iteration.

    This is what the decoder child (pipeline.audio.isolate) runs; read_segments(isolate=False) runs it here.
    """

    def __init__(
        self,
        uri: str,
        storage_options: dict | None = None,
        chunk_s: float = 2.0,
        time_limit_s: float | None = None,
        sample_rate: int | None = None,
    ):
        if sample_rate is not None and not (isinstance(sample_rate, int) and sample_rate > 0):
            raise ValueError(f"sample_rate={sample_rate!r}: must be a positive integer number of Hz, or None")
        self.uri = uri
        self.chunk_s = chunk_s
        self.time_limit_s = time_limit_s
        self._t0 = time.monotonic()
        self._file, self._size = open_input(uri, storage_options)
        self._io = DemuxerIO(self._file, self._size)
        self._container = None
        try:
            if self._size == 0:
                raise EmptyAudio(uri, "the file is empty (0 bytes)", "re-upload or remove it")
            try:
                self._container = av_open(self._io)
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
            self.rate = sample_rate or rate  # the rate of the chunks
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

    def chunks(self, *, borrow: bool = False) -> Iterator[np.ndarray]:
        """(n,) float32 mono chunks at `rate` Hz; sets info.duration_s/truncated/warning at the end. Each chunk is
        the caller's (`borrow` is accepted for the isolated source's signature and changes nothing here)."""
        if self.rate == self.info.sample_rate:
            yield from self._source_chunks()
            return
        resampler = StreamResampler(self.info.sample_rate, self.rate)
        for chunk in self._source_chunks():
            out = resampler.push(chunk)
            if out.size:
                yield out
        tail = resampler.flush()
        if tail.size:
            yield tail

    def _source_chunks(self) -> Iterator[np.ndarray]:
        """(n,) float32 mono chunks at info.sample_rate; sets info.duration_s/truncated/warning at the end."""
        import av
        import av.logging

        uri, info = self.uri, self.info
        target = max(1, int(self.chunk_s * info.sample_rate))
        buf = np.empty(
            target + 8192, dtype=np.float32
        )  # the chunk being filled: frames are mixed straight in
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
                        if n_pending + frame.samples > buf.size:
                            buf = _grown(buf, n_pending, n_pending + frame.samples)
                        downmix_into(frame, buf[n_pending : n_pending + frame.samples])
                        n_pending += frame.samples
                    if n_pending >= target:
                        chunk = buf[:n_pending]
                        self._check_finite(chunk, total)
                        buf, n_pending = np.empty(target + 8192, dtype=np.float32), 0
                        total += chunk.size
                        self._check_time()
                        yield chunk
                if n_pending:
                    self._check_finite(buf[:n_pending], total)
                # flush the decoder (frames held back by codec delay)
                if error is None:
                    try:
                        for frame in self._stream.decode(None):
                            x = _frame_to_mono(frame)
                            if np.isfinite(x).all():
                                if n_pending + x.size > buf.size:
                                    buf = _grown(buf, n_pending, n_pending + x.size)
                                buf[n_pending : n_pending + x.size] = x
                                n_pending += x.size
                    except av.FFmpegError:
                        pass
                logged = [str(m[2]).strip() for m in logs if m[0] <= av.logging.ERROR]
        finally:
            av.logging.set_level(level)
        if n_pending:
            chunk = buf[:n_pending]
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
        tail = tail_check(self._file, self._size, info.container)
        if tail:
            reasons.append(tail)
        if logged and error is None:
            uniq = list(dict.fromkeys(logged))
            reasons.append(f"the decoder reported errors: {'; '.join(uniq[:3])}")
        if reasons:
            info.truncated = True
            info.warning = f"{uri}: kept the {info.duration_s:.2f} s that decoded; " + "; ".join(reasons)

    def _check_finite(self, chunk: np.ndarray, start: int) -> None:
        """Raise NonFiniteAudio naming the first NaN or inf of `chunk` (its first sample is sample `start`)."""
        finite = np.isfinite(chunk)
        if not finite.all():
            bad = start + int(np.argmin(finite))
            raise NonFiniteAudio(
                self.uri,
                f"non-finite samples (NaN or inf) at {bad / self.info.sample_rate:.3f} s",
                "the file's float samples are corrupt; re-export it",
            )

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

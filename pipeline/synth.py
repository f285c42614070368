"""Generated audio fixtures, encoded for real with PyAV: for tests, the demo mode and the benchmarks.

Signals are (channels, N) float32 arrays in [-1, 1] at a given sample rate (Hz). `write_audio` encodes them into
a real container/codec; combinations the bundled encoders cannot write raise ValueError naming them:

| fmt  | codec (container)   | rates (Hz)                      | channels | sample formats               |
|------|---------------------|---------------------------------|----------|------------------------------|
| wav  | pcm_* (wav)         | any                             | 1-8      | u8, s16, s24, s32, flt, dbl  |
| aiff | pcm_*be (aiff)      | any                             | 1-8      | s16, s24, s32, flt           |
| flac | flac (flac)         | any <= 655350                   | 1-8      | s16, s24                     |
| mp3  | libmp3lame (mp3)    | 8k-48k (MPEG rates)             | 1-2      |                              |
| ogg  | vorbis (ogg)        | any                             | 2 only (experimental encoder)|                  |
| opus | libopus (ogg)       | 8k, 12k, 16k, 24k, 48k          | 1-8      |                              |
| m4a  | aac (ipod, faststart) | 7.35k-96k (MPEG-4 rates)      | 1-8      |                              |
| wma  | wmav2 (asf)         | <= 48k                          | 1-2      |                              |
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

# fmt -> (container format, codec name)
FORMATS: dict[str, tuple[str, str]] = {
    "wav": ("wav", "pcm_s16le"),
    "aiff": ("aiff", "pcm_s16be"),
    "flac": ("flac", "flac"),
    "mp3": ("mp3", "libmp3lame"),
    "ogg": ("ogg", "vorbis"),
    "opus": ("ogg", "libopus"),
    "m4a": ("ipod", "aac"),
    "wma": ("asf", "wmav2"),
}

_WAV_CODECS = {
    "u8": "pcm_u8",
    "s16": "pcm_s16le",
    "s24": "pcm_s24le",
    "s32": "pcm_s32le",
    "flt": "pcm_f32le",
    "dbl": "pcm_f64le",
}
_AIFF_CODECS = {"s16": "pcm_s16be", "s24": "pcm_s24be", "s32": "pcm_s32be", "flt": "pcm_f32be"}
_FLAC_FORMATS = {"s16": "s16", "s24": "s32"}

_MPEG_RATES = {8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000}
_AAC_RATES = {7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000}
_OPUS_RATES = {8000, 12000, 16000, 24000, 48000}

LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}

EXTENSIONS = {
    "wav": ".wav",
    "aiff": ".aiff",
    "flac": ".flac",
    "mp3": ".mp3",
    "ogg": ".ogg",
    "opus": ".opus",
    "m4a": ".m4a",
    "wma": ".wma",
}


def _layout(fmt: str, channels: int) -> str:
    """The channel layout name used for `channels` channels (libopus wants 3.0, not 2.1, for 3 channels)."""
    if fmt == "opus" and channels == 3:
        return "3.0"
    return LAYOUTS[channels]


def tone(
    freq_hz: float, duration_s: float, sample_rate: int, channels: int = 1, amplitude: float = 0.5
) -> np.ndarray:
    """A sine of `freq_hz` Hz lasting `duration_s` seconds: (channels, round(duration_s*sample_rate)) float32."""
    n = int(round(duration_s * sample_rate))
    t = np.arange(n, dtype=np.float64) / sample_rate
    x = (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)
    return np.repeat(x[None, :], channels, axis=0)


def music_like(duration_s: float, sample_rate: int, channels: int = 2, seed: int = 0) -> np.ndarray:
    """A music-like signal: (channels, round(duration_s*sample_rate)) float32 in [-1, 1].

    Chords of notes with a few harmonics and attack/decay envelopes, one note every ~0.25-0.5 s, drum-like
    noise transients on a beat grid, a little background noise; channels differ slightly (panning, phase).
    """
    rng = np.random.default_rng(seed)
    n = int(round(duration_s * sample_rate))
    out = np.zeros((channels, n), dtype=np.float32)
    if n == 0:
        return out
    t_all = np.arange(n, dtype=np.float64) / sample_rate
    nyq = sample_rate / 2
    # notes: chord tones from a random key, each a few harmonics under an exponential envelope
    root = 110.0 * 2 ** (rng.integers(0, 12) / 12)
    scale = np.array([0, 2, 4, 5, 7, 9, 11])
    pos = 0.0
    while pos < duration_s:
        dur = float(rng.uniform(0.25, 0.6))
        i0 = int(pos * sample_rate)
        i1 = min(n, int((pos + dur * 2.0) * sample_rate))  # notes ring past their slot
        if i1 > i0:
            t = t_all[i0:i1] - pos
            env = (1 - np.exp(-t / 0.01)) * np.exp(-t / (0.3 * dur + 0.05))
            degree = scale[rng.integers(0, 7, size=3)] + 12 * rng.integers(0, 3, size=3)
            for d in degree:
                f0 = root * 2 ** (d / 12)
                note = np.zeros_like(t)
                for h in range(1, 5):
                    if f0 * h < nyq * 0.9:
                        note += np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi)) / h
                sig = (0.12 * env * note).astype(np.float32)
                pan = rng.uniform(0.3, 1.0, size=channels).astype(np.float32)
                out[:, i0:i1] += pan[:, None] * sig[None, :]
        pos += dur
    # drums: decaying noise bursts on a beat grid
    beat = 60.0 / float(rng.uniform(90, 140))
    k = 0
    while k * beat < duration_s:
        i0 = int(k * beat * sample_rate)
        i1 = min(n, i0 + int(0.08 * sample_rate))
        if i1 > i0:
            t = t_all[i0:i1] - k * beat
            burst = (rng.standard_normal(i1 - i0) * np.exp(-t / 0.02) * 0.25).astype(np.float32)
            out[:, i0:i1] += burst[None, :]
        k += 1
    out += (0.005 * rng.standard_normal((channels, n))).astype(np.float32)
    peak = float(np.max(np.abs(out)))
    if peak > 0.95:
        out *= 0.95 / peak
    return out


def _check_combo(
    fmt: str, sample_rate: int, channels: int, sample_format: str | None
) -> tuple[str, str, str | None]:
    """(container, codec, PyAV sample format or None) or ValueError naming what the encoder cannot write."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r}: unknown; one of {sorted(FORMATS)}")
    if not (1 <= channels <= 8):
        raise ValueError(f"channels={channels}: 1 to 8 supported")
    container, codec = FORMATS[fmt]
    av_fmt: str | None = None

    def refuse(why: str) -> ValueError:
        return ValueError(
            f"{fmt} ({codec}) cannot write {sample_rate} Hz x {channels} ch"
            f"{' ' + sample_format if sample_format else ''}: {why}"
        )

    if sample_format is not None and fmt not in ("wav", "aiff", "flac"):
        raise refuse("sample_format applies to wav, aiff and flac only")
    if fmt == "wav":
        sf = sample_format or "s16"
        if sf not in _WAV_CODECS:
            raise refuse(f"WAV sample formats are {sorted(_WAV_CODECS)}")
        codec = _WAV_CODECS[sf]
    elif fmt == "aiff":
        sf = sample_format or "s16"
        if sf not in _AIFF_CODECS:
            raise refuse(f"AIFF sample formats are {sorted(_AIFF_CODECS)}")
        codec = _AIFF_CODECS[sf]
    elif fmt == "flac":
        sf = sample_format or "s16"
        if sf not in _FLAC_FORMATS:
            raise refuse(f"FLAC sample formats are {sorted(_FLAC_FORMATS)}")
        av_fmt = _FLAC_FORMATS[sf]
        if sample_rate > 655350:
            raise refuse("FLAC rates stop at 655350 Hz")
    elif fmt == "mp3":
        if sample_rate not in _MPEG_RATES:
            raise refuse(f"MP3 rates are {sorted(_MPEG_RATES)}")
        if channels > 2:
            raise refuse("MP3 has at most 2 channels")
    elif fmt == "ogg":
        if channels != 2:
            raise refuse("the bundled Vorbis encoder is experimental and writes stereo only")
    elif fmt == "opus":
        if sample_rate not in _OPUS_RATES:
            raise refuse(f"Opus rates are {sorted(_OPUS_RATES)}")
    elif fmt == "m4a":
        if sample_rate not in _AAC_RATES:
            raise refuse(f"AAC rates are {sorted(_AAC_RATES)}")
    elif fmt == "wma":
        if sample_rate > 48000:
            raise refuse("WMA rates stop at 48000 Hz")
        if channels > 2:
            raise refuse("WMA writes 1 or 2 channels")
    return container, codec, av_fmt


def _to_frame_array(x: np.ndarray, fmt_name: str, planar: bool) -> np.ndarray:
    """(channels, n) float32 in [-1, 1] -> the ndarray av.AudioFrame.from_ndarray expects for `fmt_name`."""
    if not fmt_name.startswith(("flt", "dbl")):
        x = np.clip(
            x, -1.0, 1.0
        )  # float formats pass through unchanged (NaN/inf fixtures stay what they are)
    if fmt_name.startswith("u8"):
        y = np.round(x * 127.0 + 128.0).astype(np.uint8)
    elif fmt_name.startswith("s16"):
        y = np.round(x * 32767.0).astype(np.int16)
    elif fmt_name.startswith("s32"):
        y = np.round(x.astype(np.float64) * 2147483647.0).astype(np.int32)
    elif fmt_name.startswith("flt"):
        y = x.astype(np.float32)
    elif fmt_name.startswith("dbl"):
        y = x.astype(np.float64)
    else:
        raise ValueError(f"sample format {fmt_name!r} not supported by the fixture writer")
    if planar:
        return np.ascontiguousarray(y)
    return np.ascontiguousarray(y.T).reshape(1, -1)  # packed: one interleaved plane


def encode_chunks(
    path: str | Path,
    chunks: Iterable[np.ndarray],
    sample_rate: int,
    channels: int,
    fmt: str,
    *,
    sample_format: str | None = None,
) -> Path:
    """Encode (channels, n) float32 chunks, one after another, into `path` as `fmt` (see the module table).

    Memory stays at one chunk: use it to write long files (e.g. a 60-minute WAV) without holding them.
    """
    import av

    container_fmt, codec, av_fmt = _check_combo(fmt, sample_rate, channels, sample_format)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"movflags": "+faststart"} if container_fmt == "ipod" else {}
    with av.open(str(path), mode="w", format=container_fmt, options=options) as out:
        stream: Any = out.add_stream(codec, rate=sample_rate)  # an AudioStream (PyAV's union type)
        cc = stream.codec_context
        cc.layout = _layout(fmt, channels)
        if av_fmt is not None:
            cc.format = av_fmt
        # FLAC from s32 frames: FFmpeg's encoder writes 24 bits per sample (FLAC's integer limit here)
        if fmt == "ogg":
            cc.options = {"strict": "experimental"}
        if fmt == "wma":
            cc.bit_rate = (32000 if sample_rate <= 22050 else 64000) * channels  # wmav2 has no default rate
        # feed packed frames (PyAV converts to the encoder's format): PyAV cannot build planar 8-channel frames
        frame_fmt = cc.format.packed.name
        planar = False
        pts = 0
        for chunk in chunks:
            chunk = np.asarray(chunk, dtype=np.float32)
            if chunk.ndim != 2 or chunk.shape[0] != channels:
                raise ValueError(f"chunk shape {chunk.shape}: expected ({channels}, n)")
            step = 4096
            for i in range(0, chunk.shape[1], step):
                part = chunk[:, i : i + step]
                frame = av.AudioFrame.from_ndarray(
                    _to_frame_array(part, frame_fmt, planar), format=frame_fmt, layout=_layout(fmt, channels)
                )
                frame.sample_rate = sample_rate
                frame.pts = pts
                pts += part.shape[1]
                for packet in stream.encode(frame):
                    out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def write_audio(
    path: str | Path, samples: np.ndarray, sample_rate: int, fmt: str, *, sample_format: str | None = None
) -> Path:
    """Encode (channels, N) float32 `samples` in [-1, 1] at `sample_rate` Hz into `path` as `fmt`.

    fmt: wav, flac, mp3, ogg (Vorbis), opus, m4a (AAC), aiff, wma. sample_format (wav: u8, s16, s24, s32, flt,
    dbl; aiff: s16, s24, s32, flt; flac: s16, s24). Raises ValueError for a combination the encoder cannot write.
    """
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 1:
        samples = samples[None, :]
    return encode_chunks(path, [samples], sample_rate, samples.shape[0], fmt, sample_format=sample_format)


def can_write(fmt: str, sample_rate: int, channels: int, sample_format: str | None = None) -> bool:
    """Whether `write_audio` can write this combination."""
    try:
        _check_combo(fmt, sample_rate, channels, sample_format)
    except ValueError:
        return False
    return True


def long_music_chunks(
    duration_s: float, sample_rate: int, channels: int, chunk_s: float = 10.0, seed: int = 0
) -> Iterator[np.ndarray]:
    """(channels, n) chunks adding up to `duration_s` seconds of music-like audio; one chunk of music is generated
    and then varied cheaply (gain, circular shift), so an hour takes seconds to make."""
    total = int(round(duration_s * sample_rate))
    step = max(1, int(round(chunk_s * sample_rate)))
    base = music_like(step / sample_rate, sample_rate, channels, seed=seed)
    rng = np.random.default_rng(seed + 1)
    done = 0
    while done < total:
        n = min(step, total - done)
        shift = int(rng.integers(0, step))
        yield (np.roll(base, shift, axis=1)[:, :n] * np.float32(rng.uniform(0.6, 1.0))).astype(np.float32)
        done += n


def write_corpus(
    folder: str | Path,
    n: int,
    formats: tuple[str, ...] = ("wav", "flac", "mp3", "ogg", "opus", "m4a"),
    durations: tuple[float, ...] = (20.0, 7.0, 31.0, 3.5),
    seed: int = 0,
    sample_rate: int = 48000,
) -> list[Path]:
    """Write `n` music-like files into `folder`, cycling through `formats` and `durations` (seconds), stereo at
    `sample_rate` Hz (Opus/MP3 need a rate they support: the default 48 kHz works for every format)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        fmt = formats[i % len(formats)]
        dur = durations[i % len(durations)]
        x = music_like(dur, sample_rate, channels=2, seed=seed + i)
        paths.append(write_audio(folder / f"track_{i:04d}{EXTENSIONS[fmt]}", x, sample_rate, fmt))
    return paths


PITCH_CLASSES: dict[str, float] = {"A3": 220.0, "C#4": 277.18, "E4": 329.63, "G4": 392.0, "B4": 493.88}


def labelled_tone(freq_hz: float, duration_s: float, sample_rate: int, seed: int = 0) -> np.ndarray:
    """One recording of the labelled corpus: (1, round(duration_s*sample_rate)) float32 in [-1, 1].

    A note at `freq_hz` (detuned by up to +-15 cents) with random harmonic weights, a random attack/decay envelope,
    a random level and a little noise: the pitch is what stays audible across recordings of one class.
    """
    rng = np.random.default_rng(seed)
    n = int(round(duration_s * sample_rate))
    t = np.arange(n, dtype=np.float64) / sample_rate
    f0 = freq_hz * 2 ** (float(rng.uniform(-15, 15)) / 1200)
    x = np.zeros(n)
    for h in range(1, 6):
        if f0 * h < 0.45 * sample_rate:
            x += float(rng.uniform(0.2, 1.0)) / h * np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi))
    env = (1 - np.exp(-t / float(rng.uniform(0.005, 0.05)))) * np.exp(-t / float(rng.uniform(0.8, 3.0)))
    x = x * env
    x *= float(rng.uniform(0.3, 0.8)) / max(float(np.max(np.abs(x))), 1e-9)
    x += 0.01 * rng.standard_normal(n)
    return np.clip(x, -1.0, 1.0).astype(np.float32)[None, :]


def write_labelled_corpus(
    folder: str | Path,
    classes: int = 4,
    per_class: int = 10,
    duration_s: float = 1.5,
    seed: int = 0,
    sample_rate: int = 24000,
    fmt: str = "wav",
    labels_name: str = "labels.csv",
) -> tuple[list[Path], Path]:
    """A corpus whose label is audible: `per_class` tones of each of `classes` pitch classes (PITCH_CLASSES).

    Writes `folder/<pitch>_<k>.<ext>` (mono, `duration_s` seconds at `sample_rate` Hz) and `folder/labels_name`, a
    CSV with `uri` (the absolute path) and `label` (the pitch class name). Returns (audio paths, labels path).
    """
    if not 2 <= classes <= len(PITCH_CLASSES):
        raise ValueError(f"classes={classes}: 2 to {len(PITCH_CLASSES)} pitch classes are available")
    if per_class < 1:
        raise ValueError(f"per_class={per_class}: must be at least 1")
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    paths, rows = [], []
    for c, (name, freq) in enumerate(list(PITCH_CLASSES.items())[:classes]):
        for k in range(per_class):
            x = labelled_tone(freq, duration_s, sample_rate, seed=seed + 1000 * c + k)
            path = write_audio(
                folder / f"{name.replace('#', 's')}_{k:03d}{EXTENSIONS[fmt]}", x, sample_rate, fmt
            )
            paths.append(path)
            rows.append((str(path), name))
    labels = folder / labels_name
    with open(labels, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["uri", "label"])
        writer.writerows(rows)
    return paths, labels

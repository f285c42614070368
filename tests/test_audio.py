"""The audio stage on real encoded files: decoding across formats/rates/channels, resampling, faults, truncation,
object storage through a real S3-protocol server, decoder isolation and the memory bound."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchaudio

from pipeline import synth
from pipeline.audio import (
    FAULT_ENV,
    DecoderProcess,
    StreamResampler,
    decode_audio,
    probe_duration,
    read_segments,
)
from pipeline.config import SegmentConfig
from pipeline.errors import (
    DecodeError,
    DecoderCrashed,
    DecodeTimeout,
    EmptyAudio,
    InputFault,
    InputNotFound,
    NoAudioStream,
    NonFiniteAudio,
    TooShort,
)

REPO = Path(__file__).resolve().parent.parent
LOSSY_TOL_S = 0.06  # encoder delay / padding of MP3, AAC, Opus, Vorbis, WMA


# ------------------------------------------------------------------------------------------------ resampling


@pytest.mark.parametrize(
    "orig, new",
    [
        (44100, 24000),
        (48000, 16000),
        (8000, 24000),
        (192000, 24000),
        (22050, 16000),
        (16000, 24000),
        (96000, 44100),
    ],
)
def test_piecewise_resampling_matches_whole_signal(orig: int, new: int) -> None:
    rng = np.random.default_rng(orig + new)
    x = synth.music_like(1.3, orig, channels=1, seed=3)[0]
    x[: orig // 10] += 0.2 * rng.standard_normal(orig // 10).astype(np.float32)
    whole = torchaudio.functional.resample(torch.from_numpy(x), orig, new).numpy()
    r = StreamResampler(orig, new)
    parts, pos = [], 0
    while pos < x.size:
        n = int(rng.choice([1, 3, 97, 1001, 4097, 12345]))
        parts.append(r.push(x[pos : pos + n]))
        pos += n
    parts.append(r.flush())
    piecewise = np.concatenate(parts)
    assert piecewise.shape == whole.shape
    assert np.max(np.abs(piecewise - whole)) < 1e-4


def test_resampler_identity_and_tiny_inputs() -> None:
    x = np.linspace(-1, 1, 1000, dtype=np.float32)
    r = StreamResampler(24000, 24000)
    np.testing.assert_array_equal(np.concatenate([r.push(x[:333]), r.push(x[333:]), r.flush()]), x)
    r = StreamResampler(44100, 24000)
    assert np.concatenate([r.push(np.zeros(0, np.float32)), r.flush()]).size == 0
    for n in (1, 5, 200):
        r = StreamResampler(44100, 24000)
        y = np.concatenate([r.push(np.ones(n, dtype=np.float32)), r.flush()])
        ref = torchaudio.functional.resample(torch.ones(n), 44100, 24000).numpy()
        assert y.shape == ref.shape
        np.testing.assert_allclose(y, ref, atol=1e-5)


@pytest.mark.parametrize(
    "orig, new, freq", [(44100, 24000, 1000.0), (8000, 24000, 440.0), (192000, 16000, 3000.0)]
)
def test_resampled_sine_keeps_its_frequency(tmp_path: Path, orig: int, new: int, freq: float) -> None:
    path = synth.write_audio(
        tmp_path / "sine.wav", synth.tone(freq, 2.0, orig), orig, "wav", sample_format="flt"
    )
    y, info = decode_audio(str(path), sample_rate=new)
    assert info.sample_rate == orig
    assert y.size == int(np.ceil(2.0 * new))
    spec = np.abs(np.fft.rfft(y * np.hanning(y.size)))
    peak_hz = np.argmax(spec) * new / y.size
    assert abs(peak_hz - freq) <= new / y.size
    assert np.max(np.abs(y[new // 10 : -new // 10])) == pytest.approx(0.5, abs=0.01)


# -------------------------------------------------------------------------------------------------- decoding

PCM_RATES = [8000, 16000, 22050, 44100, 48000, 96000, 192000]
PCM_CHANNELS = [1, 2, 6, 8]


def _check_decode(
    path: Path,
    fmt: str,
    rate: int,
    channels: int,
    duration: float,
    codec: str | None = None,
    tol: float | None = None,
) -> None:
    y, info = decode_audio(str(path))
    rate = 48000 if fmt == "opus" else rate  # FFmpeg's Opus decoder always outputs 48 kHz
    assert info.sample_rate == rate
    assert info.channels == channels
    if codec:
        assert info.codec == codec
    assert not info.truncated, info.warning
    if tol is None:
        tol = 1.5 / rate if fmt in ("wav", "aiff", "flac") else LOSSY_TOL_S
    assert abs(info.duration_s - duration) <= tol, (fmt, rate, channels, info.duration_s)
    assert y.size == round(info.duration_s * rate)
    assert np.isfinite(y).all() and np.max(np.abs(y)) > 0.01


@pytest.mark.parametrize("fmt", ["wav", "flac", "aiff"])
def test_lossless_formats_over_rates_and_channels(tmp_path: Path, fmt: str) -> None:
    codec = {"wav": "pcm_s16le", "flac": "flac", "aiff": "pcm_s16be"}[fmt]
    for i, rate in enumerate(PCM_RATES):
        for channels in PCM_CHANNELS:
            dur = 0.3
            x = synth.music_like(dur, rate, channels, seed=i)
            path = synth.write_audio(tmp_path / f"{rate}_{channels}{synth.EXTENSIONS[fmt]}", x, rate, fmt)
            _check_decode(path, fmt, rate, channels, dur, codec)
            # the mono mix is the mean over channels (lossless: exact up to 16-bit quantization)
            y, _ = decode_audio(str(path))
            np.testing.assert_allclose(y, x.mean(axis=0), atol=3e-4)


@pytest.mark.parametrize(
    "sample_format, codec",
    [
        ("u8", "pcm_u8"),
        ("s16", "pcm_s16le"),
        ("s24", "pcm_s24le"),
        ("s32", "pcm_s32le"),
        ("flt", "pcm_f32le"),
        ("dbl", "pcm_f64le"),
    ],
)
def test_every_wav_sample_format(tmp_path: Path, sample_format: str, codec: str) -> None:
    x = synth.music_like(0.5, 22050, 2, seed=1)
    path = synth.write_audio(tmp_path / "x.wav", x, 22050, "wav", sample_format=sample_format)
    y, info = decode_audio(str(path))
    assert (info.codec, info.sample_rate, info.channels, info.container) == (codec, 22050, 2, "wav")
    tol = {"u8": 1.5 / 128, "s16": 1e-4}.get(sample_format, 1e-6)
    np.testing.assert_allclose(y, x.mean(axis=0), atol=tol)


@pytest.mark.parametrize(
    "fmt, sample_format", [("aiff", "s24"), ("aiff", "s32"), ("aiff", "flt"), ("flac", "s24")]
)
def test_other_lossless_sample_formats(tmp_path: Path, fmt: str, sample_format: str) -> None:
    x = synth.music_like(0.5, 48000, 2, seed=2)
    path = synth.write_audio(
        tmp_path / f"x{synth.EXTENSIONS[fmt]}", x, 48000, fmt, sample_format=sample_format
    )
    y, info = decode_audio(str(path))
    np.testing.assert_allclose(y, x.mean(axis=0), atol=1e-5)


LOSSY = {
    "mp3": ("mp3float", [8000, 16000, 22050, 44100, 48000], [1, 2]),
    "ogg": ("vorbis", [16000, 44100, 48000, 96000], [2]),
    "opus": ("opus", [8000, 16000, 24000, 48000], [1, 2, 3, 6, 8]),
    "m4a": ("aac", [8000, 22050, 44100, 48000, 96000], [1, 2, 6, 8]),
    "wma": ("wmav2", [8000, 22050, 44100, 48000], [1, 2]),
}


@pytest.mark.parametrize("fmt", sorted(LOSSY))
def test_lossy_codecs_on_the_combinations_their_encoders_write(tmp_path: Path, fmt: str) -> None:
    codec, rates, channel_counts = LOSSY[fmt]
    for rate in rates:
        for channels in channel_counts:
            x = synth.music_like(1.0, rate, channels, seed=rate)
            path = synth.write_audio(tmp_path / f"{rate}_{channels}{synth.EXTENSIONS[fmt]}", x, rate, fmt)
            _check_decode(path, fmt, rate, channels, 1.0, codec)


@pytest.mark.parametrize(
    "fmt, rate, channels",
    [
        ("mp3", 96000, 2),
        ("mp3", 44100, 6),
        ("ogg", 48000, 1),
        ("opus", 44100, 2),
        ("m4a", 192000, 2),
        ("wma", 96000, 2),
        ("wma", 48000, 6),
        ("wav", 48000, 9),
    ],
)
def test_combinations_the_encoders_refuse_are_named(
    tmp_path: Path, fmt: str, rate: int, channels: int
) -> None:
    assert not synth.can_write(fmt, rate, channels)
    with pytest.raises(ValueError, match=fmt if channels <= 8 else "channels"):
        synth.write_audio(tmp_path / "x", np.zeros((channels, 100), np.float32), rate, fmt)


def test_planar_eight_channel_decode_reads_every_plane(tmp_path: Path) -> None:
    # AAC decodes to planar float; only the last channel carries a tone: the mono mix must be tone / 8
    x = np.zeros((8, 48000), np.float32)
    x[7] = synth.tone(1000.0, 1.0, 48000)[0]
    path = synth.write_audio(tmp_path / "8ch.m4a", x, 48000, "m4a")
    y, info = decode_audio(str(path))
    assert info.channels == 8
    rms = float(np.sqrt(np.mean(y[4800:-4800] ** 2)))
    assert rms == pytest.approx(0.5 / np.sqrt(2) / 8, rel=0.15)


def test_read_segments_cuts_resampled_mono_windows(tmp_path: Path) -> None:
    x = synth.music_like(12.0, 44100, 2, seed=5)
    path = synth.write_audio(tmp_path / "x.flac", x, 44100, "flac")
    cfg = SegmentConfig()
    for isolate in (False, True):
        with read_segments(
            str(path), sample_rate=24000, segments=cfg, isolate=isolate, chunk_s=0.7
        ) as stream:
            assert stream.info.sample_rate == 44100 and stream.info.codec == "flac"
            segs = list(stream)
        assert [(s.index, s.start_s, s.duration_s) for s in segs] == [
            (0, 0.0, 5.0),
            (1, 5.0, 5.0),
            (2, 10.0, 2.0),
        ]
        assert stream.info.duration_s == pytest.approx(12.0)
        whole, _ = decode_audio(str(path), sample_rate=24000)
        np.testing.assert_allclose(np.concatenate([s.samples for s in segs]), whole, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- faults


def _png_bytes(w: int = 8, h: int = 8) -> bytes:
    rows = b"".join(
        b"\x00" + bytes([x * 30 % 256, y * 30 % 256, 90] * 1) * 1 for y in range(h) for x in range(1)
    )
    rows = b"".join(
        b"\x00" + bytes(sum(([x * 30 % 256, y * 30 % 256, 90] for x in range(w)), [])) for y in range(h)
    )

    def chunk(tag: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)
        )

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _video_only(path: Path) -> Path:
    import av

    with av.open(str(path), "w") as out:
        s = out.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 40, np.uint8), format="rgb24")
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode(None):
            out.mux(p)
    return path


def _fault_cases(tmp: Path) -> dict[str, tuple[Path, tuple[type[InputFault], ...]]]:
    (tmp / "random.mp3").write_bytes(
        np.random.default_rng(0).integers(0, 256, 40000, dtype=np.uint8).tobytes()
    )
    (tmp / "image.mp3").write_bytes(_png_bytes())
    (tmp / "empty.wav").write_bytes(b"")
    (tmp / "text.ogg").write_text("not audio at all\n" * 200)
    nan = synth.music_like(2.0, 16000, 1)
    nan[0, 8000:9000] = np.nan
    synth.write_audio(tmp / "nan.wav", nan, 16000, "wav", sample_format="flt")
    inf = synth.music_like(2.0, 16000, 2)
    inf[1, 100] = np.inf
    synth.write_audio(tmp / "inf.wav", inf, 16000, "wav", sample_format="dbl")
    _video_only(tmp / "video.mp4")
    return {
        "random": (tmp / "random.mp3", (DecodeError,)),
        "image": (tmp / "image.mp3", (NoAudioStream, DecodeError)),
        "empty": (tmp / "empty.wav", (EmptyAudio,)),
        "text": (tmp / "text.ogg", (DecodeError, NoAudioStream)),
        "nan": (tmp / "nan.wav", (NonFiniteAudio,)),
        "inf": (tmp / "inf.wav", (NonFiniteAudio,)),
        "video": (tmp / "video.mp4", (NoAudioStream,)),
        "missing": (tmp / "missing.flac", (InputNotFound,)),
    }


@pytest.mark.parametrize("isolate", [False, True])
def test_non_audio_and_broken_inputs_raise_named_faults(tmp_path: Path, isolate: bool) -> None:
    for name, (path, kinds) in _fault_cases(tmp_path).items():
        uri = str(path)
        t0 = time.monotonic()
        with pytest.raises(kinds) as err:
            with read_segments(uri, sample_rate=16000, segments=SegmentConfig(), isolate=isolate) as stream:
                list(stream)
        assert time.monotonic() - t0 < 20, name
        msg = str(err.value)
        assert msg.startswith(f"{uri}: "), msg
        assert err.value.uri == uri and not err.value.transient
        assert len(err.value.cause) > 10, msg
    assert "non-finite" in str(pytest.raises(NonFiniteAudio, decode_audio, str(tmp_path / "nan.wav")).value)


def test_random_bytes_message_names_the_cause(tmp_path: Path) -> None:
    path = tmp_path / "noise.mp3"
    path.write_bytes(np.random.default_rng(7).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    with pytest.raises(DecodeError, match=r"noise\.mp3: cannot decode: invalid data"):
        decode_audio(str(path))


def test_too_short_is_its_own_status(tmp_path: Path) -> None:
    path = synth.write_audio(tmp_path / "short.wav", synth.tone(440, 0.6, 16000), 16000, "wav")
    with pytest.raises(TooShort, match="0.600 s") as err:
        list(read_segments(str(path), sample_rate=24000, segments=SegmentConfig(), isolate=False))
    assert err.value.kind == "too_short"
    segs = list(read_segments(str(path), sample_rate=24000, segments=SegmentConfig(min_segment_s=0.5)))
    assert len(segs) == 1 and segs[0].duration_s == pytest.approx(0.6)


TRUNCATABLE = ["wav", "aiff", "flac", "mp3", "ogg", "opus", "m4a", "wma"]


@pytest.mark.parametrize("fmt", TRUNCATABLE)
def test_truncated_and_garbage_tailed_files_keep_what_decoded(tmp_path: Path, fmt: str) -> None:
    rate = 48000
    x = synth.music_like(6.0, rate, 2, seed=11)
    path = synth.write_audio(tmp_path / f"full{synth.EXTENSIONS[fmt]}", x, rate, fmt)
    data = path.read_bytes()
    _, info = decode_audio(str(path))
    assert not info.truncated, info.warning
    garbage = np.random.default_rng(1).integers(0, 256, 30000, dtype=np.uint8).tobytes()
    cases = {"cut": data[: int(len(data) * 0.6)], "garbage": data + garbage}
    for kind, blob in cases.items():
        bad = tmp_path / f"{kind}{synth.EXTENSIONS[fmt]}"
        bad.write_bytes(blob)
        for isolate in (False, True):
            with read_segments(
                str(bad), sample_rate=24000, segments=SegmentConfig(), isolate=isolate
            ) as stream:
                segs = list(stream)
            info = stream.info
            assert info.truncated, (fmt, kind, isolate)
            assert info.warning and str(bad) in info.warning
            if kind == "cut":
                assert 0.5 < info.duration_s < 5.0, (fmt, info.duration_s)
            else:
                assert info.duration_s == pytest.approx(6.0, abs=LOSSY_TOL_S), (fmt, info.duration_s)
            assert len(segs) >= 1


def test_cut_before_any_audio_is_a_decode_error(tmp_path: Path) -> None:
    path = synth.write_audio(tmp_path / "x.flac", synth.music_like(2.0, 44100, 2), 44100, "flac")
    bad = tmp_path / "head.flac"
    bad.write_bytes(path.read_bytes()[:60])
    with pytest.raises((DecodeError, EmptyAudio), match="head.flac"):
        decode_audio(str(bad))


# ------------------------------------------------------------------------------------------- object storage


def test_reads_from_s3_and_never_leaks_the_secret(tmp_path: Path, s3_options: dict, s3_bucket: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options)
    x = synth.music_like(7.0, 44100, 2, seed=4)
    local = synth.write_audio(tmp_path / "song.flac", x, 44100, "flac")
    fs.put(str(local), f"{s3_bucket}/audio/song.flac")
    uri = f"s3://{s3_bucket}/audio/song.flac"
    ref, _ = decode_audio(str(local), sample_rate=24000)
    dec = DecoderProcess(stall_s=30)
    try:
        for isolate in (False, True):
            with read_segments(
                uri,
                sample_rate=24000,
                segments=SegmentConfig(),
                storage_options=s3_options,
                isolate=isolate,
                decoder=dec,
            ) as stream:
                segs = list(stream)
            assert [s.duration_s for s in segs] == [5.0, 2.0]
            assert stream.info.codec == "flac" and stream.info.uri == uri
            np.testing.assert_allclose(np.concatenate([s.samples for s in segs]), ref, atol=1e-6)
        # credentials travel over the pipe only: not on the child's command line or in its environment
        with open(f"/proc/{dec.pid}/cmdline", "rb") as f:
            assert s3_options["secret"].encode() not in f.read()
        with open(f"/proc/{dec.pid}/environ", "rb") as f:
            assert s3_options["secret"].encode() not in f.read()
        missing = f"s3://{s3_bucket}/audio/nope.mp3"
        for isolate in (False, True):
            with pytest.raises(InputNotFound) as err:
                read_segments(
                    missing,
                    sample_rate=24000,
                    segments=SegmentConfig(),
                    storage_options=s3_options,
                    isolate=isolate,
                    decoder=dec,
                )
            assert str(err.value).startswith(missing)
            assert s3_options["secret"] not in str(err.value)
            assert s3_options["secret"] not in repr(err.value.__dict__)
        with pytest.raises(InputNotFound):
            read_segments(
                f"s3://{s3_bucket}-nobucket/x.wav",
                sample_rate=24000,
                segments=SegmentConfig(),
                storage_options=s3_options,
                isolate=False,
            )
    finally:
        dec.close()


# -------------------------------------------------------------------------------------------------- isolation


def test_decoder_crash_and_hang_become_faults_and_the_process_recovers(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(FAULT_ENV, "crash:boom,hang:stuck,crash_after:midcrash,hang_after:midhang")
    good = synth.write_audio(tmp_path / "good.wav", synth.music_like(6.0, 16000, 1), 16000, "wav")
    for name in ("boom", "stuck", "midcrash", "midhang"):
        synth.write_audio(tmp_path / f"{name}.wav", synth.music_like(6.0, 16000, 1), 16000, "wav")
    cfg = SegmentConfig()
    dec = DecoderProcess(stall_s=1.5)

    def run(name: str, **kw) -> int:
        with read_segments(
            str(tmp_path / f"{name}.wav"), sample_rate=16000, segments=cfg, decoder=dec, chunk_s=0.5, **kw
        ) as stream:
            return len(list(stream))

    try:
        assert run("good") == 2
        first_pid = dec.pid
        with pytest.raises(DecoderCrashed, match=r"boom\.wav: the decoder process exited with status 134"):
            run("boom")
        assert run("good") == 2
        t0 = time.monotonic()
        with pytest.raises(DecodeTimeout, match=r"stuck\.wav: the decoder made no progress for 1.5 s"):
            run("stuck")
        assert time.monotonic() - t0 < 10
        assert run("good") == 2
        with pytest.raises(DecoderCrashed, match="midcrash"):
            run("midcrash")
        t0 = time.monotonic()
        with pytest.raises(DecodeTimeout, match="longer than the limit of 0.8 s"):
            run("midhang", time_limit_s=0.8)
        assert time.monotonic() - t0 < 10
        assert run("good") == 2
        # a stream abandoned midway: the child is replaced, the next file decodes
        stream = read_segments(str(good), sample_rate=16000, segments=cfg, decoder=dec, chunk_s=0.5)
        next(iter(stream))
        stream.close()
        assert run("good") == 2
        assert dec.restarts == 5 and dec.pid != first_pid
    finally:
        dec.close()
    assert dec.pid is None


# ----------------------------------------------------------------------------------------------- memory bound

_MEASURE = textwrap.dedent("""
    import json, resource, sys
    from pipeline.audio import read_segments
    from pipeline.config import SegmentConfig
    n = 0
    with read_segments(sys.argv[1], sample_rate=24000, segments=SegmentConfig(), isolate=False) as stream:
        for seg in stream:
            n += 1
    print(json.dumps({"segments": n, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "duration_s": stream.info.duration_s}))
""")


def _peak(path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_memory_of_a_60_minute_file_stays_near_a_1_minute_one(tmp_path: Path) -> None:
    short = synth.encode_chunks(tmp_path / "1min.wav", synth.long_music_chunks(60, 44100, 2), 44100, 2, "wav")
    long = synth.encode_chunks(
        tmp_path / "60min.wav", synth.long_music_chunks(3600, 44100, 2), 44100, 2, "wav"
    )
    assert long.stat().st_size > 600e6
    small, big = _peak(short), _peak(long)
    assert (small["segments"], big["segments"]) == (12, 720)
    assert big["duration_s"] == pytest.approx(3600.0)
    assert big["peak_mb"] <= 1.5 * small["peak_mb"] + 50, (small, big)
    # the fixed cost (torch, PyAV) dominates both: the growth itself must stay within a few windows' worth
    assert big["peak_mb"] - small["peak_mb"] < 64, (small, big)


# ------------------------------------------------------------------------ the fast downmix and the child's rate

_DOWNMIX_CASES = [
    ("wav", 44100, 1, "s16"),
    ("wav", 44100, 2, "s16"),
    ("wav", 44100, 2, "s32"),
    ("wav", 22050, 2, "s24"),
    ("wav", 44100, 1, "flt"),
    ("wav", 44100, 2, "flt"),
    ("wav", 44100, 3, "flt"),
    ("wav", 8000, 2, "u8"),
    ("flac", 44100, 2, "s16"),
    ("flac", 44100, 2, "s24"),
    ("mp3", 44100, 2, None),
    ("mp3", 44100, 1, None),
    ("ogg", 44100, 2, None),
    ("opus", 48000, 2, None),
    ("m4a", 44100, 2, None),
]


@pytest.mark.parametrize("fmt,rate,channels,sample_format", _DOWNMIX_CASES)
def test_fast_downmix_is_bit_for_bit_the_mean(
    tmp_path: Path, fmt: str, rate: int, channels: int, sample_format: str | None
) -> None:
    """downmix_into (planes added straight into the chunk) equals _frame_to_mono (np.stack + mean), bit for
    bit (the sign of zero included), on every frame of real files, so that features do not move."""
    import av

    from pipeline.audio.decode import _frame_to_mono, downmix_into

    sig = synth.music_like(2.0, rate, channels, seed=5)
    sig[:, 1000:3000] = 0.0  # silence: the sign of zero must match too
    path = synth.write_audio(
        tmp_path / f"x{synth.EXTENSIONS[fmt]}", sig, rate, fmt, sample_format=sample_format
    )
    frames = 0
    with av.open(str(path)) as container:
        for frame in container.decode(container.streams.audio[0]):
            out = np.full(frame.samples, np.nan, dtype=np.float32)
            downmix_into(frame, out)
            assert out.tobytes() == _frame_to_mono(frame).tobytes(), (fmt, frame.format.name, frames)
            frames += 1
    assert frames > 0


def test_the_child_resamples_and_matches_in_process_decoding(tmp_path: Path) -> None:
    """The decoder child resamples to the requested rate (so the pipe carries model-rate samples) and its chunks
    join to what LocalDecoder gives in this process, and to decode_audio either way (to float32 rounding: the
    child's BLAS runs on one thread, and a matrix product's summation order depends on its thread count)."""
    from pipeline.audio import LocalDecoder

    path = synth.write_audio(tmp_path / "a.mp3", synth.music_like(7.0, 44100, 2, seed=2), 44100, "mp3")
    local = LocalDecoder(str(path), sample_rate=16000)
    assert local.rate == 16000 and local.info.sample_rate == 44100
    want = np.concatenate(list(local.chunks()))
    local.close()
    with DecoderProcess(batch_s=0) as dec:  # each 2 s chunk its own message
        src = dec.open(str(path), sample_rate=16000)
        assert src.rate == 16000 and src.info.sample_rate == 44100
        chunks = list(src.chunks())
        src.close()
    assert all(c.dtype == np.float32 for c in chunks) and len(chunks) >= 3
    got = np.concatenate(chunks)
    assert got.size == -(-16000 * round(src.info.duration_s * 44100) // 44100)  # ceil(new * n / orig)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    iso, _ = decode_audio(str(path), sample_rate=16000, isolate=True)
    np.testing.assert_array_equal(iso, got)
    with pytest.raises(ValueError, match="sample_rate=0"):
        DecoderProcess().open(str(path), sample_rate=0)


# ------------------------------------------------------------------------------------------ duration probing


def test_probe_duration_reads_the_declared_duration_and_never_raises(tmp_path: Path) -> None:
    """probe_duration on real encoded files gives their length from the headers; a corrupt, empty or missing file
    gives None instead of raising."""

    for fmt, rate in (("mp3", 44100), ("flac", 48000), ("wav", 16000)):
        path = synth.write_audio(tmp_path / f"a.{fmt}", synth.music_like(5.0, rate, 2, seed=1), rate, fmt)
        got = probe_duration(str(path), None)
        assert got is not None and abs(got - 5.0) < 0.1, (fmt, got)
        assert probe_duration(path.as_uri(), {}) == got
    corrupt = tmp_path / "corrupt.mp3"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    for bad in (corrupt, empty, tmp_path / "missing.flac"):
        assert probe_duration(str(bad), None) is None

"""The decoder's front door on real files: damaged headers and impossible rates are permanent `decode` faults (in
the isolated child, in-process and as ledger rows of pipeline.stages.decode_input), real storage faults stay
storage faults (a real S3-protocol server), and a decoder child dies with the process that started it."""

from __future__ import annotations

import gc
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import synth
from pipeline.audio import (
    FAULT_ENV,
    MAX_SOURCE_RATE_HZ,
    MIN_SOURCE_RATE_HZ,
    PARENT_ENV,
    DecoderProcess,
    read_segments,
)
from pipeline.config import SegmentConfig
from pipeline.errors import DecodeError, DecoderCrashed, InputFault, InputNotFound, StorageError
from pipeline.stages import decode_input

REPO = Path(__file__).resolve().parent.parent
ASF_HEADER = bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c")  # the ASF Header Object's GUID
ASF_FILE_PROPERTIES = bytes.fromhex("a1dcab8c47a9cf118ee400c00c205365")


def _record(uri: str, **kw) -> dict:
    """The ledger record decode_input yields for `uri` (its last row)."""
    tables = list(
        decode_input(uri, "rid", "fp", sample_rate=24000, segments=SegmentConfig(), time_limit_s=60, **kw)
    )
    return json.loads(tables[-1].column("record")[-1].as_py())


def _wma_with_sizes_past_the_end(path: Path) -> Path:
    """A real WMA (wmav2 in ASF, encoded by PyAV) whose File Properties object declares a size of 2**50 bytes:
    the ASF demuxer seeks to that object's end, far past the end of the file (and past what lseek allows)."""
    good = synth.write_audio(
        path.with_name("good.wma"), synth.music_like(3.0, 44100, 2, seed=1), 44100, "wma"
    )
    data = bytearray(good.read_bytes())
    assert data[:16] == ASF_HEADER
    pos, patched = 30, 0  # the header's objects follow its 30-byte preamble
    for _ in range(struct.unpack("<I", data[24:28])[0]):
        size = struct.unpack("<Q", data[pos + 16 : pos + 24])[0]
        if data[pos : pos + 16] == ASF_FILE_PROPERTIES:
            data[pos + 16 : pos + 24] = struct.pack("<Q", 1 << 50)
            patched += 1
        pos += size
    assert patched == 1
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("isolate", [False, True])
def test_wma_whose_header_points_past_the_end_is_a_permanent_decode_error(
    tmp_path: Path, isolate: bool
) -> None:
    path = _wma_with_sizes_past_the_end(tmp_path / "oversized.wma")
    uri = str(path)
    dec = DecoderProcess(stall_s=30)
    try:
        with pytest.raises(InputFault) as err:
            with read_segments(
                uri, sample_rate=24000, segments=SegmentConfig(), isolate=isolate, decoder=dec
            ) as s:
                list(s)
    finally:
        dec.close()
    fault = err.value
    assert type(fault) is DecodeError, f"{type(fault).__name__}: {fault}"
    assert fault.kind == "decode" and not fault.transient
    assert str(fault).startswith(f"{uri}: cannot decode")
    assert "past the end of the file" in fault.cause and "re-export or replace it" in str(fault)


def test_wma_whose_header_points_past_the_end_is_a_decode_row_of_the_ledger(tmp_path: Path) -> None:
    uri = str(_wma_with_sizes_past_the_end(tmp_path / "oversized.wma"))
    for isolate in (False, True):
        rec = _record(uri, isolate=isolate)
        assert (rec["status"], rec["error_kind"], rec["retryable"]) == ("error", "decode", False), rec
        assert rec["error_message"].startswith(f"{uri}: cannot decode"), rec
        assert "re-export or replace it" in rec["error_message"]
        assert rec["segments"] == 0


def test_five_such_wma_files_first_in_a_listing_do_not_stop_the_run_as_systemic(tmp_path: Path) -> None:
    from pipeline.engine import SYSTEMIC_FIRST, systemic_failure

    bad = _wma_with_sizes_past_the_end(tmp_path / "oversized.wma").read_bytes()
    first = []
    for i in range(SYSTEMIC_FIRST):
        (tmp_path / f"corpus_{i}.wma").write_bytes(bad)
        first.append(_record(str(tmp_path / f"corpus_{i}.wma")))
    assert {r["error_kind"] for r in first} == {"decode"}
    assert systemic_failure(first, total=2 * SYSTEMIC_FIRST) is None


def _wav_declaring(path: Path, rate: int) -> Path:
    """A real 16 kHz mono WAV whose RIFF fmt chunk is patched to declare `rate` Hz (and the matching byte rate)."""
    good = synth.write_audio(
        path.with_name("good.wav"), synth.music_like(0.5, 16000, 1, seed=2), 16000, "wav"
    )
    data = bytearray(good.read_bytes())
    fmt = data.index(b"fmt ")
    assert struct.unpack("<I", data[fmt + 12 : fmt + 16])[0] == 16000
    data[fmt + 12 : fmt + 20] = struct.pack("<II", rate, rate * 2)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("rate", [1, 900, 800_000])
def test_a_header_declaring_an_absurd_rate_is_a_named_decode_row(tmp_path: Path, rate: int) -> None:
    uri = str(_wav_declaring(tmp_path / f"rate{rate}.wav", rate))
    for isolate in (False, True):
        rec = _record(uri, isolate=isolate)
        assert (rec["status"], rec["error_kind"], rec["retryable"]) == ("error", "decode", False), rec
        msg = rec["error_message"]
        assert msg.startswith(
            f"{uri}: cannot decode: the audio stream declares a sample rate of {rate} Hz"
        ), msg
        assert f"{MIN_SOURCE_RATE_HZ}-{MAX_SOURCE_RATE_HZ} Hz" in msg and "re-export it" in msg
        assert rec["segments"] == 0


def test_rates_at_the_bounds_still_decode(tmp_path: Path) -> None:
    for rate in (MIN_SOURCE_RATE_HZ, MAX_SOURCE_RATE_HZ):
        rec = _record(str(_wav_declaring(tmp_path / f"rate{rate}.wav", rate)), isolate=False)
        assert rec["sample_rate"] == rate and rec["error_kind"] is None, rec
        assert rec["status"] in ("ok", "too_short")  # 8000 samples: 8 s at 1 kHz, 10 ms at 768 kHz


# ------------------------------------------------------------------------------- real storage faults stay so


def _upload_long_wav(tmp_path: Path, fs, key: str) -> None:
    """A 60 s 48 kHz stereo WAV (11.5 MB: more than one 4 MB read block) uploaded to `key`."""
    local = synth.encode_chunks(tmp_path / "long.wav", synth.long_music_chunks(60, 48000, 2), 48000, 2, "wav")
    fs.put(str(local), key)


@pytest.mark.parametrize("isolate", [False, True])
def test_an_object_deleted_midway_is_still_not_found(
    tmp_path: Path, s3_options: dict, s3_bucket: str, isolate: bool
) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options)
    _upload_long_wav(tmp_path, fs, f"{s3_bucket}/long.wav")
    uri = f"s3://{s3_bucket}/long.wav"
    dec = DecoderProcess(stall_s=60)
    try:
        stream = read_segments(
            uri,
            sample_rate=16000,
            segments=SegmentConfig(),
            storage_options=s3_options,
            isolate=isolate,
            decoder=dec,
            chunk_s=0.5,
        )
        with stream:
            it = iter(stream)
            assert next(it).index == 0  # the first 4 MB block is read
            fs.rm(f"{s3_bucket}/long.wav")
            with pytest.raises(InputFault) as err:
                list(it)
    finally:
        dec.close()
    assert type(err.value) is InputNotFound, f"{type(err.value).__name__}: {err.value}"
    assert str(err.value).startswith(uri) and s3_options["secret"] not in str(err.value)


def test_a_storage_server_gone_midway_is_still_a_transient_storage_error(tmp_path: Path) -> None:
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    from tests.conftest import S3_KEY, S3_SECRET, _free_port

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    opts = {
        "key": S3_KEY,
        "secret": S3_SECRET,
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2},
    }
    stopped = False
    try:
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            region_name="us-east-1",
        ).create_bucket(Bucket="gone-midway")
        fs = s3fs.S3FileSystem(**opts)
        _upload_long_wav(tmp_path, fs, "gone-midway/long.wav")
        uri = "s3://gone-midway/long.wav"
        with read_segments(
            uri, sample_rate=16000, segments=SegmentConfig(), storage_options=opts, isolate=False, chunk_s=0.5
        ) as stream:
            it = iter(stream)
            assert next(it).index == 0
            server.stop()
            stopped = True
            t0 = time.monotonic()
            with pytest.raises(InputFault) as err:
                list(it)
        assert time.monotonic() - t0 < 60
    finally:
        if not stopped:
            server.stop()
    assert type(err.value) is StorageError, f"{type(err.value).__name__}: {err.value}"
    assert err.value.kind == "storage" and err.value.transient
    assert str(err.value).startswith(uri) and S3_SECRET not in str(err.value)


# ------------------------------------------------------------------------------ children die with their parent

_PARENT = textwrap.dedent("""
    import sys
    from pipeline.audio import read_segments
    from pipeline.config import SegmentConfig
    from pipeline.audio import DecoderProcess
    dec = DecoderProcess(stall_s=3600)
    list(read_segments(sys.argv[1], sample_rate=16000, segments=SegmentConfig(), decoder=dec))  # starts the child
    print(dec.pid, flush=True)
    read_segments(sys.argv[2], sample_rate=16000, segments=SegmentConfig(), decoder=dec, time_limit_s=3600)
""")


def _alive(pid: int) -> bool:
    """Whether `pid` is a running (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in (b"Z", b"X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_decoder_child_stuck_in_a_decode_dies_with_its_parent(tmp_path: Path) -> None:
    good = synth.write_audio(tmp_path / "good.wav", synth.music_like(2.0, 16000, 1), 16000, "wav")
    stuck = synth.write_audio(tmp_path / "__hang_me__.wav", synth.music_like(2.0, 16000, 1), 16000, "wav")
    env = dict(os.environ, PYTHONPATH=str(REPO), **{FAULT_ENV: "hang:__hang_me__"})
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(good), str(stuck)], stdout=subprocess.PIPE, text=True, env=env
    )
    child = None
    try:
        child = int(parent.stdout.readline())
        with open(f"/proc/{child}/cmdline", "rb") as f:
            assert b"pipeline.audio" in f.read()
        time.sleep(1.0)  # the child is now sleeping inside the injected hang
        assert _alive(child) and parent.poll() is None
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), f"decoder child {child} outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_child_whose_parent_is_already_gone_exits_at_once() -> None:
    # the race prctl cannot close by itself: the parent died before the child asked; here the child is told
    # that its parent is a pid that is not its parent (the init process)
    env = dict(os.environ, PYTHONPATH=str(REPO), **{PARENT_ENV: "1"})
    child = subprocess.Popen(
        [sys.executable, "-m", "pipeline.audio"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    try:
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdin.close()
        child.stdout.close()


def test_the_decoder_child_imports_neither_torch_nor_pyarrow(tmp_path: Path) -> None:
    """The child decodes and resamples a real file importing only numpy, av, fsspec and pipeline's audio
    package (every module it imports, listed by -X importtime, while it serves one request)."""
    import pickle

    path = synth.write_audio(tmp_path / "a.m4a", synth.music_like(3.0, 44100, 2, seed=4), 44100, "m4a")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    req = pickle.dumps({"uri": str(path), "storage_options": None, "chunk_s": 2.0, "sample_rate": 24000})
    hdr = struct.Struct(">cI")
    child = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "pipeline.audio"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        child.stdin.write(hdr.pack(b"O", len(req)) + req)
        child.stdin.flush()
        kinds = []
        while not kinds or kinds[-1] not in (b"E", b"F"):
            kind, length = hdr.unpack(child.stdout.read(hdr.size))
            child.stdout.read(length)
            kinds.append(kind)
        child.stdin.write(hdr.pack(b"Q", 0))
        child.stdin.close()
        stderr = child.stderr.read().decode()
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert kinds[0] == b"H" and kinds[-1] == b"E" and b"C" in kinds
    modules = {line.split("|")[-1].strip().split(".")[0] for line in stderr.splitlines() if "|" in line}
    assert {"numpy", "av", "fsspec", "pipeline"} <= modules
    assert not modules & {"torch", "pyarrow", "transformers", "torchaudio", "ray", "pandas"}, sorted(modules)


# ------------------------------------------------------------------------- the shared-memory ring of the child

_RING = "memfd:mert-decoder-ring-"


def _maps_ring(pid: int, name: str = _RING) -> bool:
    """Whether process `pid` maps a decoder ring (the child's anonymous shared memory), or the one named."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return name in f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False


def _ring_holders(name: str) -> list[int]:
    """Every process that maps or holds open a ring whose name starts with `name`."""
    holders = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            mapped = _maps_ring(int(entry), name)
            held = any(
                name in os.readlink(f"/proc/{entry}/fd/{fd}") for fd in os.listdir(f"/proc/{entry}/fd")
            )
        except OSError:
            continue
        if mapped or held:
            holders.append(int(entry))
    return holders


def _own_ring_fds(name: str) -> int:
    """File descriptors of this process on the ring `name`."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += name in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return n


def _dev_shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_chunks_through_the_ring_are_bit_exact_over_many_chunks_and_inline_ones(tmp_path: Path) -> None:
    """60 chunks cross a 4-slot ring one by one (every slot reused over a dozen times, borrowed and copied), or
    gathered 8 s to a slot, and chunks too big for a slot go inline: the samples are bit for bit those of the
    pipe-only child, and the segments those of in-process decoding."""
    from pipeline.audio import RING_SLOT_BYTES, RING_SLOTS, LocalDecoder

    path = synth.write_audio(tmp_path / "a.flac", synth.music_like(30.0, 44100, 2, seed=3), 44100, "flac")
    with (
        DecoderProcess(batch_s=0) as ring,
        DecoderProcess() as batched,
        DecoderProcess(shared_memory=False) as pipe,
    ):
        src = ring.open(str(path), sample_rate=24000, chunk_s=0.5)
        assert ring.pid is not None and _maps_ring(ring.pid)
        copied = list(src.chunks())
        src = ring.open(str(path), sample_rate=24000, chunk_s=0.5)
        borrowed = [c.copy() for c in src.chunks(borrow=True)]
        src = pipe.open(str(path), sample_rate=24000, chunk_s=0.5)
        assert pipe.pid is not None and not _maps_ring(pipe.pid)
        want = list(src.chunks())
        assert len(want) >= 14 * RING_SLOTS  # every slot reused over a dozen times
        for got in (copied, borrowed):
            assert len(got) == len(want)
            for a, b in zip(got, want, strict=True):
                assert a.dtype == np.float32 and a.tobytes() == b.tobytes()
        src = batched.open(str(path), sample_rate=24000, chunk_s=0.5)
        gathered = [c.copy() for c in src.chunks(borrow=True)]
        assert len(gathered) == 4 and all(
            c.size >= 8 * 24000 for c in gathered[:-1]
        )  # 0.5 s chunks to >= 8 s
        assert np.concatenate(gathered).tobytes() == np.concatenate(want).tobytes()
        # 12 s chunks at the source rate do not fit a slot: inline, the same samples
        big = int(12.0 * 44100 * 4)
        assert big > RING_SLOT_BYTES
        src = ring.open(str(path), chunk_s=12.0)
        inline = np.concatenate(list(src.chunks()))
        local = LocalDecoder(str(path), chunk_s=12.0)
        assert inline.tobytes() == np.concatenate(list(local.chunks())).tobytes()
        local.close()
        cfg = SegmentConfig()
        with read_segments(str(path), sample_rate=24000, segments=cfg, decoder=ring, chunk_s=0.5) as s:
            segs = [seg.samples for seg in s]
    with read_segments(str(path), sample_rate=24000, segments=cfg, isolate=False, chunk_s=0.5) as s:
        local_segs = [seg.samples for seg in s]
    assert len(segs) == len(local_segs) >= 5
    for a, b in zip(segs, local_segs, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)  # the child's BLAS is single-threaded


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_ring_survives_a_sigkilled_child_and_close_frees_it(tmp_path: Path) -> None:
    """A child SIGKILLed mid-file is a DecoderCrashed; the next child reuses the ring (no new memory, no new
    file descriptor per restart); nothing ever appears in /dev/shm; close() releases the parent's ring."""
    path = synth.write_audio(tmp_path / "a.wav", synth.music_like(8.0, 16000, 1), 16000, "wav")
    shm_before = _dev_shm()
    dec = DecoderProcess(stall_s=10, batch_s=1.0)  # 8 messages per file: killed mid-file
    name = dec.ring_name
    try:
        fds, held = [], []
        for _ in range(3):
            src = dec.open(str(path), sample_rate=16000, chunk_s=0.5)
            chunks = src.chunks(borrow=True)
            held.append(next(chunks))  # a borrowed view of the ring, kept past its time
            child = dec.pid
            assert child is not None and _maps_ring(child, name)
            os.kill(child, signal.SIGKILL)
            with pytest.raises(DecoderCrashed, match="killed by SIGKILL"):
                list(chunks)
            fds.append(_own_ring_fds(name))
        assert fds[0] > 0 and fds == fds[:1] * 3  # one ring, however many children
        with read_segments(str(path), sample_rate=16000, segments=SegmentConfig(), decoder=dec) as s:
            assert len(list(s)) == 2
        assert dec.restarts == 3
    finally:
        dec.close()
    assert _own_ring_fds(name) > 0  # a borrowed chunk still viewing the ring keeps its mapping alive...
    del src, chunks, held
    gc.collect()  # ... until it goes
    assert _own_ring_fds(name) == 0 and _ring_holders(name) == []
    assert _dev_shm() == shm_before


_WORKER = textwrap.dedent("""
    import os, signal, sys
    from pipeline.audio import DecoderProcess, read_segments
    from pipeline.config import SegmentConfig
    dec = DecoderProcess(stall_s=60)
    stream = read_segments(sys.argv[1], sample_rate=16000, segments=SegmentConfig(), decoder=dec, chunk_s=0.5)
    segments = iter(stream)
    next(segments)  # mid-file: the child is streaming through the ring
    print(dec.pid, dec.ring_name, flush=True)
    sys.stdin.readline()
    if sys.argv[2] == "raise":
        raise RuntimeError("the worker fails mid-file")
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", ["raise", "sigkill"])
def test_a_worker_that_dies_midfile_leaves_no_shared_memory(tmp_path: Path, how: str) -> None:
    """A worker process that fails with an exception, or is SIGKILLed, while its child streams through the ring:
    the child dies too and no process maps or holds the ring any more; /dev/shm is unchanged."""
    path = synth.write_audio(tmp_path / "a.wav", synth.music_like(20.0, 16000, 1), 16000, "wav")
    shm_before = _dev_shm()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    worker = subprocess.Popen(
        [sys.executable, "-c", _WORKER, str(path), how],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    child = None
    try:
        pid, name = worker.stdout.readline().split()
        child = int(pid)
        assert sorted(_ring_holders(name)) == sorted([worker.pid, child])
        worker.stdin.write("\n")
        worker.stdin.flush()
        code = worker.wait(timeout=30)
        assert code == (1 if how == "raise" else -signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child)
        assert _ring_holders(name) == []
        assert _dev_shm() == shm_before
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)


def _minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; glibc's malloc")
def test_a_warm_decoder_child_decodes_without_fresh_pages(tmp_path: Path) -> None:
    """The child keeps the memory its chunks freed (mallopt): a warm child decodes 30 s of MP3 with few
    page faults (glibc's defaults gave about 1,200 here: every chunk buffer came back as fresh pages)."""
    path = synth.write_audio(tmp_path / "a.mp3", synth.music_like(30.0, 44100, 2, seed=5), 44100, "mp3")
    with DecoderProcess() as dec:
        faults = []
        for _ in range(2):
            child = dec.pid
            f0 = _minor_faults(child) if child is not None else 0
            src = dec.open(str(path), sample_rate=24000)
            n = sum(c.size for c in src.chunks(borrow=True))
            assert dec.pid is not None and n > 29 * 24000
            faults.append(_minor_faults(dec.pid) - f0)
    assert faults[1] < 300, faults

"""Decoding isolation: a persistent child process decodes inputs, so that a decoder crash or hang on one file
becomes that file's fault (DecoderCrashed, DecodeTimeout) instead of killing or stalling the worker.

The child is `python -m pipeline.audio` (pipeline/audio/__main__.py calls child_main here), started lazily with
subprocess.Popen and reused across files; it runs pipeline.audio.decode.LocalDecoder (fsspec open + PyAV decode +
downmix + resampling to the requested rate) and streams the result back in chunks of about 2 s; segmenting stays in
the parent. The child imports numpy, av, fsspec and this package only (no torch, no pyarrow: tested), and runs
single-threaded (FFmpeg, OpenMP and BLAS threads = 1).

Samples cross through shared memory: a ring of RING_SLOTS slots of RING_SLOT_BYTES each in an anonymous file
(memfd_create on Linux, an already-unlinked temporary file elsewhere) that the parent creates and the child
inherits as a file descriptor. It has no name in /dev/shm or anywhere, so nothing can leak: the kernel frees it
when the last process that maps it exits, whichever dies first and however (SIGKILL included). The pipe carries
only small headers. The child gathers consecutive decoded chunks in a slot until it holds `batch_s` seconds
(DecoderProcess(batch_s=...), 8 s by default), then sends it: fewer messages and wake-ups, the same samples. A
chunk larger than a slot, or a child started without a ring, sends its samples inline on the pipe (b"C") instead.

Protocol (stdin/stdout pipes; every message is 1 type byte + 4-byte big-endian payload length + payload):
  parent -> child   b"O" pickle {uri, storage_options, chunk_s, sample_rate, batch_s}   decode one input
                    b"A" (empty)             the oldest ring slot in flight is free again (one per b"S")
                    b"Q" (empty)                                   exit
  child -> parent   b"H" JSON {sample_rate, channels, codec, container}           header, once per input
                    b"S" >II (slot, samples): a chunk of little-endian float32 mono samples at the requested rate
                         (the source rate when sample_rate is None) in ring slot `slot`  zero or more chunks
                    b"C" the same samples inline (raw little-endian float32)     a chunk that fits no slot
                    b"E" JSON {duration_s, truncated, warning}                    end of the input
                    b"F" JSON {fault: class name, uri, cause, hint}               a named fault (ends the input)
Storage options (credentials) travel only over the pipe: never on the command line, in the environment or logs.
Flow control: the child fills slots in order and, with every slot in flight, blocks reading stdin for an b"A"
(stale acknowledgements of an input that ended are read and ignored before the next b"O"); inline chunks block
on the pipe. All slots are free when an input starts: the parent acknowledges each chunk before it asks for the
next message, and a parent that abandons an input midway kills the child (restarted lazily for the next input).

Timeouts: if no message arrives within `stall_s` seconds, or the time spent waiting for one input exceeds its
`time_limit_s` (time the consumer holds the stream does not count), the child is killed: DecodeTimeout. If the
child exits or its pipe closes mid-input: DecoderCrashed (with its exit status and the tail of its stderr).

The child dies with its parent: on Linux it asks the kernel (prctl PR_SET_PDEATHSIG) for SIGKILL when the
parent thread that started it exits, which works even while it is stuck inside FFmpeg's C code; elsewhere a
watchdog thread polls the parent's pid. A child whose parent died before it could ask exits at once.

Fault injection (tests): the CHILD reads MERT_PIPELINE_FAULT_INJECTION, a comma-separated list of
`<action>:<substring>`; when the URI being opened contains the substring it acts before decoding:
  crash       os._exit(134), like a decoder that segfaults or aborts
  hang        sleeps forever, like a decoder stuck in a loop
  crash_after / hang_after   the same, after the header and the first chunk were sent (mid-file)
The decode STAGE (pipeline.stages, in the Ray worker process) reads one more action:
  worker_crash   os._exit(137) in the worker itself, like a file that takes its whole worker process down
"""

from __future__ import annotations

import fcntl
import itertools
import json
import mmap
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from pipeline import errors
from pipeline.audio.decode import LocalDecoder, SourceInfo
from pipeline.errors import DecodeError, DecoderCrashed, DecodeTimeout, InputFault

FAULT_ENV = "MERT_PIPELINE_FAULT_INJECTION"
PARENT_ENV = "MERT_PIPELINE_DECODER_PARENT"  # the pid of the process that started the child
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h (glibc)
_TRIM_THRESHOLD = 64 << 20  # bytes of free heap kept mapped (the child's)
_MMAP_THRESHOLD = 32 << 20  # allocations below this come from the heap (glibc's 64-bit maximum)
_HDR = struct.Struct(">cI")
_F_SETPIPE_SZ = 1031  # linux/fcntl.h
PIPE_BYTES = 1 << 20  # the child's stdout pipe (Linux's default pipe-max-size for unprivileged processes)
RING_ENV = "MERT_PIPELINE_DECODER_RING"  # "fd:slots:slot_bytes" of the shared-memory ring the child inherits
RING_SLOTS = 4  # chunks the child may run ahead of the parent
RING_SLOT_BYTES = 2 << 20  # per slot: 2 s at up to 262 kHz; pages are allocated as chunks write them
BATCH_S = 8.0  # default seconds of samples (at the chunks' rate) gathered in a slot before it is sent
_SLOT = struct.Struct(">II")  # b"S" payload: slot index, number of float32 samples
_ACK = _HDR.pack(b"A", 0)
_RING_COUNTER = itertools.count()


# ------------------------------------------------------------------------------------------------ child side


def _send(out: BinaryIO, kind: bytes, payload: bytes | memoryview) -> None:
    out.write(_HDR.pack(kind, len(payload)))
    out.write(payload)
    out.flush()


def _read_exact_blocking(inp: BinaryIO, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        part = inp.read(n - len(data))
        if not part:
            return None
        data += part
    return data


class _ChildRing:
    """The child's end of the shared-memory ring (see the module docstring): the slots it may fill, in order, and
    the samples gathered in the current slot and not yet sent."""

    def __init__(self, spec: str):
        fd, slots, slot_bytes = (int(x) for x in spec.split(":"))
        self.slots, self.slot_bytes = slots, slot_bytes
        self.mm = mmap.mmap(fd, slots * slot_bytes)
        os.close(fd)
        self.reset()

    def reset(self) -> None:
        """A new input: every slot is free (the parent acknowledged all chunks of the previous one, or the child
        was replaced)."""
        self.next = 0  # the slot being filled
        self.pending = 0  # samples in it, not yet sent
        self.in_flight = 0  # slots sent and not yet acknowledged


def _await_ack(inp: BinaryIO, ring: _ChildRing) -> None:
    """Block until the parent frees a slot (b"A"); exit when stdin closes or anything else arrives (the parent
    never sends another message mid-input: it is gone or confused, and nobody reads what this child decodes)."""
    hdr = _read_exact_blocking(inp, _HDR.size)
    if hdr is None:
        os._exit(0)
    kind, length = _HDR.unpack(hdr)
    if kind != b"A" or length:
        os._exit(3)
    ring.in_flight -= 1


def _flush(out: BinaryIO, ring: _ChildRing | None) -> bool:
    """Send the samples gathered in the current slot (b"S"), if any; whether a message went out."""
    if ring is None or not ring.pending:
        return False
    _send(out, b"S", _SLOT.pack(ring.next, ring.pending))
    ring.next = (ring.next + 1) % ring.slots
    ring.pending = 0
    ring.in_flight += 1
    return True


def _send_chunk(out: BinaryIO, inp: BinaryIO, ring: _ChildRing | None, chunk: np.ndarray, batch: int) -> bool:
    """Pass one decoded chunk on to the parent: gathered into the current ring slot, which is sent (b"S") once it
    holds `batch` samples or the next chunk would not fit (fewer, larger messages: fewer wake-ups on both sides;
    the decode itself still runs `chunk_s` at a time, so the samples are the same); or inline (b"C") when there is
    no ring or the chunk fits no slot. Whether a message went out."""
    samples = np.ascontiguousarray(chunk, dtype="<f4")
    if ring is None or samples.nbytes > ring.slot_bytes:
        _flush(out, ring)  # in order
        _send(out, b"C", samples.data.cast("B"))  # the samples' own buffer, no copy
        return True
    if (ring.pending + samples.size) * 4 > ring.slot_bytes:
        _flush(out, ring)
    if not ring.pending and ring.in_flight >= ring.slots:
        _await_ack(inp, ring)
    offset = ring.next * ring.slot_bytes + ring.pending * 4
    np.frombuffer(ring.mm, dtype="<f4", count=samples.size, offset=offset)[:] = samples
    ring.pending += samples.size
    return _flush(out, ring) if ring.pending >= batch else False


def injected(uri: str) -> dict[str, bool]:
    acts: dict[str, bool] = {}
    for item in os.environ.get(FAULT_ENV, "").split(","):
        action, _, sub = item.strip().partition(":")
        if sub and sub in uri:
            acts[action] = True
    return acts


def _act(action: str) -> None:
    if action.startswith("crash"):
        os._exit(134)
    while True:  # hang
        time.sleep(3600)


def _die_with_parent() -> None:
    """Make this child die when the process that started it dies, even while it is stuck in C code.

    Linux: PR_SET_PDEATHSIG delivers SIGKILL when the parent THREAD that forked this child exits (not only the
    whole process). That matches how children are started: DecoderProcess starts its child lazily from the
    thread that calls open(), and default_decoder() keeps one DecoderProcess per thread, so a child never
    outlives the worker thread that owns it. (A DecoderProcess shared across threads loses its child when the
    thread that started it exits; open() then starts a new one.) prctl runs after this interpreter started, so
    the parent may already be gone: the pid check below closes that race (an orphan is re-parented, and its
    parent pid changes). Elsewhere a daemon thread polls the parent pid once a second.
    """
    expected = int(os.environ.get(PARENT_ENV) or 0)
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            err = ctypes.get_errno()
            print(
                f"pipeline.audio decoder child: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}",
                file=sys.stderr,
            )
    elif expected:

        def watch() -> None:
            while os.getppid() == expected:
                time.sleep(1.0)
            os._exit(0)

        threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
    if expected and os.getppid() != expected:
        os._exit(0)  # the parent died before prctl ran: nobody will read what this child decodes


def _keep_freed_memory() -> None:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel at once.

    The child's heap is small and every chunk is freed as soon as it is in the ring, so with glibc's defaults each
    2 s chunk buffer (hundreds of KB: mmap'd, or at the top of the heap, trimmed when freed) came back as fresh
    pages: about 7,000-10,000 page faults per 3-minute file against about 600 for the same decode in the worker,
    which made the child's decode some 5-15 % slower than the worker's. Allocations below MMAP_THRESHOLD come
    from the heap and up to TRIM_THRESHOLD of free memory stays mapped: a handful of faults per file. Memory stays
    bounded: this keeps what the largest chunk needed, it does not grow with the input. No-op without glibc."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)


def child_main() -> None:
    """Serve open requests until stdin closes or b"Q" arrives."""
    _die_with_parent()
    _keep_freed_memory()
    # The protocol owns the original stdout; anything else printing to fd 1 goes to stderr instead.
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    spec = os.environ.pop(RING_ENV, "")
    ring = _ChildRing(spec) if spec else None

    while True:
        hdr = _read_exact_blocking(inp, _HDR.size)
        if hdr is None:
            return
        kind, length = _HDR.unpack(hdr)
        payload = _read_exact_blocking(inp, length) if length else b""
        if kind == b"Q" or payload is None:
            return
        if kind == b"A":  # a late acknowledgement of the input that ended: every slot is free anyway
            continue
        req = pickle.loads(payload)
        uri = req["uri"]
        acts = injected(uri)
        for a in ("crash", "hang"):
            if acts.get(a):
                _act(a)
        dec = None
        if ring is not None:
            ring.reset()
        try:
            dec = LocalDecoder(
                uri,
                req.get("storage_options"),
                chunk_s=req.get("chunk_s", 2.0),
                sample_rate=req.get("sample_rate"),
            )
            info = dec.info
            _send(
                proto_out,
                b"H",
                json.dumps(
                    {
                        "sample_rate": info.sample_rate,
                        "channels": info.channels,
                        "codec": info.codec,
                        "container": info.container,
                    }
                ).encode(),
            )
            first = True
            batch = max(1, int(req.get("batch_s", 0.0) * dec.rate))
            for chunk in dec.chunks():
                if _send_chunk(proto_out, inp, ring, chunk, batch) and first:
                    first = False
                    for a in ("crash_after", "hang_after"):
                        if acts.get(a):
                            _act(a)
            if _flush(proto_out, ring) and first:
                for a in ("crash_after", "hang_after"):
                    if acts.get(a):
                        _act(a)
            _send(
                proto_out,
                b"E",
                json.dumps(
                    {"duration_s": info.duration_s, "truncated": info.truncated, "warning": info.warning}
                ).encode(),
            )
        except InputFault as fault:
            _send(
                proto_out,
                b"F",
                json.dumps(
                    {
                        "fault": type(fault).__name__,
                        "uri": fault.uri,
                        "cause": fault.cause,
                        "hint": fault.hint,
                    }
                ).encode(),
            )
        except Exception as exc:  # anything else is this input's decode failure
            _send(
                proto_out,
                b"F",
                json.dumps(
                    {
                        "fault": "DecodeError",
                        "uri": uri,
                        "cause": f"decoder failed: {type(exc).__name__}: {exc}",
                        "hint": None,
                    }
                ).encode(),
            )
        finally:
            if dec is not None:
                dec.close()


# ----------------------------------------------------------------------------------------------- parent side


def _pipe(pipe: Any) -> BinaryIO:
    """A pipe of the child (always opened: stdin and stdout are PIPE); a closed one reads as a broken pipe."""
    if pipe is None:
        raise BrokenPipeError("the decoder process's pipe is not open")
    return pipe


def _fault_from(msg: dict, uri: str) -> InputFault:
    cls = getattr(errors, str(msg.get("fault")), None)
    if not (isinstance(cls, type) and issubclass(cls, InputFault)):
        cls = DecodeError
    return cls(msg.get("uri") or uri, msg.get("cause") or "decode failed", msg.get("hint"))


@dataclass
class WaitBudget:
    """The time one input may spend waiting for the child: `waited_s` grows with every wait, up to `limit_s`.
    Time the consumer spends holding the stream does not count."""

    limit_s: float
    waited_s: float = 0.0


class _RemoteSource:
    """One input being decoded by the child: the same shape as decode.LocalDecoder (.info, .chunks(), .close()).

    It talks to its DecoderProcess only through receive() and release(); a fault raised by receive() (timeout,
    crash, protocol error) has already stopped the child and released it, and ends this input."""

    def __init__(self, proc: DecoderProcess, uri: str, time_limit_s: float, sample_rate: int | None):
        self._proc = proc
        self.uri = uri
        self.budget = WaitBudget(time_limit_s)
        self._done = False
        kind, payload = self._receive()
        if kind == b"F":
            self._finish()
            raise _fault_from(json.loads(payload.tobytes()), uri)
        if kind != b"H":
            self._done = True
            raise proc.protocol_error(uri, kind)
        h = json.loads(payload.tobytes())
        self.info = SourceInfo(
            uri=uri,
            sample_rate=int(h["sample_rate"]),
            channels=int(h["channels"]),
            codec=str(h["codec"]),
            container=str(h["container"]),
            duration_s=None,
        )
        self.rate = sample_rate or self.info.sample_rate  # the rate of the chunks

    def _receive(self) -> tuple[bytes, np.ndarray]:
        try:
            return self._proc.receive(self.uri, self.budget)
        except BaseException:
            self._done = True
            raise

    def chunks(self, *, borrow: bool = False) -> Iterator[np.ndarray]:
        """(n,) float32 mono chunks at `rate` Hz. borrow=True: a chunk from the shared-memory ring is a view of
        its slot, valid only until the next chunk is asked for (the slot is then handed back to the child);
        SegmentStream borrows, as its Segmenter copies what it keeps. borrow=False: every chunk is the caller's."""
        while not self._done:
            kind, payload = self._receive()
            if kind == b"S":
                view = self._proc.slot_view(self.uri, payload)
                if borrow:
                    yield view
                    self._proc.ack()
                else:
                    chunk = view.copy()
                    self._proc.ack()
                    yield chunk
            elif kind == b"C":
                yield payload.view("<f4").astype(np.float32, copy=False)
            elif kind == b"E":
                self._finish()
                end = json.loads(payload.tobytes())
                self.info.duration_s = end.get("duration_s")
                self.info.truncated = bool(end.get("truncated"))
                self.info.warning = end.get("warning")
            elif kind == b"F":
                self._finish()
                raise _fault_from(json.loads(payload.tobytes()), self.uri)
            else:
                self._done = True
                raise self._proc.protocol_error(self.uri, kind)

    def _finish(self) -> None:
        self._done = True
        self._proc.release(abandoned=False)

    def close(self) -> None:
        if not self._done:  # abandoned midway: the child is still streaming this input
            self._done = True
            self._proc.release(abandoned=True)


class DecoderProcess:
    """A persistent decoder child (`python -m pipeline.audio`), started lazily, reused across files; see the
    module docstring for the protocol. One input at a time.

    stall_s: seconds without any message from the child before it is killed (DecodeTimeout).
    shared_memory: samples cross through the shared-memory ring (default); False: inline on the pipe.
    batch_s: seconds of samples the child gathers in a ring slot before it sends the slot (at most a slot's worth;
        0: every decoded chunk is sent as it is). The decode runs `chunk_s` at a time whatever this is.
    """

    def __init__(self, stall_s: float = 60.0, *, shared_memory: bool = True, batch_s: float = BATCH_S):
        if not stall_s > 0:
            raise ValueError(f"stall_s={stall_s!r}: must be a positive number of seconds")
        if not batch_s >= 0:
            raise ValueError(f"batch_s={batch_s!r}: must be a number of seconds >= 0")
        self.batch_s = float(batch_s)
        self.stall_s = float(stall_s)
        self.shared_memory = bool(shared_memory)
        self._ring_fd: int | None = None  # the ring's anonymous file, handed to every child started
        self._ring: mmap.mmap | None = None
        # the ring's name in /proc/PID/fd and /proc/PID/maps ("/memfd:NAME (deleted)"): this process and counter
        self.ring_name = f"mert-decoder-ring-{os.getpid()}-{next(_RING_COUNTER)}"
        self._proc: subprocess.Popen | None = None
        self._stderr: Any = None
        self._rbuf = bytearray()
        self._busy = False
        self._lock = threading.Lock()
        self.restarts = 0  # children started after the first (crashes, timeouts, abandoned inputs)
        self._started = 0

    # -- process management
    def _open_ring(self) -> None:
        """Create the shared-memory ring once per DecoderProcess: an anonymous file (never named in /dev/shm),
        so the kernel frees it with the last process that maps it. Where none can be made, chunks go inline."""
        if not self.shared_memory or self._ring is not None:
            return
        size = RING_SLOTS * RING_SLOT_BYTES
        fd = -1
        try:
            if hasattr(os, "memfd_create"):
                fd = os.memfd_create(self.ring_name, os.MFD_CLOEXEC)
            else:  # an unlinked temporary file: mapped, it is shared memory too (pages stay in the page cache)
                with tempfile.TemporaryFile() as f:
                    fd = os.dup(f.fileno())
            os.ftruncate(fd, size)
            self._ring = mmap.mmap(fd, size)
            self._ring_fd = fd
        except OSError:
            if fd >= 0:
                os.close(fd)
            self._ring = self._ring_fd = None

    def _close_ring(self) -> None:
        ring, fd = self._ring, self._ring_fd
        self._ring = self._ring_fd = None
        if ring is not None:
            try:
                ring.close()
            except BufferError:  # a borrowed chunk still views it: the mapping goes with its last view
                pass
        if fd is not None:
            os.close(fd)

    def _start(self) -> None:
        pkg_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        # the child is one single-threaded decode: no OpenMP or BLAS thread pools (they spin between calls)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = "1"
        env[PARENT_ENV] = str(os.getpid())
        self._open_ring()
        pass_fds: tuple[int, ...] = ()
        if self._ring_fd is not None:
            env[RING_ENV] = f"{self._ring_fd}:{RING_SLOTS}:{RING_SLOT_BYTES}"
            pass_fds = (self._ring_fd,)
        else:
            env.pop(RING_ENV, None)
        if self._stderr is None:
            self._stderr = tempfile.TemporaryFile()
        self._stderr.seek(0)
        self._stderr.truncate()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.audio"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            close_fds=True,
            pass_fds=pass_fds,
            bufsize=0,
        )
        try:  # a pipe of PIPE_BYTES: a chunk crosses in one or two reads, not 64 KB at a time (Linux)
            fcntl.fcntl(_pipe(self._proc.stdout).fileno(), _F_SETPIPE_SZ, PIPE_BYTES)
        except (OSError, AttributeError):
            pass  # elsewhere, or above /proc/sys/fs/pipe-max-size: the default pipe works, only slower
        self._rbuf = bytearray()
        if self._started:
            self.restarts += 1
        self._started += 1

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.kill()
        except OSError:
            pass
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is None:
                continue
            try:
                pipe.close()
            except OSError:
                pass

    @property
    def pid(self) -> int | None:
        """The child's process id, or None when no child is running."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _stderr_tail(self) -> str:
        try:
            self._stderr.seek(0, 2)
            size = self._stderr.tell()
            self._stderr.seek(max(0, size - 400))
            text = self._stderr.read().decode("utf-8", "replace").strip()
        except (OSError, AttributeError):
            return ""
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return lines[-1][:200] if lines else ""

    # -- messages
    def protocol_error(self, uri: str, kind: bytes) -> InputFault:
        """Stop the child after a message it should not have sent; the fault for `uri`."""
        self._kill()
        self._busy = False
        return DecoderCrashed(
            uri, f"decoder process sent an unexpected message {kind!r}", "a rerun retries it"
        )

    def slot_view(self, uri: str, payload: np.ndarray) -> np.ndarray:
        """The samples of a b"S" message: a float32 view of its ring slot (no copy)."""
        slot, n = _SLOT.unpack(payload.tobytes()) if payload.size == _SLOT.size else (-1, 0)
        if self._ring is None or not (0 <= slot < RING_SLOTS and 0 <= n * 4 <= RING_SLOT_BYTES):
            raise self.protocol_error(uri, b"S")
        return np.frombuffer(self._ring, dtype="<f4", count=n, offset=slot * RING_SLOT_BYTES)

    def ack(self) -> None:
        """Hand the oldest slot in flight back to the child. A child that is gone is found by the next receive."""
        proc = self._proc
        if proc is None:
            return
        try:
            _pipe(proc.stdin).write(_ACK)
        except OSError:
            pass

    def release(self, *, abandoned: bool) -> None:
        """The current input is over; `abandoned`: the child is still streaming it, so it is stopped."""
        if abandoned:
            self._kill()
        self._busy = False

    def _fill(self, out: memoryview, uri: str, budget: WaitBudget, *, direct: bool) -> None:
        """Fill `out` with the next bytes of the child's stdout: first what was read ahead, then (direct) straight
        from the pipe into `out`, or through the read-ahead buffer (small reads: headers)."""
        proc = self._proc
        if proc is None:
            raise self._crashed(uri, None)
        got = min(len(self._rbuf), len(out))
        if got:
            out[:got] = self._rbuf[:got]
            del self._rbuf[:got]
        fd = _pipe(proc.stdout).fileno()
        while got < len(out):
            left = budget.limit_s - budget.waited_s
            wait = min(self.stall_s, left)
            if wait <= 0:
                raise self._timeout(uri, budget, total=True)
            t0 = time.monotonic()
            ready, _, _ = select.select([fd], [], [], wait)
            budget.waited_s += time.monotonic() - t0
            if not ready:
                raise self._timeout(uri, budget, total=budget.waited_s >= budget.limit_s)
            try:
                if direct:
                    n = os.readv(fd, [out[got:]])
                else:
                    data = os.read(fd, 1 << 16)
                    n = min(len(data), len(out) - got)
                    out[got : got + n] = data[:n]
                    self._rbuf += data[n:]
            except OSError:
                n = 0
            if not n:
                raise self._crashed(uri, proc)
            got += n

    def receive(self, uri: str, budget: WaitBudget) -> tuple[bytes, np.ndarray]:
        """The next message of the input `uri`: (type byte, payload as a uint8 array), waiting at most what
        `budget` has left. Raises DecodeTimeout or DecoderCrashed after stopping the child and releasing it."""
        hdr = bytearray(_HDR.size)
        self._fill(memoryview(hdr), uri, budget, direct=False)
        kind, length = _HDR.unpack(hdr)
        payload = np.empty(length, dtype=np.uint8)
        if length:
            self._fill(payload.data, uri, budget, direct=True)
        return kind, payload

    def _timeout(self, uri: str, budget: WaitBudget, total: bool) -> InputFault:
        self._kill()
        self._busy = False
        if total:
            cause = f"decoding took longer than the limit of {budget.limit_s:g} s"
        else:
            cause = f"the decoder made no progress for {self.stall_s:g} s"
        return DecodeTimeout(
            uri,
            cause + "; the decoder process was stopped",
            "the file may make the decoder hang; check or replace it, or raise the limit",
        )

    def _crashed(self, uri: str, proc: subprocess.Popen | None) -> InputFault:
        code = None
        if proc is not None:
            try:
                code = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        tail = self._stderr_tail()
        self._kill()
        self._busy = False
        if code is not None and code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exited with status {code}"
        cause = f"the decoder process {how} while decoding" + (f" (last message: {tail})" if tail else "")
        return DecoderCrashed(uri, cause, "the file crashes the decoder; check or replace it")

    # -- public
    def open(
        self,
        uri: str,
        *,
        storage_options: dict | None = None,
        time_limit_s: float = 600.0,
        chunk_s: float = 2.0,
        sample_rate: int | None = None,
    ) -> _RemoteSource:
        """Start decoding `uri` in the child. Returns a source with `.info` (SourceInfo, duration filled in at
        the end), `.chunks()` (mono float32 at `.rate`: `sample_rate`, resampled in the child, or the source rate
        when None) and `.close()`. Raises InputFault subclasses."""
        if sample_rate is not None and not (isinstance(sample_rate, int) and sample_rate > 0):
            raise ValueError(f"sample_rate={sample_rate!r}: must be a positive integer number of Hz, or None")
        with self._lock:
            if self._busy:
                raise RuntimeError(
                    "DecoderProcess is decoding another input: finish or close it first, or use "
                    "one DecoderProcess per concurrent stream"
                )
            self._busy = True
        req = pickle.dumps(
            {
                "uri": uri,
                "storage_options": storage_options,
                "chunk_s": chunk_s,
                "sample_rate": sample_rate,
                "batch_s": self.batch_s,
            }
        )
        for attempt in range(2):
            if self._proc is None or self._proc.poll() is not None:
                self._kill()
                self._start()
            try:
                _pipe(self._proc.stdin if self._proc is not None else None).write(
                    _HDR.pack(b"O", len(req)) + req
                )
                break
            except (BrokenPipeError, OSError):
                self._kill()
                if attempt == 1:
                    self._busy = False
                    raise DecoderCrashed(
                        uri,
                        "the decoder process could not be started",
                        "check the Python environment (python -m pipeline.audio)",
                    ) from None
        try:
            return _RemoteSource(self, uri, time_limit_s, sample_rate)
        except BaseException:
            self._busy = False
            raise

    def close(self) -> None:
        """Stop the child (it is restarted on the next open)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                _pipe(proc.stdin).write(_HDR.pack(b"Q", 0))
                _pipe(proc.stdin).close()
                proc.wait(timeout=2)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._kill()
        self._close_ring()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> DecoderProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._kill()
            self._close_ring()
        except Exception:
            pass


_local = threading.local()


def default_decoder() -> DecoderProcess:
    """This thread's shared DecoderProcess (one child per worker thread, reused across files)."""
    dec = getattr(_local, "decoder", None)
    if dec is None:
        dec = DecoderProcess()
        _local.decoder = dec
    return dec

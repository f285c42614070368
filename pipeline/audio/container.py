"""Opening an input and reading its container: the fsspec file (open_input), the file object FFmpeg reads
through (DemuxerIO, which keeps storage failures apart from the demuxer's own invalid requests), the PyAV container
(av_open), its declared duration (probe_duration), and structure checks at the end of a file (tail_check): whether
a WAV/AIFF, MP4/M4A, ASF/WMA or Ogg file is cut short or followed by other bytes, from its own headers (RIFF/FORM
sizes, top-level boxes, objects, the last page and its end-of-stream flag). tail_check reads a few small ranges of
an open seekable file and never fails (a failed check is a warning); probe_duration never raises either.
"""

from __future__ import annotations

import struct
from typing import Any

from pipeline.storage import get_fs, storage_fault

# fsspec read block for remote inputs: big enough for few requests, small enough to keep memory flat (bytes)
READ_BLOCK_BYTES = 4 * 1024 * 1024


class DemuxerIO:
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
    """The demuxer asked DemuxerIO for something no file can give (a seek before the start)."""


def open_input(uri: str, storage_options: dict | None) -> tuple[Any, int]:
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


def av_open(io: DemuxerIO) -> Any:
    """The PyAV input container over `io` (metadata that does not decode is ignored, not an error)."""
    import av

    return av.open(io, mode="r", metadata_errors="ignore")


def probe_duration(uri: str, storage_options: dict | None = None) -> float | None:
    """The duration in seconds that `uri`'s container declares, else its first audio stream's, else None. Reads
    the headers only (no decoding), so it is an estimate: a file cut short still reports what its header says.
    Never raises: a missing, unreadable, empty or undecodable file gives None."""
    f = container = None
    try:
        f, size = open_input(uri, storage_options)
        if size == 0:
            return None
        container = av_open(DemuxerIO(f, size))
        if container.duration and container.duration > 0:
            return container.duration / 1_000_000
        for stream in container.streams.audio[:1]:
            if stream.duration and stream.time_base and stream.duration > 0:
                return float(stream.duration * stream.time_base)
        return None
    except Exception:  # an estimate skips what it cannot probe
        return None
    finally:
        for closable in (container, f):
            if closable is not None:
                try:
                    closable.close()
                except Exception:
                    pass


def tail_check(f: Any, size: int, container: str) -> str | None:
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

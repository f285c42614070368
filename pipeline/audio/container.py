"""Container structure checks at the end of a file: whether a WAV/AIFF, MP4/M4A, ASF/WMA or Ogg file is cut short
or followed by other bytes, from its own headers (RIFF/FORM sizes, top-level boxes, objects, the last page and
its end-of-stream flag). Reads a few small ranges of an open seekable file; never fails (a failed check is a
warning)."""

from __future__ import annotations

import struct
from typing import Any


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

"""Assembling commits on the driver from metadata only: record rows and the writers' flush descriptions.

The driver never sees an embedding. Each input's record row (status, duration, how many segments it sent)
arrives through the dataset; each writer flush says which segments of which recordings its files hold. A
recording is ready to commit when its record has arrived and, if it is `ok`, every segment it sent is in a
durable flush; its ledger row then names those flushes (`parts`). Pure code: unit-tested without Ray.

Segments written twice (an embed task retried on another node after its first try sent rows) are taken from
the first flush that holds them; a flush that overlaps the ones already chosen is left out of the recording's
parts, so its copy stays invisible. If the copies overlap so that no disjoint cover exists, the recording is
committed as a retryable `write_conflict` error at the end and the next run embeds it again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class _Waiting:
    record: dict | None = None
    flushes: list[tuple[str, set[int]]] = field(default_factory=list)  # in arrival order


class Assembler:
    def __init__(self) -> None:
        self.waiting: dict[str, _Waiting] = {}
        self.flushes: dict[str, dict] = {}  # flush id -> description, until committed or dropped
        self.finished: set[str] = set()
        self.ignore: set[tuple[str, str]] = set()  # (flush, recording) pairs forgotten

    def add_record(self, record: dict) -> None:
        rid = record["recording_id"]
        if rid in self.finished:
            return  # a retried decode task sends its record again
        self.waiting.setdefault(rid, _Waiting()).record = record

    def add_flush(self, meta: dict) -> None:
        self.flushes[meta["id"]] = meta
        for rid, rs in meta["covered"].items():
            if rid in self.finished or (meta["id"], rid) in self.ignore:
                continue
            segs = {s for a, b in rs for s in range(int(a), int(b) + 1)}
            self.waiting.setdefault(rid, _Waiting()).flushes.append((meta["id"], segs))

    def ready(self) -> list[tuple[dict, list[str]]]:
        """(record, parts) of every recording that can be committed now."""
        out = []
        for rid in list(self.waiting):
            w = self.waiting[rid]
            if w.record is None:
                continue
            parts = self._cover(w) if w.record["status"] == "ok" else []
            if parts is None:
                continue
            del self.waiting[rid]
            self.finished.add(rid)
            out.append((w.record, parts))
        return out

    @staticmethod
    def _cover(w: _Waiting) -> list[str] | None:
        if w.record is None:  # called only for recordings whose record arrived
            raise RuntimeError("a recording's segments were matched to flushes before its record arrived")
        need = int(w.record.get("sent", w.record.get("segments") or 0))
        chosen: list[str] = []
        covered: set[int] = set()
        for fid, segs in w.flushes:
            if segs & covered:
                continue
            chosen.append(fid)
            covered |= segs
        return chosen if len(covered) >= need and covered >= set(range(need)) else None

    def finish(self) -> list[tuple[dict, list[str]]]:
        """After every writer flushed: ready recordings, then `ok` records whose segments cannot be covered
        once each, as retryable `write_conflict` errors. Recordings without a record stay in `waiting`."""
        out = self.ready()
        for rid in list(self.waiting):
            w = self.waiting[rid]
            if w.record is None:
                continue
            rec = {
                **w.record,
                "status": "error",
                "error_kind": "write_conflict",
                "retryable": True,
                "segments": 0,
                "error_message": f"{w.record.get('uri', rid)}: its segments were written twice by retried "
                "tasks in overlapping files; the next run embeds it again",
            }
            del self.waiting[rid]
            self.finished.add(rid)
            out.append((rec, []))
        return out

    def uncovered(self) -> list[str]:
        """`ok` recordings whose record arrived but not all their segments (after every writer flushed)."""
        return sorted(
            rid
            for rid, w in self.waiting.items()
            if w.record is not None and w.record["status"] == "ok" and self._cover(w) is None
        )

    def forget(self, rids: list[str]) -> None:
        """Start these recordings over (they are embedded again): what arrived of them so far is ignored."""
        for rid in rids:
            self.waiting.pop(rid, None)
            self.finished.discard(rid)
        self.ignore.update(
            (fid, rid) for fid, meta in self.flushes.items() for rid in meta["covered"] if rid in set(rids)
        )

    def waiting_records(self) -> int:
        """Records that arrived and wait for their segments to be in a flush."""
        return sum(1 for w in self.waiting.values() if w.record is not None)

    def incomplete(self) -> int:
        return sum(1 for w in self.waiting.values() if w.record is None)


class Batch:
    """Ready recordings and the flushes they need, waiting to be committed together (by count or age)."""

    def __init__(self, max_recordings: int, interval_s: float):
        self.max_recordings, self.interval_s = max_recordings, interval_s
        self.rows: list[dict] = []
        self.adds: dict[str, dict] = {}
        self.added: set[str] = set()  # flush ids already committed by this run
        self.last = time.monotonic()

    def add(self, record: dict, parts: list[str], flushes: dict[str, dict]) -> None:
        self.rows.append({**record, "parts": parts})
        for fid in parts:
            if fid not in self.added:
                self.adds[fid] = flushes[fid]

    def age(self) -> float:
        """Seconds since the last commit (or since the batch began)."""
        return time.monotonic() - self.last

    def due(self) -> bool:
        return bool(self.rows) and (
            len(self.rows) >= self.max_recordings or time.monotonic() - self.last >= self.interval_s
        )

    def take(self) -> tuple[list[dict], list[dict]]:
        rows, adds = self.rows, list(self.adds.values())
        self.added.update(self.adds)
        self.rows, self.adds, self.last = [], {}, time.monotonic()
        return rows, adds

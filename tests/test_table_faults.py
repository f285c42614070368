"""The table's commit protocol under concurrency and faults: real processes, real signals, real stores.

Cases (issue 11, "Proof: a concurrency and fault suite"):
1. 50 writer processes, each running the `pipeline.testing.tables commit` entry, are released at once onto a
   table whose holder stopped renewing (TTL 1 s): one holder at a time (by their own clocks and by the log),
   each version once, every commit inside its own epoch, the losers exit 75 (busy), never a traceback. They
   are forked from one process that imported everything once (50 fresh interpreters cost about 50 s of CPU).
2. A live holder in another PID namespace (`unshare --pid --fork --map-root-user`, given a pid that no process
   has out here), a contender in one, and writers whose wall clock is 10 minutes ahead or behind (time.time and
   time.time_ns shifted before pipeline is imported): the live holder is never judged dead, the newer commit
   wins by version, and every `ok` recording keeps its rows.
3. A holder paused past its lease (SIGSTOP), taken over, resumed (SIGCONT): its commit is refused.
4. Faults in every write path, on a moto S3 server (its own process). The paths and the store-writing function
   each one goes through:
   - data files: `FlushWriter.flush` (`writer.write_once`, one object per layer);
   - log entries: `CommitLog.append` (`log.write_once`): the epoch, then the commit;
   - checkpoints: `CommitLog.write_checkpoint` (`log.write_whole`: ledger, state, hint);
   - markers `_lease.json` and `_table.json` (`marker.write_whole`, when the table is created);
   - the run summary `runs/<run>.json` (`FeatureTable.write_run`, `feature_table.write_whole`);
   - vacuum's and compact's rewrites (`maintenance._rewrite`, `maintenance.write_once`);
   - the heartbeat and the storage-clock probes (`lease.write_whole`), during a vacuum;
   - every log entry a `vacuum(retention_s=0, merge=True)` writes (epoch, purge, compact, vacuumed, release).
   An exception (a BaseException, as the engine's SIGTERM handler raises) is injected before each write of the
   path and after its last one landed; a real SIGTERM (default action: no clean-up) stops a child process at
   the path's last write. After each: every log version exists once and parses, every commit names the newest
   epoch, no live file differs in size from what its add recorded, a fresh reader (from the checkpoint) equals a
   full replay, `read_layer` shows the committed rows before the operation or, where its commit landed, after
   it, and the next vacuum works and changes no row. Also: a store error in the checkpoint after a commit
   landed does not fail that commit. (A write cut in the middle of one HTTP request is tests/test_atomic.py's.)
5. A reader thread looping over read_layer while commits alternate with vacuum(retention 0, merge=True), on
   local disk and on S3: every read is exactly one committed state, in commit order, never an exception.
6. The table on GCS (fake-gcs-server) and Azure (Azurite): created, committed, read; a second create of a log
   version refused (both emulators enforce create-if-absent: 412 and 409); a writer behind the log loses its
   version; a stale holder taken over on the storage's clock, then refused.

Run as `python -m tests.test_table_faults fork-writers|sigterm-zygote ...`, this module is the parent of the
processes of cases 1 and 4.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pyarrow.compute as pc
import pytest

from pipeline.atomic import AlreadyExists, list_names, read_bytes, write_once
from pipeline.errors import ExitCode, PipelineError, StaleWriter
from pipeline.table import FeatureTable
from pipeline.table import feature_table as table_mod
from pipeline.table import lease as lease_mod
from pipeline.table import log as log_mod
from pipeline.table import maintenance as maintenance_mod
from pipeline.table import marker as marker_mod
from pipeline.table import writer as writer_mod
from pipeline.table.log import CHECKPOINT_EVERY, CommitLog, entry_name
from pipeline.table.maintenance import compact, purge, vacuum
from pipeline.table.snapshot import Snapshot
from pipeline.testing.tables import commit_recordings, table_meta
from tests import servers
from tests.conftest import S3_KEY, S3_SECRET

REPO = Path(__file__).resolve().parents[1]
# As in tests/test_atomic.py: gcsfs >= 2026.10 asks a gRPC control API for each bucket's type (60 s timeouts
# against an emulator); its documented switch turns that off. gcsfs reads it when first imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
BUSY = int(ExitCode.BUSY)
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
ENTRY = [sys.executable, "-m", "pipeline.testing.tables"]  # the entry, run as `ENTRY commit ROOT RUN ...`
ENTRY_NAME = re.compile(r"^(\d{20})\.json$")


# ---- what every test checks ----------------------------------------------------------------------------
def log_entries(table: FeatureTable) -> list[dict]:
    """Every log entry, checked: versions 0..N each exist once (no gap, nothing after N), each file holds one
    JSON object whose own version is its name's."""
    names = list_names(f"{table.root}/_log", table.opts)
    versions = sorted(int(m.group(1)) for n in names if (m := ENTRY_NAME.match(n)))
    assert versions == list(range(len(versions))), f"log versions not contiguous: {versions}"
    out = []
    for v in versions:
        data = read_bytes(f"{table.root}/_log/{entry_name(v)}", table.opts)
        assert data, f"log entry {v} is empty"
        body = json.loads(data)  # one object: json.loads refuses two concatenated ones
        assert isinstance(body, dict) and body["version"] == v, (v, body)
        out.append(body)
    return out


def check_epochs(entries: list[dict]) -> list[dict]:
    """Every commit, release and vacuumed entry names the newest epoch before it. Returns the epoch entries."""
    newest = None
    epochs = []
    for e in entries:
        if e["kind"] == "epoch":
            newest = e["version"]
            epochs.append(e)
        elif e["kind"] in ("commit", "release", "vacuumed"):
            assert e["epoch"] == newest, f"entry {e['version']} of epoch {e['epoch']} after epoch {newest}"
    return epochs


def check_files_whole(table: FeatureTable, snap: Snapshot) -> None:
    """Every file a live flush names has the size its add recorded (readers then parse its footer)."""
    table.fs.invalidate_cache()
    for f in snap.flushes.values():
        for d in f.files:
            assert table.fs.size(f"{table.path}/{d['path']}") == d["bytes"], f"{d['path']} truncated"


def rows(table: FeatureTable, layer: int = 0) -> list[tuple]:
    t = table.read_layer(layer)
    return sorted(
        zip(
            t.column("recording_id").to_pylist(),
            t.column("segment").to_pylist(),
            [tuple(v) for v in t.column("embedding").to_pylist()],
            strict=True,
        )
    )


def check_ok_rows_present(table: FeatureTable) -> tuple:
    """Every recording whose newest ledger row is `ok` has all its rows in every layer. Returns each layer's
    rows (see `rows`)."""
    snap = table.snapshot()
    out = []
    for layer in snap.layers():
        got = rows(table, layer)
        have: dict[str, int] = {}
        for rid, _, _ in got:
            have[rid] = have.get(rid, 0) + 1
        for rid, row in snap.ledger.items():
            if row["status"] == "ok":
                want = sum(snap.flushes[p].recordings.get(rid, 0) for p in row["parts"])
                assert want > 0 and have.get(rid) == want, (
                    f"ok recording {rid}: {have.get(rid)} rows of {want}"
                )
        out.append(got)
    return tuple(out)


def check_table(table: FeatureTable) -> list[dict]:
    """The checks every fault leaves true. Returns the log entries."""
    return checked_state(table)[0]


def checked_state(table: FeatureTable) -> tuple[list[dict], tuple]:
    """check_table's checks; returns the log entries and what readers see (each layer's rows)."""
    entries = log_entries(table)
    check_epochs(entries)
    fresh = CommitLog(table.root, table.opts).refresh()  # from the newest checkpoint
    replay = Snapshot()
    for e in entries:
        replay.apply(e)
    assert fresh.version == replay.version and fresh.ledger == replay.ledger
    assert fresh.flushes.keys() == replay.flushes.keys()
    check_files_whole(table, replay)
    return entries, check_ok_rows_present(FeatureTable(table.root, table.opts))


def wait_for(what: str, cond: Callable[[], object], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.02)


def epoch_of(table: FeatureTable, run_id: str) -> dict | None:
    for e in CommitLog(table.root, table.opts).entries(0):
        if e["kind"] == "epoch" and e["run_id"] == run_id:
            return e
    return None


def finished(p: subprocess.Popen, timeout_s: float = 60.0) -> tuple[int, dict | None, str]:
    """(exit code, its JSON line or None, stderr) of an entry process; no traceback allowed."""
    out, err = p.communicate(timeout=timeout_s)
    assert "Traceback" not in err, err
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return p.returncode, (json.loads(lines[-1]) if lines else None), err


def entry(root: str, run_id: str, *args: str, launcher: list[str] | None = None) -> subprocess.Popen:
    """The `commit` entry in a new process; `launcher` replaces `python -m pipeline.testing.tables`."""
    return subprocess.Popen(
        [*(launcher or ENTRY), "commit", root, run_id, *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def new_table(root: str, opts: dict | None = None) -> FeatureTable:
    t = FeatureTable(root, opts)
    t.create_or_check(table_meta())
    return t


# ---- 1. fifty writers ----------------------------------------------------------------------------------
def test_fifty_processes_race_on_a_stale_lease_and_the_next_version(tmp_path):
    """50 processes, each running the `commit` entry, are released at once onto a table whose holder stopped
    renewing (TTL 1 s): they race for the same next version, then for each release."""
    root = str(tmp_path / "t")
    t = new_table(root)
    stale = t.acquire_lease("stale", ttl_s=1.0)
    commit_recordings(t, {"before": 2})
    stale.stop()  # its heartbeat stops; this process lives on, so only the TTL can judge it gone
    go, out = tmp_path / "go", tmp_path / "out"
    n = 50
    zygote = subprocess.Popen(
        [sys.executable, "-m", "tests.test_table_faults", "fork-writers", str(n), str(out), root]
        + ["--wait", "2", "--ttl", "30", "--after", str(go)],
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    ready = [out / f"w{i:02d}.out" for i in range(n)]
    wait_for("every writer to be ready", lambda: all(p.exists() and p.read_text() for p in ready), 120)
    beat = f"{root}/_lease/{stale.epoch:020d}.json"
    wait_for("the lease to go stale", lambda: time.time() - os.path.getmtime(beat) > 1.2)
    go.touch()
    zout, _ = zygote.communicate(timeout=120)
    assert zygote.returncode == 0, zout
    codes = json.loads(zout)
    results = []
    for i in range(n):
        run_id = f"w{i:02d}"
        err = (out / f"{run_id}.err").read_text()
        assert "Traceback" not in err, err
        lines = [json.loads(x) for x in (out / f"{run_id}.out").read_text().splitlines()]
        assert lines[0] == {"ready": run_id} and len(lines) == 2, lines
        results.append((codes[run_id], lines[1]))

    assert {code for code, _ in results} <= {0, BUSY}, results
    winners = [line for code, line in results if code == 0]
    losers = [line for code, line in results if code == BUSY]
    assert winners and all(line == {"run_id": line["run_id"], "busy": True} for line in losers), losers
    # one holder at a time, by the processes' own (one host's) clocks
    spans = sorted((w["acquired_at"], w["released_at"], w["run_id"]) for w in winners)
    for (_, released, a), (acquired, _, b) in zip(spans, spans[1:], strict=False):
        assert released < acquired, f"{a} and {b} held the lease at once"
    # and by the log: each winner's epoch, then its commit, then its release, then the next epoch
    entries = check_table(t)
    epochs = check_epochs(entries)
    assert [e["run_id"] for e in epochs] == ["stale", *(s[2] for s in spans)]
    by_run = {w["run_id"]: w for w in winners}
    for e in epochs[1:]:
        mine = [x for x in entries if x.get("epoch") == e["version"]]
        assert [x["kind"] for x in mine] == ["commit", "release"], mine
        assert mine[0]["version"] == by_run[e["run_id"]]["version"] == e["version"] + 1
        assert {x["run_id"] for x in mine} == {e["run_id"]}
    assert sorted(t.snapshot().ledger) == sorted(["before", *(f"{w['run_id']}-r0" for w in winners)])
    assert not [n for n in os.listdir(f"{root}/_log") if n.startswith(".")], "a temporary was left"
    with pytest.raises(StaleWriter):  # the stale holder never commits again
        commit_recordings(t, {"late": 1})


# ---- 2. another PID namespace, another clock -------------------------------------------------------------
def unshare_problem() -> str | None:
    """Why a writer cannot be started in a new PID namespace here, or None."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    p = subprocess.run(
        ["unshare", "--pid", "--fork", "--map-root-user", "true"], capture_output=True, text=True, timeout=30
    )
    if p.returncode != 0:
        return f"unshare --pid --fork --map-root-user is not permitted here: {p.stderr.strip()}"
    return None


def new_pid_namespace(pid: int) -> list[str]:
    """The entry's launcher as pid `pid` of a new PID namespace (sh is pid 1 there, and each /bin/true takes the
    next pid)."""
    script = f'i=2; while [ "$i" -lt {pid} ]; do /bin/true; i=$((i+1)); done; "$@"'
    return ["unshare", "--pid", "--fork", "--map-root-user", "sh", "-c", script, "sh", *ENTRY]


def skewed(seconds: float) -> list[str]:
    """The entry's launcher with time.time and time.time_ns shifted by `seconds`, set before pipeline is
    imported (the wall clock of a host that is off)."""
    shift = (
        "import runpy, sys, time; s = float(sys.argv.pop(1)); t, tn = time.time, time.time_ns; "
        "time.time = lambda: t() + s; time.time_ns = lambda: tn() + int(s * 1e9); "
        "runpy.run_module('pipeline.testing.tables', run_name='__main__', alter_sys=True)"
    )
    return [sys.executable, "-c", shift, str(seconds)]


def holder_and_contender(
    root: str, tag: str, holder_launcher: list[str] | None, contender_launcher: list[str] | None = None
) -> tuple[dict, dict]:
    """A holder (TTL 1 s, renewed every 0.25 s, holding 5 s) and, once it holds the table, a contender that
    waits 2 s for it: the contender must give up (busy) while the holder still runs, and the holder commit.
    Run ids: TAG-holder, TAG-contender. Returns their JSON lines."""
    t = FeatureTable(root)
    name, other = f"{tag}-holder", f"{tag}-contender"
    holder = entry(root, name, "--ttl", "1", "--hold", "5", launcher=holder_launcher)
    try:
        wait_for("the holder's epoch", lambda: epoch_of(t, name) or holder.poll() is not None)
        assert holder.poll() is None, holder.communicate()
        contender = entry(root, other, "--ttl", "1", "--wait", "2", launcher=contender_launcher)
        code, line, _ = finished(contender)
        assert holder.poll() is None, (
            "the holder ended before the contender gave up: the check proved nothing"
        )
        assert code == BUSY and line == {"run_id": other, "busy": True}, (code, line)
        hcode, hline, _ = finished(holder)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert hcode == 0 and "version" in hline, hline
    return hline, line


def test_a_live_holder_in_another_pid_namespace_is_never_judged_dead(tmp_path):
    """Same hostname, another PID namespace (pods with hostNetwork): the holder's pid means nothing out here.
    It gets a pid that no process has in this namespace, so judging it by `kill(pid, 0)` would call it dead.
    And the other way round, on a second table at the same time: a contender in a new namespace, this process
    the live holder."""
    reason = unshare_problem()
    if reason:
        pytest.skip(reason)
    pid = next((k for k in range(3, 2000) if not os.path.exists(f"/proc/{k}")), None)
    if pid is None:
        pytest.skip("every pid below 2000 is taken in this namespace")
    t, here = new_table(str(tmp_path / "t")), new_table(str(tmp_path / "here"))

    def contender_inside() -> None:
        here.acquire_lease("here", ttl_s=1.0)
        try:
            contender = entry(
                here.root, "inside", "--ttl", "1", "--wait", "2", launcher=new_pid_namespace(pid)
            )
            code, line, _ = finished(contender)
            assert code == BUSY and line == {"run_id": "inside", "busy": True}, (code, line)
            commit_recordings(here, {"here-r0": 2})
        finally:
            here.release_lease()

    with ThreadPoolExecutor(2) as pool:
        both = [
            pool.submit(holder_and_contender, t.root, "ns", new_pid_namespace(pid)),
            pool.submit(contender_inside),
        ]
        for f in both:
            f.result()
    e = check_epochs(check_table(t))[-1]
    assert (e["run_id"], e["writer"]["pid"]) == ("ns-holder", pid), e["writer"]
    assert e["writer"]["pidns"] != os.stat("/proc/self/ns/pid").st_ino
    assert sorted(t.snapshot().ledger) == ["ns-holder-r0"]
    check_table(here)
    assert sorted(here.snapshot().ledger) == ["here-r0"]


def test_writers_with_clocks_ten_minutes_off(tmp_path):
    """A holder 10 minutes ahead is not judged dead, a contender 10 minutes ahead does not judge a live holder
    dead (each on its own table, at the same time), and a commit from a host 10 minutes behind supersedes the
    older one (order is the version) and survives vacuum."""
    t, other = new_table(str(tmp_path / "t")), new_table(str(tmp_path / "other"))
    with ThreadPoolExecutor(2) as pool:
        both = [
            pool.submit(holder_and_contender, t.root, "ahead", skewed(+600)),
            pool.submit(holder_and_contender, other.root, "here", None, skewed(+600)),
        ]
        for f in both:
            f.result()
    check_table(other)
    root = t.root
    t.acquire_lease("first", ttl_s=30)
    try:
        commit_recordings(t, {"song-r0": 2}, value=1.0)
    finally:
        t.release_lease()
    behind = entry(root, "behind", "--prefix", "song", "--fingerprint", "f2", launcher=skewed(-600))
    code, line, _ = finished(behind)
    assert code == 0, line
    vacuum(t, retention_s=0)
    entries = check_table(t)
    assert [e["run_id"] for e in check_epochs(entries)][-2:] == ["behind", vacuum_run(entries)]
    newest = t.snapshot().ledger["song-r0"]
    assert (newest["fingerprint"], newest["version"]) == ("f2", line["version"])
    got = t.read_layer(0)
    song = got.filter(pc.equal(got.column("recording_id"), "song-r0"))
    assert song.num_rows == 2 and {v[0] for v in song.column("embedding").to_pylist()} == {line["epoch"]}
    check_ok_rows_present(t)


def vacuum_run(entries: list[dict]) -> str:
    return [e for e in entries if e["kind"] == "epoch"][-1]["run_id"]


# ---- 3. paused past the lease -----------------------------------------------------------------------------
def test_a_holder_paused_past_its_lease_is_refused_after_resuming(tmp_path):
    """SIGSTOP a real holder (TTL 1 s) before its commit; another writer takes the table and commits; SIGCONT:
    the resumed holder tries its commit and is refused; the other writer's work is all there."""
    root = str(tmp_path / "t")
    t = new_table(root)
    paused = entry(root, "paused", "--ttl", "1", "--hold", "3", "--commit-after-hold")
    taker = FeatureTable(root)
    try:
        wait_for("the holder's epoch", lambda: epoch_of(t, "paused"))
        os.kill(paused.pid, signal.SIGSTOP)
        taker.acquire_lease("taker", ttl_s=30, wait_s=20)  # after 1 s without a heartbeat
        commit_recordings(taker, {"taker-r0": 2}, value=7.0)
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    code, line, _ = finished(paused)
    assert code == BUSY and "superseded" in line["stale"] and "version" not in line, line
    commit_recordings(taker, {"taker-r1": 2}, value=8.0)  # the taker goes on, unharmed
    taker.release_lease()
    entries = check_table(t)
    assert [e["kind"] for e in entries if e.get("run_id") == "paused"] == ["epoch"]
    assert sorted(t.snapshot().ledger) == ["taker-r0", "taker-r1"]
    before = rows(t)
    out = vacuum(t, retention_s=0)  # the refused writer's flush is an orphan: swept, nothing else
    assert out["orphans_deleted"] == 2 and rows(t) == before and len(before) == 4
    check_table(t)


# ---- 4. faults in every write path, on S3 -----------------------------------------------------------------
class Injected(BaseException):
    """Raised inside a write, as the engine's SIGTERM handler raises `control.Interrupt` (a BaseException)."""


def _one_recording(t: FeatureTable) -> None:
    new_table(t.root, t.opts)
    t.acquire_lease("prep", ttl_s=30)
    commit_recordings(t, {"a": 2}, value=1.0)
    t.release_lease()


def _superseded(t: FeatureTable) -> None:
    """a and b in one flush, then b embedded again: the first flush holds dead rows (purge rewrites it)."""
    new_table(t.root, t.opts)
    t.acquire_lease("prep", ttl_s=30)
    commit_recordings(t, {"a": 2, "b": 2}, value=1.0)
    commit_recordings(t, {"b": 2}, value=2.0, fingerprint="f2")
    t.release_lease()


def _three_small(t: FeatureTable) -> None:
    new_table(t.root, t.opts)
    t.acquire_lease("prep", ttl_s=30)
    for i, rid in enumerate("abc"):
        commit_recordings(t, {rid: 2}, value=float(i))
    t.release_lease()


def _no_table(t: FeatureTable) -> None:
    pass


def _commit(t: FeatureTable) -> None:
    t.acquire_lease("op", ttl_s=1.0)
    commit_recordings(t, {"b": 2}, value=2.0)


def _checkpoint(t: FeatureTable) -> None:
    t.log.write_checkpoint(t.snapshot())


def _create_and_commit(t: FeatureTable) -> None:
    t.create_or_check(table_meta())
    _commit(t)


def _run_summary(t: FeatureTable) -> None:
    t.write_run("op", {"run_id": "op", "status": "complete", "started_at": "2026-01-01T00:00:00Z"})


def _purge(t: FeatureTable) -> None:
    t.acquire_lease("op", ttl_s=1.0)
    purge(t)


def _compact(t: FeatureTable) -> None:
    t.acquire_lease("op", ttl_s=1.0)
    compact(t, target_bytes=1 << 30)


def _vacuum(t: FeatureTable) -> None:
    vacuum(t, retention_s=0, merge=True, ttl_s=1.0)


@dataclass(frozen=True)
class WritePath:
    """A write path: the store-writing function it calls (module attribute), a table to start from, the
    operation. Faults are injected at each call of the function the operation makes."""

    module: ModuleType
    function: str
    prepare: Callable[[FeatureTable], None]
    op: Callable[[FeatureTable], None]


WRITE_PATHS = {
    "data-files": WritePath(writer_mod, "write_once", _one_recording, _commit),
    "log-entries": WritePath(log_mod, "write_once", _one_recording, _commit),  # the epoch, then the commit
    "checkpoint": WritePath(log_mod, "write_whole", _one_recording, _checkpoint),  # ledger, state, hint
    "markers": WritePath(marker_mod, "write_whole", _no_table, _create_and_commit),
    "run-summary": WritePath(table_mod, "write_whole", _one_recording, _run_summary),
    "purge-rewrite": WritePath(maintenance_mod, "write_once", _superseded, _purge),
    "compact-rewrite": WritePath(maintenance_mod, "write_once", _three_small, _compact),
    # vacuum: its heartbeat and storage-clock probes; then every log entry it writes (epoch, purge, compact,
    # vacuumed, release)
    "heartbeat-probes": WritePath(lease_mod, "write_whole", _superseded, _vacuum),
    "vacuum-entries": WritePath(log_mod, "write_once", _superseded, _vacuum),
}


@contextlib.contextmanager
def fault_at(path: WritePath, k: int, after: bool, fault: Callable[[], None]) -> Iterator[list[int]]:
    """Call `fault` at the k-th call (from 0, main thread only) of the path's function: before the write, or once
    it has landed (`after`). Yields the count of calls seen."""
    real = getattr(path.module, path.function)
    calls = [0]

    def wrapped(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return real(*args, **kwargs)  # the lease's renew thread: not this path's write
        i = calls[0]
        calls[0] += 1
        if i == k and not after:
            fault()
        out = real(*args, **kwargs)
        if i == k:
            fault()
        return out

    setattr(path.module, path.function, wrapped)
    try:
        yield calls
    finally:
        setattr(path.module, path.function, real)


def state(t: FeatureTable) -> tuple | None:
    """What readers see: None (no table), else each layer's rows."""
    t = FeatureTable(t.root, t.opts)
    if t.snapshot().meta is None:
        return None
    return tuple(rows(t, layer) for layer in t.layers())


def check_after_fault(t: FeatureTable, allowed: list, *, then_vacuum: bool) -> None:
    """The table as a fault left it: whole, and showing one of the `allowed` states. `then_vacuum`: the next
    run's clean-up (vacuum, retention 0, merge) then works and changes no row."""
    fresh = FeatureTable(t.root, t.opts)
    fresh.fs.invalidate_cache()
    if fresh.snapshot().meta is None:
        assert None in allowed and not log_entries(fresh)
        if not then_vacuum:
            return
        fresh.create_or_check(table_meta())
        allowed = [*allowed, ([], [])]
    else:
        for marker_name in ("_lease.json", "_table.json"):  # written before the log, so whole if it exists
            json.loads(read_bytes(fresh.uri(marker_name), fresh.opts) or b"")
        fresh.runs()  # every run summary parses
    _, seen = checked_state(fresh)
    assert seen in allowed, seen
    if then_vacuum:
        vacuum(fresh, retention_s=0, merge=True, ttl_s=1.0, wait_s=5)
        assert state(fresh) == seen


def calls_of(path: WritePath, t: FeatureTable) -> int:
    """How many times the operation calls the path's function (from the table `prepare` made)."""
    with fault_at(path, -1, False, lambda: None) as calls:
        path.op(t)
    return calls[0]


@pytest.fixture(scope="module")
def s3_process():
    """moto's S3 server in its own process (the session's threaded one shares this process's GIL with the
    client: these tests send thousands of requests). Yields storage options for a fresh bucket."""
    import boto3

    port = servers.free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for("moto_server", lambda: _answers(url) or proc.poll() is not None)
        assert proc.poll() is None, "moto_server exited at start"
        bucket = f"faults-{uuid.uuid4().hex[:8]}"
        boto3.client(
            "s3",
            endpoint_url=url,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            region_name="us-east-1",
        ).create_bucket(Bucket=bucket)
        opts = {
            "key": S3_KEY,
            "secret": S3_SECRET,
            "client_kwargs": {"endpoint_url": url, "region_name": "us-east-1"},
        }
        yield f"s3://{bucket}", opts
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def _answers(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(url, timeout=1).close()
    except urllib.error.HTTPError:
        pass
    except OSError:
        return False
    return True


_REFERENCES: dict[tuple[str, str], tuple] = {}


def reference(name: str, base: str, opts: dict) -> tuple:
    """(state before, state after, number of writes) of the path's operation, run once without faults."""
    if (name, base) not in _REFERENCES:
        path = WRITE_PATHS[name]
        ref = FeatureTable(f"{base}/{name}-ref", opts)
        path.prepare(ref)
        pre = state(ref)
        n = calls_of(path, ref)
        ref.release_lease()
        assert n >= 1
        _REFERENCES[name, base] = (pre, state(ref), n)
    return _REFERENCES[name, base]


@pytest.mark.parametrize("name", sorted(WRITE_PATHS))
def test_an_exception_in_every_write_of_a_path_leaves_the_table_whole(name, s3_process):
    """Each write of the path raises before it is sent, and the last one again once it landed: the table is
    whole and reads as before the operation, or as after it where its commit landed; after the last fault the
    next vacuum works and changes no row."""
    base, opts = s3_process
    path = WRITE_PATHS[name]
    pre, post, n = reference(name, base, opts)
    for k, after in [*((k, False) for k in range(n)), (n - 1, True)]:
        t = FeatureTable(f"{base}/{name}-{k}-{after}", opts)
        path.prepare(t)

        def fault(k: int = k, after: bool = after) -> None:
            raise Injected(f"{name}: write {k}, {'after' if after else 'before'} it landed")

        with pytest.raises(Injected), fault_at(path, k, after, fault):
            try:
                path.op(t)
            finally:
                if t.lease is not None:
                    t.lease.stop()
        t.release_lease()  # what the run's `finally` does
        check_after_fault(t, [pre, post], then_vacuum=after)


def test_a_checkpoint_that_cannot_be_written_does_not_fail_the_commit_that_landed(s3_process):
    """The commit at a checkpoint version has landed when its checkpoint is written; a store error there (a
    503, a full quota) must not tell the writer its commit failed: the checkpoint is only a cache of the log."""
    base, opts = s3_process
    t = new_table(f"{base}/checkpoint-error", opts)
    t.acquire_lease("r", ttl_s=30)
    for i in range(CHECKPOINT_EVERY - 2):  # versions 2 .. CHECKPOINT_EVERY - 1
        commit_recordings(t, {f"r{i}": 1}, value=float(i))

    def store_error() -> None:
        raise PipelineError("cannot write the checkpoint: the store refused the write (503 SlowDown)")

    with fault_at(WritePath(log_mod, "write_whole", _no_table, _no_table), 0, False, store_error) as calls:
        v = commit_recordings(t, {"at-checkpoint": 1}, value=99.0)
    assert v == CHECKPOINT_EVERY and calls[0] == 1
    commit_recordings(t, {"after": 1}, value=100.0)
    t.release_lease()
    check_table(t)
    assert {"at-checkpoint", "after"} <= {r[0] for r in rows(FeatureTable(t.root, opts))}


@pytest.fixture(scope="module")
def sigterm_zygote():
    """A process that imported everything once and forks one child per fault (see `sigterm_zygote_main`)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.test_table_faults", "sigterm-zygote"],
        env=ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    yield proc
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=30)


@pytest.mark.parametrize("name", sorted(WRITE_PATHS))
def test_sigterm_at_the_last_write_of_a_path_leaves_the_table_whole(name, s3_process, sigterm_zygote):
    """A real process runs the path's operation and is stopped by a real SIGTERM (its default action: no
    Python clean-up, no `finally`) at its last write, everything before it landed. The table is whole, and the
    next writer takes the dead process's lease at once and vacuums."""
    base, opts = s3_process
    path = WRITE_PATHS[name]
    pre, post, n = reference(name, base, opts)
    t = FeatureTable(f"{base}/{name}-sigterm", opts)
    path.prepare(t)
    job = {"path": name, "k": n - 1, "root": t.root, "opts": opts}
    assert sigterm_zygote.stdin is not None and sigterm_zygote.stdout is not None
    sigterm_zygote.stdin.write(json.dumps(job) + "\n")
    sigterm_zygote.stdin.flush()
    word, pid = sigterm_zygote.stdout.readline().split()
    assert word == "barrier", f"the child finished without reaching write {n - 1}"
    os.kill(int(pid), signal.SIGTERM)
    assert sigterm_zygote.stdout.readline().split() == ["exit", pid, str(-signal.SIGTERM)]
    check_after_fault(t, [pre, post], then_vacuum=True)


# ---- 5. readers during vacuum and compact ----------------------------------------------------------------
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_readers_during_vacuum_and_compact_see_one_committed_state(backend, tmp_path, request):
    """A reader thread loops over read_layer while commits (each adding a recording and re-embedding r0, so
    purge has dead rows to drop) alternate with vacuum(retention 0, merge=True), which rewrites, merges and
    deletes at once. The writer uses its own client (another process's view); the reader shares vacuum's.
    Every read is exactly one committed state, never missing rows, never an exception."""
    if backend == "local":
        root, opts, rounds = str(tmp_path / "t"), {}, 10
        writer_opts = opts
    else:
        base, opts = request.getfixturevalue("s3_process")
        # another s3fs object (other options: fsspec caches one per option set), as in another process
        root, writer_opts, rounds = f"{base}/readers", {**opts, "use_listings_cache": False}, 4
    new_table(root, opts)
    model: dict[str, float] = {}
    states = [()]

    def expect() -> tuple:
        return tuple(sorted((rid, seg, v) for rid, v in model.items() for seg in (0, 1)))

    reads: list[tuple] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def read_loop() -> None:
        reader = FeatureTable(root, opts)
        while not stop.is_set():
            try:
                t = reader.read_layer(0)
            except BaseException as exc:  # recorded: the assertion below names it
                errors.append(exc)
                return
            got = zip(t.column("recording_id").to_pylist(), t.column("segment").to_pylist(), strict=True)
            vals = [v[0] for v in t.column("embedding").to_pylist()]
            reads.append(tuple(sorted((rid, seg, v) for (rid, seg), v in zip(got, vals, strict=True))))
            time.sleep(0.02)  # leave the writer and vacuum some of the GIL

    thread = threading.Thread(target=read_loop, daemon=True)
    thread.start()
    merged = 0
    try:
        w = FeatureTable(root, writer_opts)
        for i in range(rounds):
            w.acquire_lease(f"w{i}", ttl_s=30)
            commit_recordings(w, {f"r{i}": 2}, value=float(i))
            model[f"r{i}"] = float(i)
            states.append(expect())
            if i:
                commit_recordings(w, {"r0": 2}, value=100.0 + i, fingerprint=f"f{i}")
                model["r0"] = 100.0 + i
                states.append(expect())
            w.release_lease()
            out = vacuum(FeatureTable(root, opts), retention_s=0, merge=True)
            merged += out["merged_flushes"] + out["rewritten"]
            assert not errors, errors
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, errors
    assert merged >= rounds - 1 and len(reads) >= rounds
    index = {s: i for i, s in enumerate(states)}
    seen = [index.get(r) for r in reads]
    assert None not in seen, [r for r in reads if r not in index][:1]
    assert seen == sorted(seen)  # never an older state after a newer one
    final = FeatureTable(root, opts)
    assert rows(final) and check_ok_rows_present(final)
    check_table(final)


# ---- 6. the table on GCS and Azure --------------------------------------------------------------------
@pytest.fixture(scope="module")
def gcs_emulator():
    reason = servers.missing_reason("gcs")
    if reason:
        pytest.skip(reason)
    import gcsfs

    if gcsfs.GCSFileSystem.__name__ != "GCSFileSystem":
        pytest.fail("gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false could be set")
    emulator = servers.start_fake_gcs()
    yield emulator
    emulator.stop()


@pytest.fixture(scope="module")
def azurite():
    reason = servers.missing_reason("azure")
    if reason:
        pytest.skip(reason)
    emulator = servers.start_azurite()
    yield emulator
    emulator.stop()


def cloud_root(backend: str, request) -> tuple[str, dict]:
    name = f"t-{uuid.uuid4().hex[:12]}"
    if backend == "gcs":
        import gcsfs

        emulator = request.getfixturevalue("gcs_emulator")
        opts = {"endpoint_url": emulator.url, "token": "anon", "project": "test"}
        gcsfs.GCSFileSystem(**opts).mkdir(name)
        return f"gs://{name}/table", opts
    import adlfs

    emulator = request.getfixturevalue("azurite")
    opts = {"connection_string": servers.azurite_connection_string(emulator)}
    adlfs.AzureBlobFileSystem(**opts).mkdir(name)
    return f"az://{name}/table", opts


@pytest.mark.parametrize("backend", ["gcs", "azure"])
def test_the_table_on_gcs_and_azure_is_created_once(backend, request):
    """On fake-gcs-server (ifGenerationMatch=0) and Azurite (If-None-Match: *): a table created, committed and
    read; a second create of a log version is refused; a writer behind the log loses its version and re-reads;
    a holder that stops renewing is taken over on the storage's clock and then refused."""
    root, opts = cloud_root(backend, request)
    t = FeatureTable(root, opts)
    t.check_writable()
    t.create_or_check(table_meta())
    behind = CommitLog(root, opts)
    behind.refresh()
    t.acquire_lease("one", ttl_s=1.0)
    v = commit_recordings(t, {"a": 2}, value=1.0)
    with pytest.raises(AlreadyExists):  # the table's own create, again
        write_once(t.log.uri(entry_name(0)), json.dumps({"kind": "create"}).encode(), opts)
    with pytest.raises(AlreadyExists):  # the version just committed
        write_once(t.log.uri(entry_name(v)), b"{}", opts)
    assert (
        behind.append({"kind": "epoch", "run_id": "late"}, epoch=None, only_at=behind.snapshot.version + 1)
        is None
    )
    t.create_or_check(table_meta())  # a second create of the table finds it: no new entry
    assert [e["kind"] for e in log_entries(t)] == ["create", "epoch", "commit"]
    # the heartbeat stops: after the TTL, on the storage's clock, another writer takes over
    t.lease.stop()
    other = FeatureTable(root, opts)
    other.acquire_lease("two", ttl_s=30, wait_s=15)
    with pytest.raises(StaleWriter):
        commit_recordings(t, {"late": 2})
    commit_recordings(other, {"b": 2}, value=2.0)
    other.release_lease()
    assert [r[0] for r in rows(FeatureTable(root, opts))] == ["a", "a", "b", "b"]
    check_table(t)


# ---- the child processes this module runs ---------------------------------------------------------------
def fork_writers(n: int, out: str, root: str, options: list[str]) -> int:
    """Fork `n` writer processes, w00.., each running the `commit` entry (pipeline.testing.tables.main) with its
    stdout and stderr in `out`/<run>.out and .err; print {run: exit code} once all have exited.

    Forked from one process that imported everything once: 50 fresh interpreters would each spend about a
    second of CPU importing pyarrow, numpy and fsspec, which two shared cores cannot give in a short test."""
    import traceback

    from pipeline.testing import tables

    tables.block({"warm": 1})  # pyarrow's lazy imports (pandas, compute) before the fork, once
    os.makedirs(out, exist_ok=True)
    pids = {}
    for i in range(n):
        run_id = f"w{i:02d}"
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for fd, ext in ((1, "out"), (2, "err")):
                    f = os.open(f"{out}/{run_id}.{ext}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(f, fd)
                    os.close(f)
                code = tables.main(["commit", root, run_id, *options])
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids[pid] = run_id
    codes = {}
    for pid, run_id in pids.items():
        _, status = os.waitpid(pid, 0)
        codes[run_id] = os.waitstatus_to_exitcode(status)
    print(json.dumps(codes), flush=True)
    return 0


def sigterm_zygote_main() -> int:
    """Read jobs ({"path", "k", "root", "opts"}) from stdin, one a line; for each, fork a child that runs the
    write path's operation on the table and, at the k-th write, prints "barrier PID" and waits for its signal;
    print "exit PID CODE" once the child is gone ("done PID" first if it finished)."""
    from pipeline.testing import tables

    tables.block({"warm": 1})
    for line in sys.stdin:
        job = json.loads(line)
        path = WRITE_PATHS[job["path"]]
        pid = os.fork()
        if pid == 0:
            try:

                def barrier() -> None:
                    os.write(1, f"barrier {os.getpid()}\n".encode())
                    while True:
                        signal.pause()

                with fault_at(path, job["k"], False, barrier):
                    path.op(FeatureTable(job["root"], job["opts"]))
                os.write(1, f"done {os.getpid()}\n".encode())
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        print(f"exit {pid} {os.waitstatus_to_exitcode(status)}", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "sigterm-zygote":
        sys.exit(sigterm_zygote_main())
    if sys.argv[1] == "fork-writers":
        sys.exit(fork_writers(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]))
    raise SystemExit(f"unknown child command {sys.argv[1]!r}")

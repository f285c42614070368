"""Issue 11's benchmarks: the table on its commit log against the previous release (the driver assembles and
writes every embedding).

    .venv/bin/python -m benchmarks.table                        # every part, ~10 min on 2 cores
    .venv/bin/python -m benchmarks.table --parts driver,ingest  # some of them; --out FILE for the JSON

Parts, each measured in fresh child processes (`python -m benchmarks.table --child NAME --spec JSON`, so no
program lives in a string); the previous release runs from a `git archive` of OLD_RELEASE with its package first
on the path, on the same venv:

  driver  a real local-Ray run of each release's `pipeline.engine.run` on generated music-like WAV/MP3 inputs
          with random checkpoints of MERT-v1-95M's output shape (13 hidden states x 768) and cheap compute, two
          feed-forward widths (two pipeline rates, the same driver work per segment). In the driver process:
          CPU seconds (psutil, user + sys, around run(), and over the steady window from the first block to
          the last) and bytes received from the cluster (the blocks the run's loop takes in, by `nbytes`:
          the old release's `Dataset.iter_batches`, this tree's `Flow`; plus the pickled size of every `ray.get` result the pipeline's own code asks for). The two
          steady windows give the driver's CPU per segment and per wall second (fit_driver_cpu). Then the
          Ray floor: a driver that starts Ray as a run does and idles as long as the fast steady window; its
          CPU per second over each window's rate is the floor's share of a segment, and the rest the
          pipeline's own (`own_cpu_ms_per_segment`).
  ingest  the driver's ceiling without Ray or a model. Before: the old `engine.Assembler` + `ShardWriter` fed
          embed-stage blocks (13 x 768 float32, 36 segments per recording) into a local table. After: what the
          new driver does per block (`engine.assemble.Assembler` + `Batch` + `FeatureTable.commit`) on the
          record rows and flush descriptions the writers would send for the same segments. Segments/s and MB/s
          of embeddings per CPU second of the driver, and GPUs per driver at GPU_SEGMENTS_PER_S.
  noop    a no-op run (every input already in the table) on a table whose recordings are fixed and whose file
          count grows 10x and 100x: bytes it reads from the log, checkpoints, feature files and the rest.
  frame   peak USS of the writer process and of the driver for a 6- and a 60-minute input at frame granularity,
          in a real run with a tiny model and a small flush target.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa

from benchmarks.common import CACHE, machine

OLD_RELEASE = "3f52c03"  # the previous release: the driver assembles every embedding and writes the shards
REPO = Path(__file__).resolve().parents[1]
PARTS = ("driver", "ingest", "noop", "frame")

LAYERS = 13  # MERT-v1-95M: the conv features' projection and 12 transformer layers
DIM = 768
SEGMENTS_PER_RECORDING = 36  # a 3-minute track in 5 s windows
BLOCK_ROWS = 32  # rows per embed-stage block in the previous release (batch_size 8 x 4)
GPU_SEGMENTS_PER_S = 2800  # MERT-v1-95M bf16 on an H100-class card: ~14,000x real time / 5 s segments
# Random MERT-v1-95M-shaped checkpoint with cheap compute: the real output (13 hidden states x 768), the tiny conv
# front end (real strides and kernels, so real frame counts) and a 64-wide feed-forward.
DRIVER_MODEL = {
    "hidden_size": DIM,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 64,
}
DRIVER_MODEL_SLOW = {**DRIVER_MODEL, "intermediate_size": 3072}  # the same output, a slower actor


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- shared by the children ------------------------------------------------------------------------------------
def record(rid: str, segments: int, seconds_per_segment: float = 5.0) -> dict:
    """A record row as the decode stage sends it for an `ok` input (pipeline.stages.decode_input)."""
    return {
        "recording_id": rid,
        "uri": f"s3://catalog-bucket/audio/artist-{rid[-3:]}/album/{rid}.mp3",
        "fingerprint": f"etag:{zlib.crc32(rid.encode()):010d}-1234567",
        "status": "ok",
        "error_kind": None,
        "retryable": False,
        "error_message": None,
        "duration_s": seconds_per_segment * segments,
        "sample_rate": 44100,
        "channels": 2,
        "codec": "mp3",
        "truncated": False,
        "warning": None,
        "segments": segments,
        "sent": segments,
    }


def layout(recordings: int, per_recording: int = SEGMENTS_PER_RECORDING, rows: int = BLOCK_ROWS):
    """The embed stage's blocks for `recordings` recordings in order: per block, its (recording, segment) rows and
    the recordings whose record row rides in it (the decode stage sends a record after its last segment)."""
    seg = [(f"rec-{r:07d}", s) for r in range(recordings) for s in range(per_recording)]
    for i in range(0, len(seg), rows):
        part = seg[i : i + rows]
        done = [rid for rid, s in part if s == per_recording - 1]
        yield part, done


class EmbedBlocks:
    """Embed-stage output blocks of the real shape (segment rows with LAYERS columns of DIM float32 vectors, then
    the record rows), sharing one random vector buffer so that making them costs little."""

    def __init__(self, layers: int = LAYERS, dim: int = DIM, rows: int = BLOCK_ROWS + 2):
        self.layers, self.dim = layers, dim
        self.values = pa.array(np.random.default_rng(0).standard_normal(rows * dim).astype(np.float32))

    def block(self, part: list[tuple[str, int]], done: list[str]) -> pa.Table:
        recs = [record(rid, SEGMENTS_PER_RECORDING) for rid in done]
        n = len(part) + len(recs)
        mask = pa.array([False] * len(part) + [True] * len(recs))
        cols: dict[str, pa.Array] = {
            "recording_id": pa.array([r for r, _ in part] + done, pa.string()),
            "segment": pa.array([s for _, s in part] + [None] * len(recs), pa.int32()),
            "start_s": pa.array([5.0 * s for _, s in part] + [None] * len(recs), pa.float64()),
            "duration_s": pa.array([5.0] * len(part) + [None] * len(recs), pa.float64()),
            "n_frames": pa.array([374] * len(part) + [0] * len(recs), pa.int32()),
            "record": pa.array([None] * len(part) + [json.dumps(r) for r in recs], pa.string()),
        }
        vals = self.values.slice(0, n * self.dim)
        for layer in range(self.layers):
            cols[f"l{layer}"] = pa.FixedSizeListArray.from_arrays(vals, self.dim, mask=mask)
        return pa.table(cols)


def cpu_s() -> float:
    import psutil

    t = psutil.Process().cpu_times()
    return t.user + t.system


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's live threads by name (Linux /proc; {} elsewhere), threads of one name summed."""
    out: dict[str, float] = {}
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return out
    for t in tasks.iterdir():
        try:
            name = (t / "comm").read_text().strip()
            out[name] = out.get(name, 0.0) + int((t / "schedstat").read_text().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            pass
    return out


def thread_cpu_spent(before: dict[str, float], after: dict[str, float], at_least: float, digits: int) -> dict:
    """CPU s each thread name spent between two thread_cpu() readings, the most first, those under `at_least`
    left out."""
    spent = {name: c - before.get(name, 0.0) for name, c in after.items()}
    return {
        name: round(d, digits) for name, d in sorted(spent.items(), key=lambda kv: -kv[1]) if d >= at_least
    }


def emit(result: dict) -> None:
    print(json.dumps({"child_result": result}), flush=True)


# ---- children: the driver in a real run ------------------------------------------------------------------------
class DriverMeter:
    """Bytes the driver process receives from the cluster: every block the run's loop takes in (`nbytes`; the
    previous release's `Dataset.iter_batches`, this tree's `engine.ray_wiring.Flow`) and the pickled size of each
    other `ray.get` result asked for by the pipeline's own code (writers' flush descriptions, device name, ...;
    the gets that fetch the blocks are the blocks already counted)."""

    def __init__(self) -> None:
        self.block_bytes = self.blocks = self.get_bytes = self.gets = 0
        # (driver CPU s, segments so far, perf_counter) at the first block and the latest: the steady window runs
        # from the first block to the last, so Ray's start-up, the model check and the final commit are outside it
        self.first: tuple[float, int, float] | None = None
        self.last: tuple[float, int, float] | None = None
        self.segments = 0
        self.threads_first: dict[str, float] = {}
        self.threads_last: dict[str, float] = {}

    def _take(self, batch) -> None:
        self.blocks += 1
        self.block_bytes += int(batch.nbytes)
        cols = getattr(batch, "column_names", ())
        if "segments" in cols:  # this tree: record rows and one summary row per block
            self.segments += sum(int(x or 0) for x in batch.column("segments").to_pylist())
        elif "record" in cols:  # the old release: a row per segment, plus record rows
            self.segments += batch.column("record").null_count
        if cols:
            self.last = (cpu_s(), self.segments, time.perf_counter())
            self.threads_last = thread_cpu()
            if self.first is None:
                self.first, self.threads_first = self.last, self.threads_last

    def install(self) -> None:
        import ray

        meter, get = self, ray.get
        try:
            from pipeline.engine.ray_wiring import Flow
        except ImportError:  # the previous release: blocks come through Ray Data
            Flow = None
        if Flow is not None:
            flow_iter = Flow.__iter__

            def counted_flow(flow):
                for batch in flow_iter(flow):
                    if batch is not None:  # None: the flow's tick, nothing received
                        meter._take(batch)
                    yield batch

            Flow.__iter__ = counted_flow  # type: ignore[method-assign]
        else:
            import ray.data

            iter_batches = ray.data.Dataset.iter_batches

            def counted_iter_batches(ds, *args, **kwargs):
                for batch in iter_batches(ds, *args, **kwargs):
                    meter._take(batch)
                    yield batch

            ray.data.Dataset.iter_batches = counted_iter_batches

        def counted_get(refs, *args, **kwargs):
            out = get(refs, *args, **kwargs)
            caller = sys._getframe(1)
            if caller.f_globals.get("__name__", "").startswith("pipeline") and not (
                caller.f_code.co_name == "_result" and "Flow" in caller.f_code.co_qualname
            ):
                meter.gets += 1
                meter.get_bytes += len(pickle.dumps(out))
            return out

        ray.get = counted_get

    def steady(self) -> dict | None:
        """Driver CPU per segment between the first block and the last."""
        if self.first is None or self.last is None or self.last[1] <= self.first[1]:
            return None
        cpu, seg = self.last[0] - self.first[0], self.last[1] - self.first[1]
        wall = self.last[2] - self.first[2]
        return {
            "cpu_s": round(cpu, 3),
            "wall_s": round(wall, 2),
            "segments": seg,
            "cpu_ms_per_segment": round(1000 * cpu / seg, 4),
            "by_thread_cpu_s": thread_cpu_spent(self.threads_first, self.threads_last, 0.005, 3),
        }


def child_driver(spec: dict) -> dict:
    """One run of whichever release's `pipeline` is first on the path, measured in this (the driver) process."""
    import pipeline
    from pipeline.config import RunConfig
    from pipeline.engine import run
    from pipeline.table import FeatureTable

    meter = DriverMeter()
    meter.install()
    cfg = RunConfig(
        input=spec["input"],
        output=spec["output"],
        model=spec["model"],
        window_s=spec["window_s"],
        min_segment_s=spec["window_s"],
        num_gpus=0,
        progress=False,
    )
    c0, w0, m0 = cpu_s(), time.perf_counter(), time.thread_time()
    summary = run(cfg, log=log)
    cpu, wall, main_cpu = cpu_s() - c0, time.perf_counter() - w0, time.thread_time() - m0
    import ray

    ray.shutdown()
    ledger = FeatureTable(spec["output"]).ledger(latest=True).to_pylist()
    return {
        "pipeline": str(Path(pipeline.__file__).parent),
        "status": summary["status"],
        "recordings_ok": sum(1 for r in ledger if r["status"] == "ok"),
        "segments": sum(int(r["segments"] or 0) for r in ledger if r["status"] == "ok"),
        "driver_cpu_s": round(cpu, 3),
        "main_thread_cpu_s": round(main_cpu, 3),  # the pipeline's own loop, without Ray's threads
        "wall_s": round(wall, 2),
        "blocks": meter.blocks,
        "block_bytes": meter.block_bytes,
        "gets": meter.gets,
        "get_bytes": meter.get_bytes,
        "bytes": meter.block_bytes + meter.get_bytes,
        "steady": meter.steady(),
    }


def child_ray_floor(spec: dict) -> dict:
    """The driver of a local Ray that runs nothing: Ray started as a run starts it (engine.ray_wiring.connect),
    then this process's CPU over `window_s` of idle (after `settle_s`), and by thread. What any driver on Ray
    spends per second whatever the pipeline does: Ray core's gRPC pollers, io and timer threads."""
    from pipeline.config import RunConfig
    from pipeline.engine.ray_wiring import connect

    connect(RunConfig(input="in", output="out"), log=log)
    time.sleep(spec["settle_s"])
    # process_time: the same user + sys as cpu_s(), every thread, at nanosecond resolution (psutil's ticks are
    # 10 ms, as much as the floor spends in a few seconds)
    c0, w0, t0 = time.process_time(), time.perf_counter(), thread_cpu()
    time.sleep(spec["window_s"])
    cpu, wall, t1 = time.process_time() - c0, time.perf_counter() - w0, thread_cpu()
    import ray

    ray.shutdown()
    return {
        "cpu_s": round(cpu, 4),
        "wall_s": round(wall, 2),
        "cpu_ms_per_s": round(1000 * cpu / wall, 3),
        "by_thread_cpu_s": thread_cpu_spent(t0, t1, 0.002, 4),
    }


# ---- children: the ingest ceiling -----------------------------------------------------------------------------
def child_ingest_old(spec: dict) -> dict:
    """The previous release's driver side: Assembler + ShardWriter (to a local table) on embed-stage blocks."""
    from pipeline.config import RunConfig
    from pipeline.engine import Assembler, ShardWriter, _table_meta, model_facts
    from pipeline.models import load_model
    from pipeline.table import FeatureTable

    cfg = RunConfig(input="-", output=spec["output"], model=spec["model"], num_gpus=0)
    facts = model_facts(cfg, load_model(spec["model"]))
    assert len(facts.layers) == LAYERS and facts.spec.dim == DIM, (facts.layers, facts.spec.dim)
    table = FeatureTable(spec["output"])
    table.init_or_check(_table_meta(cfg, facts))
    table.acquire_lease("ingest-old", 600)
    writer = ShardWriter(table, "ingest-old", facts, cfg, log)
    assembler = Assembler()
    blocks = EmbedBlocks()
    segments = commits = 0
    cpu = wall = 0.0
    for part, done in layout(spec["recordings"]):
        block = blocks.block(part, done)  # made outside the timed part
        c0, w0 = cpu_s(), time.perf_counter()
        for rec, segs in assembler.add(block):  # what engine.run does per block
            writer.add(rec, segs)
            if writer.due():
                writer.commit()
                commits += 1
        cpu, wall = cpu + cpu_s() - c0, wall + time.perf_counter() - w0
        segments += len(part)
    c0, w0 = cpu_s(), time.perf_counter()
    writer.commit()
    commits += 1
    cpu, wall = cpu + cpu_s() - c0, wall + time.perf_counter() - w0
    table.release_lease()
    return {"segments": segments, "commits": commits, "cpu_s": round(cpu, 3), "wall_s": round(wall, 3)}


def flush_template(root: str) -> tuple[dict, int]:
    """One real flush by the real FlushWriter of BLOCK_ROWS real-shaped segment rows: its description (the keys
    the driver gets) and the bytes of one layer file per row."""
    from pipeline.table.writer import FlushWriter

    w = FlushWriter(
        root,
        None,
        "template",
        layers=tuple(range(LAYERS)),
        dim=DIM,
        storage_dtype="float32",
        granularity="segment",
        frame_rate=75.0,
        metadata={"mert.model": "benchmark"},
        target_bytes=1 << 40,
        max_age_s=1e9,
        node_id="0" * 56,
        host="writer-node",
    )
    part, _ = next(layout(1))
    w.add(EmbedBlocks().block(part, []))
    meta = w.flush()
    assert meta is not None
    per_row = sum(f["bytes"] for f in meta["files"]) // (len(meta["files"]) * len(part))
    return meta, per_row


def child_ingest_new(spec: dict) -> dict:
    """The new driver side per input: its summary (record row and counts, as ray_wiring.decode_and_embed returns
    it) into the Assembler, the writers' flush descriptions as they flush at target_bytes, ready recordings into
    Batch, FeatureTable.commit when due (engine.run's loop)."""
    from pipeline.engine.assemble import Assembler, Batch
    from pipeline.engine.run import _block_counts
    from pipeline.table import FeatureTable
    from pipeline.table.writer import ranges
    from pipeline.testing.tables import table_meta

    root = spec["output"]
    template, row_file_bytes = flush_template(root + "-template")
    target = int(spec["target_mb"] * (1 << 20))
    row_nbytes = (
        EmbedBlocks()
        .block(next(layout(1))[0][:1], [])
        .select(
            [
                "recording_id",
                "segment",
                "start_s",
                "duration_s",
                "n_frames",
                *(f"l{i}" for i in range(LAYERS)),
            ]
        )
        .nbytes
    )  # what FlushWriter counts against target_bytes, per segment row
    rows_per_flush = -(-target // row_nbytes)

    # What the driver will receive, made before the clock starts: one summary per input (its record row and one
    # counts row) and, after the input that fills a writer's buffer, that flush's description.
    sink_blocks, flushes_after = [], []
    buffered: dict[str, list[int]] = {}
    nrows = seq = 0

    def describe() -> dict:
        nonlocal buffered, nrows, seq
        fid = f"ingest-new-abcd1234-{seq:05d}"
        meta = {
            "id": fid,
            "files": [
                {
                    "layer": layer,
                    "path": f"features/layer={layer}/{fid}.parquet",
                    "rows": nrows,
                    "bytes": nrows * row_file_bytes,
                }
                for layer in range(LAYERS)
            ],
            "covered": {rid: ranges(s) for rid, s in buffered.items()},
            "rows": {rid: len(s) for rid, s in buffered.items()},
            "node_id": template["node_id"],
            "host": template["host"],
        }
        assert meta.keys() == template.keys() and meta["files"][0].keys() == template["files"][0].keys()
        buffered, nrows, seq = {}, 0, seq + 1
        return meta

    for part, done in layout(spec["recordings"], rows=SEGMENTS_PER_RECORDING):
        recs = [json.dumps(record(rid, SEGMENTS_PER_RECORDING)) for rid in done]
        sink_blocks.append(
            pa.table(
                {
                    "recording_id": pa.array([*done, ""], pa.string()),
                    "record": pa.array([*recs, None], pa.string()),
                    "segments": pa.array([0] * len(recs) + [len(part)], pa.int64()),
                    "audio_s": pa.array([0.0] * len(recs) + [5.0 * len(part)], pa.float64()),
                }
            )
        )
        for rid, s in part:
            buffered.setdefault(rid, []).append(s)
        nrows += len(part)
        flushes_after.append([describe()] if nrows >= rows_per_flush else [])
    last = [describe()] if nrows else []

    table = FeatureTable(root)
    table.create_or_check(table_meta(dim=DIM, layers=tuple(range(LAYERS))))
    table.acquire_lease("ingest-new", 600)
    batch = Batch(spec["max_recordings"], spec["interval_s"])
    assembler = Assembler()
    commits: list[int] = []
    timings: dict = {}
    segments = 0

    def settle() -> None:
        for rec, parts in assembler.ready():
            batch.add(rec, parts, assembler.flushes)
        if batch.due():
            rows, adds = batch.take()
            commits.append(table.commit(rows, adds))

    c0, w0 = cpu_s(), time.perf_counter()
    for block, metas in zip(sink_blocks, flushes_after, strict=True):
        segments += _block_counts(timings, block, w0)
        for rec in block.column("record").to_pylist():
            if rec is not None:
                assembler.add_record(json.loads(rec))
        for meta in metas:
            assembler.add_flush(meta)
        settle()
    for meta in last:
        assembler.add_flush(meta)
    for rec, parts in assembler.finish():
        batch.add(rec, parts, assembler.flushes)
    rows, adds = batch.take()
    if rows:
        commits.append(table.commit(rows, adds))
    cpu, wall = cpu_s() - c0, time.perf_counter() - w0
    table.release_lease()
    assert not assembler.waiting and len(assembler.finished) == spec["recordings"]
    received = sum(b.nbytes for b in sink_blocks) + len(pickle.dumps([*sum(flushes_after, []), *last]))
    return {
        "segments": segments,
        "commits": len(commits),
        "flushes": seq,
        "rows_per_flush": rows_per_flush,
        "cpu_s": round(cpu, 3),
        "wall_s": round(wall, 3),
        "received_bytes": received,
    }


# ---- children: the no-op tick ---------------------------------------------------------------------------------
class ReadMeter:
    """Bytes read from one table, by kind: log entries, checkpoints, feature files, the rest (runs, lease,
    markers). Wraps pipeline.atomic.read_bytes wherever it was imported, and every way to open a feature file
    (FeatureTable.read_file, fsspec opens, pyarrow's readers)."""

    def __init__(self, root: str):
        self.root = str(Path(root).resolve())
        self.bytes = {"log": 0, "checkpoint": 0, "feature": 0, "other": 0}
        self.reads = {k: 0 for k in self.bytes}

    def kind(self, path: str) -> str | None:
        p = str(path).removeprefix("file://")
        if not p.startswith(self.root):
            return None
        rel = p[len(self.root) :].lstrip("/")
        if rel.startswith("_log/"):
            return "checkpoint" if ".checkpoint." in rel or rel.endswith("_last_checkpoint.json") else "log"
        if rel.startswith("features/") or rel.endswith(".parquet"):
            return "feature"
        return "other"

    def note(self, path: str, n: int) -> None:
        k = self.kind(path)
        if k is not None:
            self.bytes[k] += n
            self.reads[k] += 1

    def install(self) -> None:
        import fsspec.spec
        import pyarrow.dataset as pads
        import pyarrow.parquet as pq

        import pipeline.atomic
        from pipeline.table import feature_table

        meter, read_bytes = self, pipeline.atomic.read_bytes
        self._undo: list[tuple[object, str, object]] = []

        def patch(owner, name, new) -> None:
            self._undo.append((owner, name, getattr(owner, name)))
            setattr(owner, name, new)

        def counted_read_bytes(uri, storage_options=None):
            data = read_bytes(uri, storage_options)
            if data is not None:
                meter.note(uri, len(data))
            return data

        for mod in list(sys.modules.values()):
            if (
                getattr(mod, "__name__", "").startswith("pipeline")
                and getattr(mod, "read_bytes", None) is read_bytes
            ):
                patch(mod, "read_bytes", counted_read_bytes)
        read_file = feature_table.FeatureTable.read_file

        def counted_read_file(table, rel, columns=None):
            out = read_file(table, rel, columns)
            meter.note(f"{table.path}/{rel}", int(out.nbytes))
            return out

        patch(feature_table.FeatureTable, "read_file", counted_read_file)
        fs_open = fsspec.spec.AbstractFileSystem.open

        def counted_open(fs, path, mode="rb", *args, **kwargs):
            if "r" in mode and meter.kind(path) == "feature":
                meter.note(path, int(fs.size(path) or 0))
            return fs_open(fs, path, mode, *args, **kwargs)

        patch(fsspec.spec.AbstractFileSystem, "open", counted_open)

        def counted(orig):
            def wrapper(source, *args, **kwargs):
                if isinstance(source, (str, os.PathLike)) and meter.kind(str(source)) is not None:
                    path = Path(source)
                    files = list(path.rglob("*.parquet")) if path.is_dir() else [path]
                    meter.note(str(source), sum(f.stat().st_size for f in files if f.is_file()))
                return orig(source, *args, **kwargs)

            return wrapper

        for mod, name in ((pq, "read_table"), (pq, "ParquetFile"), (pq, "read_metadata"), (pads, "dataset")):
            patch(mod, name, counted(getattr(mod, name)))

    def uninstall(self) -> None:
        for owner, name, orig in reversed(self._undo):
            setattr(owner, name, orig)
        self._undo = []


def table_files(root: str) -> int:
    from pipeline.table import FeatureTable

    return sum(len(f.files) for f in FeatureTable(root).snapshot().flushes.values())


def grow(root: str, rounds: int, tag: str) -> None:
    """`rounds` more commits of every recording in the table, each in one new flush (the real FlushWriter), with
    the same ledger rows (uri, fingerprint): the recordings stay fixed, the files grow."""
    from pipeline.table import FeatureTable
    from pipeline.testing.tables import block, writer

    t = FeatureTable(root)
    meta = t.read_meta()
    assert meta is not None
    dim, layers = int(meta["dim"]), tuple(meta["config"]["layers"])
    rows = [r for r in t.snapshot().ledger.values() if r["status"] == "ok"]
    run_id = f"grow-{tag}"
    t.acquire_lease(run_id, 600)
    for i in range(rounds):
        w = writer(t, run_id, dim=dim, layers=layers)
        w.add(block({r["recording_id"]: int(r["segments"]) for r in rows}, dim=dim, layers=layers, value=i))
        flush = w.flush()
        assert flush is not None
        t.commit([{**r, "parts": [flush["id"]]} for r in rows], [flush])
    t.release_lease()


def child_noop(spec: dict) -> dict:
    """A real run commits the inputs; then per size: grow the files, and measure a no-op run's reads."""
    from pipeline.config import RunConfig
    from pipeline.engine import run

    root = spec["output"]

    def cfg() -> RunConfig:
        return RunConfig(input=spec["input"], output=root, model=spec["model"], num_gpus=0, progress=False)

    first = run(cfg(), log=log)
    import ray

    ray.shutdown()
    sizes = []
    base = table_files(root)
    for factor in spec["factors"]:
        have = table_files(root)
        per_round = base  # every flush writes one file per layer, as the real run's one flush did
        grow(root, max(0, (factor * base - have) // per_round), f"x{factor}")
        files = table_files(root)
        meter = ReadMeter(root)
        meter.install()
        try:
            summary = run(cfg(), log=log)
        finally:
            meter.uninstall()  # the next growth is not counted
        sizes.append(
            {
                "factor": factor,
                "files": files,
                "recordings": first["counts"]["ok"],
                "processed": summary["counts"]["processed"],
                "skipped": summary["counts"]["skipped"],
                "bytes": dict(meter.bytes),
                "reads": dict(meter.reads),
            }
        )
    return {"first_run": first["counts"], "sizes": sizes}


# ---- children: frame granularity memory -----------------------------------------------------------------------
def child_frame(spec: dict) -> dict:
    from pipeline.config import RunConfig
    from pipeline.engine import run

    cfg = RunConfig(
        input=spec["input"],
        output=spec["output"],
        model=spec["model"],
        granularity="frame",
        num_gpus=0,
        progress=False,
        shard_max_mb=spec["target_mb"],
    )
    summary = run(cfg, log=log)
    return {"status": summary["status"], "counts": summary["counts"], "writers": summary.get("writers")}


CHILDREN = {
    "driver": child_driver,
    "ray_floor": child_ray_floor,
    "ingest_old": child_ingest_old,
    "ingest_new": child_ingest_new,
    "noop": child_noop,
    "frame": child_frame,
}


# ---- the parent ------------------------------------------------------------------------------------------------
def old_release(workdir: Path) -> Path:
    """The previous release's `pipeline` package, extracted once from this repository's history."""
    dest = workdir / f"release-{OLD_RELEASE}"
    if (dest / "pipeline" / "engine.py").is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", OLD_RELEASE, "pipeline"], capture_output=True, check=False
    )
    if archive.returncode != 0:
        raise SystemExit(
            f"cannot take the previous release {OLD_RELEASE} from {REPO}'s history "
            f"({archive.stderr.decode().strip()}): run from a full clone (not shallow)"
        )
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def child(name: str, spec: dict, release: Path | None = None, sample=None, tries: int = 2) -> dict:
    """Run CHILDREN[name] in a fresh process: this tree's `pipeline`, or the release's when given. A child that
    fails is run again once (a local Ray on a loaded 2-core machine sometimes loses an actor at start-up); the
    result says so under `retried`."""
    env = dict(os.environ)
    if release is not None:  # its package first; this tree only for `benchmarks`
        env["PYTHONPATH"] = os.pathsep.join([str(release), str(REPO)])
        cwd = str(release)
    else:
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        cwd = str(REPO)
    cmd = [sys.executable, "-m", "benchmarks.table", "--child", name, "--spec", json.dumps(spec)]
    failures = []
    for _ in range(tries):
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        sampler = sample(proc.pid) if sample is not None else None
        if sampler is not None:
            sampler.start()
        out, err = proc.communicate()
        if sampler is not None:
            sampler.stop()
        for line in out.splitlines():
            if line.startswith('{"child_result"'):
                result = json.loads(line)["child_result"]
                if sampler is not None:
                    result["memory"] = sampler.result()
                if failures:
                    result["retried"] = failures
                return result
        last = [x for x in err.splitlines() if x.strip()][-1:] or ["(no output)"]
        failures.append(f"exit {proc.returncode}: {last[0][:300]}")
        log(f"[bench] child {name} failed ({failures[-1]}); stderr tail:\n{err[-6000:]}")
        if "output" in spec and Path(spec["output"]).exists():
            fresh(Path(spec["output"]))
    raise RuntimeError(f"benchmark child {name} ({release or REPO}) failed {tries} times: {failures}")


def ensure_checkpoint(name: str, overrides: dict | None) -> Path:
    from pipeline.checkpoints import write_random_checkpoint

    path = CACHE / name
    if not (path / "config.json").is_file() or not (path / "preprocessor_config.json").is_file():
        write_random_checkpoint(path, like="MERT-v1-95M", size="tiny", config_overrides=overrides)
    return path


def ensure_inputs(folder: Path, count: int, seconds: float, formats: tuple[str, ...]) -> Path:
    """`count` music-like stereo 44.1 kHz files of `seconds` each, cycling through `formats`, written once."""
    from pipeline.synth import EXTENSIONS, music_like, write_audio

    want = {"count": count, "seconds": seconds, "formats": list(formats)}
    marker = folder / "corpus.json"
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for i in range(count):
        fmt = formats[i % len(formats)]
        x = music_like(seconds, 44100, channels=2, seed=i)
        write_audio(folder / f"track_{i:04d}{EXTENSIONS[fmt]}", x, 44100, fmt)
    marker.write_text(json.dumps(want))
    return folder


def fresh(path: Path) -> str:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    return str(path)


def part_driver(args, work: Path, release: Path) -> dict:
    """Each release on the same corpus at two pipeline rates (the same output shape, two feed-forward widths, so
    the driver's work per segment is the same and only the rate differs). Over each run's steady window (first
    block to last) the driver's CPU is fitted as a x wall + b x segments: b is what the driver spends per
    segment, a what it spends per second whatever flows (Ray's threads, and in the old release Ray Data's executor,
    which runs in the driver)."""
    models = {
        "fast": ensure_checkpoint("MERT-v1-95M-shape-cheap", DRIVER_MODEL),
        "slow": ensure_checkpoint("MERT-v1-95M-shape-slow", DRIVER_MODEL_SLOW),
    }
    seconds = args.driver_window * SEGMENTS_PER_RECORDING
    n = args.driver_recordings
    corpus = ensure_inputs(work / f"driver-corpus-{n}", n, seconds, ("wav", "mp3"))
    out: dict = {
        "models": {"fast": DRIVER_MODEL, "slow": DRIVER_MODEL_SLOW},
        "window_s": args.driver_window,
        "recording_s": seconds,
        "recordings": n,
        "runs": {},
    }
    for speed, model in models.items():
        for side, rel in (("before", release), ("after", None)):
            spec = {
                "input": str(corpus),
                "output": fresh(work / f"driver-table-{side}-{speed}"),
                "model": str(model),
                "window_s": args.driver_window,
            }
            log(f"[bench] driver: {side}, {speed} model, {n} recordings")
            r = child("driver", spec, rel)
            if r["status"] != "complete" or r["recordings_ok"] != n or not r.get("steady"):
                raise RuntimeError(f"driver run {side} ({speed} model) did not commit every input: {r}")
            out["runs"][f"{side}_{speed}"] = r
    # Ray's own floor for a driver, idle through as long as the after-fast steady window
    window = max(10.0, float(out["runs"]["after_fast"]["steady"]["wall_s"]))
    log(f"[bench] driver: the Ray floor, an idle driver for {window:.0f} s")
    out["ray_floor"] = child("ray_floor", {"settle_s": 3.0, "window_s": window})
    for side in ("before", "after"):
        fast = out["runs"][f"{side}_fast"]
        steady = {speed: out["runs"][f"{side}_{speed}"]["steady"] for speed in models}
        fit = fit_driver_cpu([steady["fast"], steady["slow"]])
        out[side] = {
            "bytes_per_segment": fast["bytes"] / fast["segments"],
            "run_cpu_ms_per_segment": 1000 * fast["driver_cpu_s"] / fast["segments"],
            "steady_cpu_ms_per_segment": {k: w["cpu_ms_per_segment"] for k, w in steady.items()},
            "steady_cpu_s_per_wall_s": {k: round(w["cpu_s"] / w["wall_s"], 4) for k, w in steady.items()},
            "steady_segments_per_s": {k: round(w["segments"] / w["wall_s"], 1) for k, w in steady.items()},
            **fit,
            "cpu_ms_per_segment_at_gpu_rate": 1000 * (fit["per_s_cpu_s"] / GPU_SEGMENTS_PER_S)
            + fit["per_segment_cpu_ms"],
        }
    for side in ("before", "after"):
        out[side].update(floor_shares(out[side], out["ray_floor"]["cpu_ms_per_s"]))
    b, a = out["before"], out["after"]
    # the most any driver on Ray could show against the old release at the after run's rate: old / floor alone
    out["floor_caps_ratio_at"] = {
        speed: ratio(b["steady_cpu_ms_per_segment"][speed], a["floor_cpu_ms_per_segment"][speed])
        for speed in models
    }
    out["before_over_after"] = {
        "bytes_per_segment": ratio(b["bytes_per_segment"], a["bytes_per_segment"]),
        "run_cpu_ms_per_segment": ratio(b["run_cpu_ms_per_segment"], a["run_cpu_ms_per_segment"]),
        **{
            f"steady_cpu_ms_per_segment_{speed}": ratio(
                b["steady_cpu_ms_per_segment"][speed], a["steady_cpu_ms_per_segment"][speed]
            )
            for speed in models
        },
        **{
            f"own_cpu_ms_per_segment_{speed}": ratio(
                b["own_cpu_ms_per_segment"][speed], a["own_cpu_ms_per_segment"][speed]
            )
            for speed in models
        },
        "per_segment_cpu_ms": ratio(b["per_segment_cpu_ms"], a["per_segment_cpu_ms"]),
        "cpu_ms_per_segment_at_gpu_rate": ratio(
            b["cpu_ms_per_segment_at_gpu_rate"], a["cpu_ms_per_segment_at_gpu_rate"]
        ),
    }
    return out


def floor_shares(side: dict, floor_cpu_ms_per_s: float) -> dict:
    """Per model speed, the Ray floor's share of one steady segment at that window's rate (an idle Ray driver's
    CPU per second over the segments per second) and what is left of the window's CPU per segment: the
    pipeline's own."""
    floor = {k: round(floor_cpu_ms_per_s / rate, 4) for k, rate in side["steady_segments_per_s"].items()}
    own = {k: round(side["steady_cpu_ms_per_segment"][k] - floor[k], 4) for k in floor}
    return {"floor_cpu_ms_per_segment": floor, "own_cpu_ms_per_segment": own}


def fit_driver_cpu(windows: list[dict]) -> dict:
    """Solve cpu = a x wall + b x segments through two steady windows run at different rates: `per_s_cpu_s` (a,
    CPU s per wall second) and `per_segment_cpu_ms` (b). A b below what the measurement resolves comes out near
    0 or slightly negative: `per_segment_cpu_ms_bound` is then the largest b consistent with the windows if a
    were 0 (each window's own CPU per segment, the smaller)."""
    (c1, w1, s1), (c2, w2, s2) = ((w["cpu_s"], w["wall_s"], w["segments"]) for w in windows)
    det = w1 * s2 - w2 * s1
    if abs(det) < 1e-9 * max(w1 * s2, 1.0):
        raise ValueError("the two windows ran at the same rate: a and b cannot be separated")
    a = (c1 * s2 - c2 * s1) / det
    b = (w1 * c2 - w2 * c1) / det
    return {
        "per_s_cpu_s": round(a, 5),
        "per_segment_cpu_ms": round(1000 * b, 5),
        "per_segment_cpu_ms_bound": round(1000 * min(c1 / s1, c2 / s2), 4),
    }


def ratio(x: float, y: float) -> float | None:
    return round(x / y, 2) if y > 0 else None


def part_ingest(args, work: Path, release: Path) -> dict:
    model = ensure_checkpoint("MERT-v1-95M-shape-cheap", DRIVER_MODEL)
    emb_mb = LAYERS * DIM * 4 / 1e6  # embedding MB per segment
    log(f"[bench] ingest: before ({args.ingest_old_recordings} recordings)")
    before = child(
        "ingest_old",
        {"output": fresh(work / "ingest-old"), "model": str(model), "recordings": args.ingest_old_recordings},
        release,
    )
    log(f"[bench] ingest: after ({args.ingest_new_recordings} recordings)")
    after = child(
        "ingest_new",
        {
            "output": fresh(work / "ingest-new"),
            "recordings": args.ingest_new_recordings,
            "target_mb": 512.0,  # RunConfig.shard_max_mb's default: the writer's flush target
            "max_recordings": 2000,  # RunConfig.shard_max_recordings
            "interval_s": 60.0,  # RunConfig.commit_interval_s
        },
    )
    for r in (before, after):
        r["segments_per_cpu_s"] = r["segments"] / r["cpu_s"]
        r["embedding_mb_per_cpu_s"] = r["segments_per_cpu_s"] * emb_mb
        r["gpus_per_driver"] = r["segments_per_cpu_s"] / GPU_SEGMENTS_PER_S
    fresh(work / "ingest-old")
    fresh(work / "ingest-new")
    fresh(work / "ingest-new-template")
    return {
        "before": before,
        "after": after,
        "after_over_before": ratio(after["segments_per_cpu_s"], before["segments_per_cpu_s"]),
    }


def part_noop(args, work: Path) -> dict:
    model = ensure_checkpoint("tiny-random", None)
    corpus = ensure_inputs(work / "noop-corpus", args.noop_recordings, 3.0, ("wav", "mp3"))
    log(f"[bench] noop: a real run of {args.noop_recordings} inputs, then no-op runs at 1x, 10x, 100x files")
    out = child(
        "noop",
        {
            "input": str(corpus),
            "output": fresh(work / "noop-table"),
            "model": str(model),
            "factors": [1, 10, 100],
        },
    )
    for s in out["sizes"]:
        total = sum(s["bytes"].values())
        s["bytes_total"] = total
        s["bytes_per_file"] = total / s["files"]
        s["bytes_per_recording"] = total / s["recordings"]
    return out


class TreeSampler:
    """Peak USS of the driver (the child) and of the writer actor (`ray::_Writer`) among its descendants."""

    def __init__(self, pid: int, interval_s: float = 0.2):
        self.pid, self.interval_s = pid, interval_s
        self.peak = {"driver": 0, "writer": 0, "tree_pss": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        root = psutil.Process(self.pid)
        while not self._stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            pss = 0
            for p in procs:
                try:
                    m = p.memory_full_info()
                    name = " ".join(p.cmdline()[:1])
                except psutil.Error:
                    continue
                pss += m.pss
                if p.pid == self.pid:
                    self.peak["driver"] = max(self.peak["driver"], m.uss)
                elif name.startswith("ray::_Writer"):
                    self.peak["writer"] = max(self.peak["writer"], m.uss)
            self.peak["tree_pss"] = max(self.peak["tree_pss"], pss)
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> dict:
        return {
            f"{k}_peak_{'pss' if k == 'tree_pss' else 'uss'}_mb": round(v / 2**20, 1)
            for k, v in self.peak.items()
        }


def part_frame(args, work: Path) -> dict:
    from pipeline.synth import encode_chunks, long_music_chunks

    model = ensure_checkpoint("tiny-random", None)
    out: dict = {"target_mb": args.frame_target_mb, "runs": {}}
    for minutes in (6, 60):
        folder = work / f"frame-{minutes}min"
        path = folder / "long.wav"
        if not path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            encode_chunks(path, long_music_chunks(minutes * 60.0, 44100, 2), 44100, 2, "wav")
        log(f"[bench] frame: a {minutes}-minute input at frame granularity")
        spec = {
            "input": str(folder),
            "output": fresh(work / f"frame-table-{minutes}"),
            "model": str(model),
            "target_mb": args.frame_target_mb,
        }
        r = child("frame", spec, sample=TreeSampler)
        out["runs"][f"{minutes}min"] = r
    a, b = out["runs"]["6min"]["memory"], out["runs"]["60min"]["memory"]
    out["writer_60_over_6"] = ratio(b["writer_peak_uss_mb"], a["writer_peak_uss_mb"])
    out["driver_60_over_6"] = ratio(b["driver_peak_uss_mb"], a["driver_peak_uss_mb"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.table", description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--out", default=str(CACHE / "table.json"), help="the JSON result")
    p.add_argument("--workdir", default=str(CACHE / "table"), help="generated inputs and tables")
    p.add_argument("--driver-recordings", type=int, default=32, help="recordings per driver run")
    p.add_argument("--driver-window", type=float, default=0.25, help="seconds per segment in the driver runs")
    p.add_argument("--ingest-old-recordings", type=int, default=400)
    p.add_argument("--ingest-new-recordings", type=int, default=20000)
    p.add_argument("--noop-recordings", type=int, default=20)
    p.add_argument(
        "--frame-target-mb", type=float, default=4.0, help="the writer's flush target (shard_max_mb)"
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        emit(CHILDREN[args.child](json.loads(args.spec)))
        return 0
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = [x for x in parts if x not in PARTS]
    if bad:
        p.error(f"--parts {args.parts}: unknown {bad}; choose from {', '.join(PARTS)}")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result: dict = {
        "machine": machine(),
        "command": " ".join(["python -m benchmarks.table", *(argv or sys.argv[1:])]),
    }
    release = old_release(work) if {"driver", "ingest"} & set(parts) else None
    for name in parts:
        t = time.perf_counter()
        if name == "driver":
            result[name] = part_driver(args, work, release)
        elif name == "ingest":
            result[name] = part_ingest(args, work, release)
        elif name == "noop":
            result[name] = part_noop(args, work)
        else:
            result[name] = part_frame(args, work)
        result[name]["seconds"] = round(time.perf_counter() - t, 1)
        save(result, args.out)  # after each part: a later part's failure keeps the earlier figures
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    save(result, args.out)
    print_table(result)
    log(f"[bench] {result['seconds']} s; wrote {args.out}")
    return 0


def save(result: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))


def print_table(r: dict) -> None:
    rows: list[tuple[str, str]] = []
    if "driver" in r:
        d = r["driver"]
        for side in ("before", "after"):
            x = d[side]
            rows.append(
                (
                    f"driver {side}",
                    f"{x['bytes_per_segment']:,.1f} B/seg; steady CPU ms/seg fast {x['steady_cpu_ms_per_segment']['fast']}"
                    f" ({x['steady_segments_per_s']['fast']} seg/s), slow {x['steady_cpu_ms_per_segment']['slow']}"
                    f" ({x['steady_segments_per_s']['slow']} seg/s); CPU s per wall s {x['steady_cpu_s_per_wall_s']}; fit: {x['per_segment_cpu_ms']} ms/seg +"
                    f" {x['per_s_cpu_s']} CPU s/s; at {GPU_SEGMENTS_PER_S} seg/s "
                    f"{x['cpu_ms_per_segment_at_gpu_rate']:.4f} ms/seg",
                )
            )
        rows.append(("driver before/after", json.dumps(d["before_over_after"])))
        rows.append(
            (
                "driver Ray floor",
                f"an idle driver: {d['ray_floor']['cpu_ms_per_s']} CPU ms/s; at the after runs' rates the old "
                f"release over the floor alone: {json.dumps(d['floor_caps_ratio_at'])}",
            )
        )
        walls = ", ".join(f"{k} {v['wall_s']} s" for k, v in d["runs"].items())
        rows.append(("driver runs' wall time", walls))
    if "ingest" in r:
        g = r["ingest"]
        for side in ("before", "after"):
            s = g[side]
            rows.append(
                (
                    f"ingest {side}",
                    f"{s['segments_per_cpu_s']:,.0f} seg/CPU-s, {s['embedding_mb_per_cpu_s']:,.0f} MB/CPU-s, "
                    f"{s['gpus_per_driver']:.1f} GPUs/driver",
                )
            )
        rows.append(("ingest after / before", f"{g['after_over_before']}"))
    if "noop" in r:
        for s in r["noop"]["sizes"]:
            rows.append(
                (
                    f"noop x{s['factor']} ({s['files']} files, {s['recordings']} rec)",
                    f"{s['bytes_per_file']:,.0f} B/file, {s['bytes_per_recording']:,.0f} B/rec, "
                    f"feature bytes {s['bytes']['feature']}",
                )
            )
    if "frame" in r:
        f = r["frame"]
        for k, v in f["runs"].items():
            m = v["memory"]
            rows.append(
                (
                    f"frame {k}",
                    f"writer {m['writer_peak_uss_mb']} MB, driver {m['driver_peak_uss_mb']} MB USS",
                )
            )
        rows.append(("frame 60/6 writer, driver", f"{f['writer_60_over_6']}, {f['driver_60_over_6']}"))
    width = max(len(k) for k, _ in rows) if rows else 0
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    sys.exit(main())

"""The engine: the only library module that imports Ray.

list inputs -> minus the ledger -> Ray Data: decode tasks (CPU) -> embed actor pool (one replica per GPU, or CPU
actors) -> the driver assembles whole recordings and commits them to the table in shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import __version__
from pipeline.config import RunConfig, SegmentConfig
from pipeline.errors import PipelineError, RunIdTaken, RunInterrupted, RunStopped
from pipeline.inputs import InputItem, list_inputs, read_manifest
from pipeline.progress import Progress
from pipeline.registry import ModelSpec
from pipeline.stages import decode_batch, layer_column
from pipeline.table import (
    LEDGER_SCHEMA,
    SCHEMA_VERSION,
    FeatureTable,
    feature_schema,
    weighted_mean,
)

Log = Callable[[str], None]
# When the first inputs of a run all fail to be read for these reasons, the cause is the setup, not the files.
SYSTEMIC_KINDS = ("access_denied", "storage")
SYSTEMIC_FIRST = 5


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- planning ------------------------------------------------------------------------------------------------
@dataclass
class ModelFacts:
    spec: ModelSpec
    layers: tuple[int, ...]
    normalize: bool
    provenance: dict
    numbers: dict  # what changes the numbers: hashed into the table's configuration hash
    config_hash: str
    # the run's window, hop and min segment (the model's default window if none given)
    segments: SegmentConfig
    # a checkpoint with its own code: the code hash every node checks before importing it
    code_hash: str | None = None


def model_facts(cfg: RunConfig, loaded) -> ModelFacts:
    """Resolve layers and normalization against the checkpoint; build provenance and the configuration hash."""
    spec = loaded.spec
    layers = tuple(cfg.layers) if cfg.layers is not None else spec.layers
    bad = [i for i in layers if i >= spec.num_hidden_states]
    if bad:
        raise PipelineError(
            f"layers {bad} do not exist in {spec.name}: it has hidden states 0..{spec.num_hidden_states - 1}"
        )
    normalize = loaded.do_normalize if cfg.normalize is None else bool(cfg.normalize)
    if loaded.remote and cfg.normalize is not None:
        raise PipelineError(
            f"{spec.name} prepares its input with its own processor: --normalize/--no-normalize do not apply; "
            "leave them out"
        )
    seg = cfg.segment_config(spec.default_window_s)
    if spec.context_s is not None and seg.window_s > spec.context_s:
        raise PipelineError(
            f"window {seg.window_s:g} s is longer than {spec.name}'s context of {spec.context_s:g} s: give "
            f"--window {spec.context_s:g} or less"
        )
    from pipeline.models import receptive_field

    # samples at spec.sample_rate; a model with its own code: one frame's worth (its front end is its own)
    field = round(spec.sample_rate / spec.frame_rate) if loaded.remote else receptive_field(loaded.config)
    for name, seconds in (("window_s", seg.window_s), ("min_segment_s", seg.min_segment_s)):
        if round(seconds * spec.sample_rate) < field:  # a usage error (exit 2), like SegmentConfig's
            raise ValueError(
                f"{name}={seconds!r} is {round(seconds * spec.sample_rate)} samples at {spec.sample_rate} Hz, "
                f"shorter than the receptive field of {spec.name}: {field} samples "
                f"({field / spec.sample_rate:.4g} s); give at least that"
            )
    numbers = {
        "model_content_hash": loaded.content_hash,
        "window_s": seg.window_s,
        "hop_s": seg.hop,
        "min_segment_s": seg.min_segment_s,
        "granularity": cfg.granularity,
        "normalize": normalize,
        "compute_dtype": cfg.compute_dtype,
        "storage_dtype": cfg.storage_dtype,
        "layers": list(layers),
    }
    config_hash = hashlib.sha256(json.dumps(numbers, sort_keys=True).encode()).hexdigest()[:16]
    import torch

    provenance = {
        "model": spec.name,
        "hub_id": spec.hub_id,
        "revision": loaded.revision,
        "model_source": loaded.source
        if "://" not in loaded.source or loaded.source.startswith("file://")
        else loaded.source.split("?")[0],
        "sample_rate": spec.sample_rate,
        "frame_rate": spec.frame_rate,
        "dim": spec.dim,
        **numbers,
        "config_hash": config_hash,
        "pipeline_version": __version__,
        "table_schema_version": SCHEMA_VERSION,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "licence": loaded.licence,
        "layer_numbering": spec.layer_numbering,
    }
    if loaded.remote:
        provenance["model_code"] = "the checkpoint's own (--trust-remote-code)"
        provenance["model_code_hash"] = loaded.code_hash
    return ModelFacts(spec, layers, normalize, provenance, numbers, config_hash, seg, loaded.code_hash)


def select_work(items: list[InputItem], latest: pa.Table, retry_errors: bool) -> tuple[list[InputItem], int]:
    """Inputs to process now, and how many are skipped because the ledger already settles them."""
    known = {}
    if latest.num_rows:
        for rid, fp, status, retryable in zip(
            latest.column("recording_id").to_pylist(),
            latest.column("fingerprint").to_pylist(),
            latest.column("status").to_pylist(),
            latest.column("retryable").to_pylist(),
            strict=True,
        ):
            known[rid] = (fp, status, retryable)
    todo, skipped = [], 0
    for item in items:
        prev = known.get(item.recording_id)
        if prev is None or prev[0] != item.fingerprint or prev[1] == "deleted":
            todo.append(item)
        elif prev[1] in ("ok", "too_short"):
            skipped += 1
        elif prev[2] or retry_errors:  # transient errors retry by themselves; permanent ones when asked
            todo.append(item)
        else:
            skipped += 1
    return todo, skipped


def list_work(cfg: RunConfig) -> list[InputItem]:
    if cfg.manifest:
        items = read_manifest(cfg.input, storage_options=cfg.in_options, allow_http=cfg.allow_http)
    else:
        items = list_inputs(
            cfg.input, glob=cfg.glob, extensions=cfg.extensions, storage_options=cfg.in_options
        )
    if not items:
        raise PipelineError(
            f"no inputs found in {cfg.input}"
            + (f" matching {cfg.glob!r}" if cfg.glob else "")
            + (f" with extensions {', '.join(cfg.extensions)}" if cfg.extensions and not cfg.manifest else "")
        )
    return items


def systemic_failure(first: list[dict], total: int) -> str | None:
    """A stop reason when the first inputs of a run all failed to be read for the same setup-level reason."""
    if total < 2 or len(first) < min(SYSTEMIC_FIRST, total):
        return None
    kinds = {r.get("error_kind") for r in first}
    if any(r["status"] != "error" for r in first) or len(kinds) != 1 or not kinds <= set(SYSTEMIC_KINDS):
        return None
    return (
        f"the first {len(first)} inputs all failed to be read ({first[0]['error_kind']}): "
        f"{first[0]['error_message']}. This looks systemic (credentials, permissions, endpoint), not a bad "
        "file: fix it and rerun"
    )


# ---- assembling whole recordings on the driver ---------------------------------------------------------------
@dataclass
class _Pending:
    tables: list = field(default_factory=list)
    received: int = 0
    seen: set = field(default_factory=set)
    record: dict | None = None


class Assembler:
    """Collects embed-stage rows per recording; a recording is complete when its record row and all the segment
    rows it announces have arrived (they may arrive in any order: blocks take different actors)."""

    def __init__(self) -> None:
        self.pending: dict[str, _Pending] = {}
        self.finished: set[str] = set()  # rows of a finished recording that arrive again are dropped

    def add(self, table: pa.Table) -> list[tuple[dict, pa.Table | None]]:
        done = []
        rids = table.column("recording_id").to_pylist()
        records = table.column("record").to_pylist()
        segments = table.column("segment").to_pylist()
        seg_rows: dict[str, list[int]] = {}
        touched = []
        for i, (rid, rec, seg) in enumerate(zip(rids, records, segments, strict=True)):
            if rid in self.finished:
                continue
            p = self.pending.setdefault(rid, _Pending())
            if rec is not None:
                p.record = json.loads(rec)
            elif seg in p.seen:
                continue
            else:
                p.seen.add(seg)
                seg_rows.setdefault(rid, []).append(i)
            touched.append(rid)
        for rid, idx in seg_rows.items():
            p = self.pending[rid]
            p.tables.append(table.take(pa.array(idx)).drop_columns(["record"]))
            p.received += len(idx)
        for rid in dict.fromkeys(touched):
            p = self.pending[rid]
            if p.record is not None and p.received >= p.record.get("sent", p.record["segments"]):
                del self.pending[rid]
                self.finished.add(rid)
                segs = None
                if p.record["status"] == "ok" and p.tables:
                    segs = pa.concat_tables(p.tables).sort_by("segment")
                done.append((p.record, segs))
        return done


class ShardWriter:
    """Buffers complete recordings and commits them as shards: data files per layer, then the ledger file."""

    def __init__(self, table: FeatureTable, run_id: str, facts: ModelFacts, cfg: RunConfig, log: Log):
        self.table, self.run_id, self.facts, self.cfg, self.log = table, run_id, facts, cfg, log
        self.schema = feature_schema(facts.spec.dim, cfg.storage_dtype, cfg.granularity)
        self.metadata = {
            f"mert.{k}": json.dumps(v) if not isinstance(v, str) else v for k, v in facts.provenance.items()
        }
        self.shard = 0
        self.records: list[dict] = []
        self.segments: list[pa.Table] = []
        self.bytes = 0
        self.last_commit = time.monotonic()
        self.committed_recordings = 0

    def add(self, record: dict, segs: pa.Table | None) -> None:
        self.records.append(record)
        if segs is not None:
            if self.cfg.granularity == "recording":
                segs = self._pool_recording(segs)
            self.segments.append(segs)
            self.bytes += segs.nbytes

    def tombstone(self, previous: dict, reason: str) -> None:
        """A ledger row that hides a recording whose input is gone (its newest row was `previous`)."""
        self.records.append(
            {
                "recording_id": previous["recording_id"],
                "uri": previous["uri"],
                "fingerprint": previous["fingerprint"],
                "status": "deleted",
                "error_kind": None,
                "retryable": False,
                "error_message": reason,
                "segments": 0,
            }
        )

    def _pool_recording(self, segs: pa.Table) -> pa.Table:
        """Segment vectors -> one recording vector per layer, weighted by frame counts."""
        w = segs.column("n_frames").to_numpy()
        cols = {
            "recording_id": segs.column("recording_id").slice(0, 1),
            "segment": pa.nulls(1, pa.int32()),
            "start_s": pa.array([0.0]),
            "duration_s": pa.array([float(np.sum(segs.column("duration_s").to_numpy()))]),
            "n_frames": pa.array([int(w.sum())], pa.int32()),
        }
        dim = self.facts.spec.dim
        for layer in self.facts.layers:
            col = segs.column(layer_column(layer)).combine_chunks()
            vecs = col.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
            mean = weighted_mean(vecs, w).astype(vecs.dtype)
            cols[layer_column(layer)] = pa.FixedSizeListArray.from_arrays(
                pa.array(mean, col.type.value_type), dim
            )
        return pa.table(cols)

    def due(self) -> bool:
        return bool(self.records) and (
            len(self.records) >= self.cfg.shard_max_recordings
            or self.bytes >= self.cfg.shard_max_mb * (1 << 20)
            or time.monotonic() - self.last_commit >= self.cfg.commit_interval_s
        )

    def commit(self) -> None:
        if not self.records:
            return
        now = time.time_ns()
        layers = {}
        if self.segments:
            allsegs = pa.concat_tables(self.segments).sort_by(
                [("recording_id", "ascending"), ("segment", "ascending")]
            )
            n = allsegs.num_rows
            for layer in self.facts.layers:
                cols = [
                    allsegs.column(c)
                    for c in ("recording_id", "segment", "start_s", "duration_s", "n_frames")
                ]
                if self.cfg.granularity == "frame":
                    cols.append(pa.array(np.full(n, self.facts.spec.frame_rate)))
                cols += [
                    allsegs.column(layer_column(layer)),
                    pa.array([self.run_id] * n, pa.string()),
                    pa.array(np.full(n, self.shard, np.int32)),
                ]
                layers[layer] = pa.Table.from_arrays(
                    [c.cast(f.type) for c, f in zip(cols, self.schema, strict=True)], schema=self.schema
                )
        ledger_rows = []
        for r in self.records:
            row = {f.name: r.get(f.name) for f in LEDGER_SCHEMA}
            row.update(run_id=self.run_id, shard=self.shard, committed_at_ns=now)
            ledger_rows.append(row)
        ledger = pa.Table.from_pylist(ledger_rows, schema=LEDGER_SCHEMA)
        self.table.commit_shard(self.run_id, self.shard, layers, ledger, self.metadata)
        self.committed_recordings += len(self.records)
        self.shard += 1
        self.records, self.segments, self.bytes = [], [], 0
        self.last_commit = time.monotonic()


# ---- Ray -------------------------------------------------------------------------------------------------------
class RayMetrics:
    """The run's metrics through Ray's metrics API (ray.util.metrics), which every node's metrics agent exports
    for Prometheus (names get Ray's `ray_` prefix; see the README). A progress.MetricsSink.

    mert_audio_seconds_embedded (counter), mert_segments_embedded (counter), mert_inputs (counter, by status and
    error kind), mert_segments_per_second and mert_audio_seconds_per_second (gauges), each tagged with the model.
    """

    def __init__(self, model: str):
        from ray.util.metrics import Counter, Gauge

        self.tags = {"model": model}
        keys = ("model",)
        self._audio = Counter("mert_audio_seconds_embedded", "segment audio embedded (s)", tag_keys=keys)
        self._segments = Counter("mert_segments_embedded", "segments embedded", tag_keys=keys)
        self._inputs = Counter(
            "mert_inputs",
            "inputs finished, by status and error kind",
            tag_keys=(*keys, "status", "error_kind"),
        )
        self._seg_rate = Gauge("mert_segments_per_second", "segments embedded per second", tag_keys=keys)
        self._audio_rate = Gauge(
            "mert_audio_seconds_per_second", "audio s embedded per second", tag_keys=keys
        )

    def segments(self, audio_s: float, count: int) -> None:
        self._audio.inc(audio_s, tags=self.tags)
        self._segments.inc(count, tags=self.tags)

    def input_done(self, status: str, error_kind: str | None) -> None:
        self._inputs.inc(1, tags={**self.tags, "status": status, "error_kind": error_kind or "none"})

    def rate(self, segments_per_s: float, audio_s_per_s: float) -> None:
        self._seg_rate.set(segments_per_s, tags=self.tags)
        self._audio_rate.set(audio_s_per_s, tags=self.tags)


class _QuietProgressWarning(logging.Filter):
    """Ray Data warns "Progress bars disabled" once per process when its own bars are off; the run has its own
    progress (pipeline.progress), so the warning only confuses."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Progress bars disabled")


def connect(cfg: RunConfig, log: Log):
    """Join the cluster (cfg.address or RAY_ADDRESS), or start a local Ray."""
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        else:
            ray.init(logging_level=logging.WARNING, include_dashboard=False)
    except Exception as exc:  # systemic
        raise PipelineError(
            f"cannot start or join Ray ({address or 'local'}): {type(exc).__name__}: {exc}"
        ) from None
    return ray


@dataclass
class Placement:
    device: str
    actors: int
    num_gpus: float
    cpus_per_actor: float
    threads: int
    decode_workers: int | None


def place(cfg: RunConfig, ray, log: Log = _stderr) -> Placement:
    res = ray.cluster_resources()
    cpus, gpus = int(res.get("CPU", 1)), int(res.get("GPU", 0))
    want = gpus if cfg.num_gpus is None else cfg.num_gpus
    if want > gpus and cfg.gpu_wait_s > 0:
        gpus = wait_for_gpus(ray, want, gpus, cfg.gpu_wait_s, log)
        cpus = int(ray.cluster_resources().get("CPU", 1))
    if want > gpus:
        raise PipelineError(
            f"num_gpus={want}, but the cluster has {gpus} GPU(s)"
            + (f" after waiting {cfg.gpu_wait_s:.0f} s" if cfg.gpu_wait_s > 0 else "")
            + ": lower num_gpus, or give GPU nodes time to join with --gpu-wait SECONDS"
        )
    if want > 0:
        return Placement("cuda", want, 1.0, 1.0, 1, cfg.decode_workers)
    if cfg.compute_dtype != "float32":
        raise PipelineError(
            f"compute_dtype={cfg.compute_dtype} needs a GPU; this cluster has none (use float32)"
        )
    actors = cfg.num_actors or 1
    # Leave at least one core to the decode tasks, or the dataset hangs with every CPU held by actors.
    per = cfg.cpus_per_actor or max(1.0, math.floor(max(1, cpus - 1) / actors))
    if actors * per >= cpus:
        raise PipelineError(
            f"{actors} CPU actor(s) x {per} cores leaves no core for decoding on a cluster of {cpus}: "
            "lower num_actors or cpus_per_actor"
        )
    # torch threads: the actor's cores, or when the machine is shared with decoding alone (cpus_per_actor
    # unset), every core the actors split: decoding costs a few percent of what the model does on a CPU.
    threads = int(per) if cfg.cpus_per_actor else max(1, cpus // actors)
    return Placement("cpu", actors, 0.0, per, threads, cfg.decode_workers)


def wait_for_gpus(ray, want: int, have: int, wait_s: float, log: Log) -> int:
    """GPU pods that are still starting, or an autoscaler that adds GPU nodes on demand: ask the autoscaler for
    `want` GPU bundles (a no-op without one) and wait until the cluster offers them, or wait_s passes."""
    log(f"[mert] waiting up to {wait_s:.0f} s for {want} GPU(s); the cluster has {have} now")
    asked = False
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{"GPU": 1}] * want)
        asked = True
    except Exception:  # without an autoscaler, nodes may still join by themselves
        pass
    deadline = time.monotonic() + wait_s
    while have < want and time.monotonic() < deadline:
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
        have = int(ray.cluster_resources().get("GPU", 0))
    if asked:
        try:
            request_resources(bundles=[])  # the actors' own demand keeps the nodes from here on
        except Exception:
            pass
    return have


def device_name(ray, placement: Placement) -> str:
    if placement.device != "cuda":
        return f"cpu ({platform.machine()})"

    @ray.remote(num_gpus=1, max_retries=0)
    def _name() -> str:
        import torch

        return torch.cuda.get_device_name(0)

    try:
        return ray.get(_name.remote(), timeout=120)
    except Exception:  # provenance only
        return "cuda (unknown)"


DECODE_TABLE_SEGMENTS = 8  # segments per table a decode task yields (stages.decode_input)
# An input under which the worker process died this many times becomes an `error` row (worker_crash). A decode
# task is tried one more time than that, plus one spare for a node that dies under an innocent input.
INPUT_CRASH_LIMIT = 2
DECODE_TASK_RETRIES = INPUT_CRASH_LIMIT + 1


class Attempts:
    """begin/end of each input's decode, counted by one small actor on the driver's node (it outlives the
    workers that die). Passed to the decode stage, which knows nothing of Ray: see stages.decode_input."""

    def __init__(self, handle):
        self.handle = handle

    @classmethod
    def start(cls, ray) -> Attempts:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        class _Counter:
            def __init__(self):
                self.open: dict[str, int] = {}

            def begin(self, key: str) -> int:
                n = self.open.get(key, 0)
                self.open[key] = n + 1
                return n

            def end(self, key: str) -> None:
                self.open.pop(key, None)

        here = ray.get_runtime_context().get_node_id()
        handle = (
            ray.remote(num_cpus=0, max_restarts=0)(_Counter)
            .options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False))
            .remote()
        )
        return cls(handle)

    def begin(self, key: str) -> int:
        import ray

        try:
            return int(ray.get(self.handle.begin.remote(key), timeout=60))
        except Exception:  # without the counter, Ray's own retry bound still holds
            return 0

    def end(self, key: str) -> None:
        try:
            self.handle.end.remote(key)
        except Exception:
            pass

    def close(self) -> None:
        import ray

        try:
            ray.kill(self.handle)
        except Exception:
            pass


def build_dataset(
    ray,
    cfg: RunConfig,
    facts: ModelFacts,
    todo: list[InputItem],
    placement: Placement,
    attempts: Attempts | None = None,
):
    import warnings

    import ray.data
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    from pipeline.stages import EmbedStage

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    quiet = logging.getLogger("ray.data._internal.progress")
    if not any(isinstance(f, _QuietProgressWarning) for f in quiet.filters):
        quiet.addFilter(_QuietProgressWarning())
    ctx.print_on_execution_start = False
    seg = facts.segments
    window_bytes = int(round(seg.window_s * facts.spec.sample_rate)) * 4  # one window of float32 audio
    embed_rows = cfg.batch_size * 4
    # Blocks of about one decode table, so decoded audio streams to the actors table by table (Ray's default
    # 128 MiB blocks made a decode task of a long input hold ~23 minutes of audio before handing any of it on) ...
    ctx.target_max_block_size = max(1 << 20, int(0.75 * DECODE_TABLE_SEGMENTS * window_bytes))
    # ... and a bound on what waits in the object store: decoding outruns a CPU actor ~40x, and under Ray's default
    # budget (half the object store) a 60-minute input queued all of its audio (~345 MB at 24 kHz), a catalog
    # up to that budget. Room for 4 embed calls per actor, inputs and outputs, is plenty to keep actors fed.
    out_row = (
        len(facts.layers)
        * facts.spec.dim
        * 4
        * (math.ceil(seg.window_s * facts.spec.frame_rate) if cfg.granularity == "frame" else 1)
    )
    ahead = max(256 << 20, placement.actors * 4 * embed_rows * (window_bytes + out_row))
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=ahead
    )
    # Ray 2.60 has no named parameter for max_restarts / max_task_retries / max_retries, and warns about the
    # free-form remote args that carry them (announced for removal in 2.64). Bounded beats infinite: keep them.
    warnings.filterwarnings(
        "ignore", message=".*ray_remote_args.* is deprecated", category=DeprecationWarning
    )
    # An item with a fault (a bad manifest row, a symlink cycle) reaches the decode stage too: it becomes that
    # input's error row there, like any other bad input.
    items = [
        {
            "uri": i.uri,
            "recording_id": i.recording_id,
            "fingerprint": i.fingerprint,
            "fault_kind": i.fault_kind,
            "fault_message": i.fault_message,
        }
        for i in todo
    ]
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 4096))
    ds = ds.map_batches(
        decode_batch,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={
            "sample_rate": facts.spec.sample_rate,
            "segments": seg,
            "segments_per_table": DECODE_TABLE_SEGMENTS,
            "storage_options": cfg.in_options,
            "time_limit_s": cfg.decode_timeout_s,
            "attempts": attempts,
            "crash_limit": INPUT_CRASH_LIMIT,
        },
        compute=TaskPoolStrategy(size=placement.decode_workers) if placement.decode_workers else None,
        num_cpus=1,
        # A task whose worker dies is retried a bounded number of times, not forever; the input it was reading
        # when its worker died INPUT_CRASH_LIMIT times comes back as an error row (Attempts).
        max_retries=DECODE_TASK_RETRIES,
    )
    ds = ds.map_batches(
        EmbedStage,
        fn_constructor_args=(cfg.model,),
        fn_constructor_kwargs={
            "storage_options": cfg.in_options,
            "cache_dir": cfg.model_cache,
            "layers": facts.layers,
            "granularity": cfg.granularity,
            "device": placement.device,
            "compute_dtype": cfg.compute_dtype,
            "storage_dtype": cfg.storage_dtype,
            "normalize": facts.normalize,
            "batch_size": cfg.batch_size,
            "threads": placement.threads,
            "trust_remote_code": cfg.trust_remote_code,
            "expected_code_hash": facts.code_hash,  # each actor checks its staged code against the driver's
        },
        batch_size=embed_rows,  # room to group equal-length segments into full model batches
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=placement.actors),
        num_gpus=placement.num_gpus or None,
        num_cpus=placement.cpus_per_actor,
        # No named parameters exist for these yet: bounded restarts and retries instead of Ray's infinite ones.
        max_restarts=2,
        max_task_retries=2,
    )
    return ds


# ---- the run -------------------------------------------------------------------------------------------------
def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def estimate(cfg: RunConfig, facts: ModelFacts, todo: list[InputItem], loaded, log: Log) -> dict:
    """Dry-run estimates: audio hours from a sample of headers, output size from the layout, time from one
    model batch timed on this machine."""
    sample = todo[:: max(1, len(todo) // 16)][:16]
    secs, size = 0.0, 0
    for item in sample:
        d = _probe_duration(item.uri, cfg.in_options)
        if d:
            secs += d
            size += max(1, item.size)
    total_bytes = sum(max(1, i.size) for i in todo)
    hours = (secs / size * total_bytes / 3600) if size else 0.0
    seg = facts.segments
    width = len(facts.layers) * facts.spec.dim * (2 if cfg.storage_dtype == "float16" else 4)
    if cfg.granularity == "segment":
        out_bytes = hours * 3600 / seg.hop * width
    elif cfg.granularity == "recording":
        out_bytes = len(todo) * width
    else:
        out_bytes = hours * 3600 * facts.spec.frame_rate * width
    from pipeline.embed import Embedder

    emb = Embedder(loaded, layers=facts.layers, granularity="segment", device="cpu")
    n = int(seg.window_s * facts.spec.sample_rate)
    x = np.random.default_rng(0).standard_normal((cfg.batch_size, n)).astype(np.float32) * 0.1
    emb.embed(x[:1])
    t = time.perf_counter()
    emb.embed(x)
    rate = cfg.batch_size * seg.window_s / (time.perf_counter() - t)
    return {
        "inputs_to_process": len(todo),
        "input_bytes": total_bytes,
        "estimated_audio_hours": round(hours, 3),
        "estimated_output_bytes": int(out_bytes),
        "model_audio_s_per_s_on_this_machine_cpu": round(rate, 2),
        "estimated_hours_at_that_rate_per_actor": round(hours * 3600 / rate / 3600, 3) if rate else None,
        "note": "time is measured on this machine's CPU with one model batch; a GPU is typically far faster",
    }


def _probe_duration(uri: str, storage_options: dict) -> float | None:
    import av

    from pipeline.storage import get_fs

    try:
        fs, path = get_fs(uri, storage_options)
        with fs.open(path, "rb") as f, av.open(f) as c:
            if c.duration:
                return c.duration / 1_000_000
            stream = c.streams.audio[0]
            if stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
    except Exception:  # an estimate skips what it cannot probe
        return None
    return None


def run(cfg: RunConfig, log: Log = _stderr) -> dict:
    """Run the pipeline. Returns the run summary (also written to runs/<run_id>.json).

    Raises PipelineError for systemic failures (before any work), RunStopped when the error-rate limit stops the
    run and RunInterrupted on SIGTERM/SIGINT (both after committing what finished; `.summary` is the record).
    """
    from pipeline.models import load_model

    t0 = time.time()
    run_id = cfg.run_id or new_run_id()
    # Systemic checks first, each failing fast with one message.
    items = list_work(cfg)
    try:
        loaded = load_model(
            cfg.model,
            storage_options=cfg.in_options,
            cache_dir=cfg.model_cache,
            trust_remote_code=cfg.trust_remote_code,
        )
    except PipelineError:
        raise
    except Exception as exc:
        raise PipelineError(f"cannot load model {cfg.model}: {type(exc).__name__}: {exc}") from None
    facts = model_facts(cfg, loaded)
    table = FeatureTable(cfg.output, cfg.out_options)
    meta = table.read_meta()
    if meta is not None and meta.get("config_hash") != facts.config_hash:
        table.init_or_check(_table_meta(cfg, facts))  # raises with the differences
    if cfg.dry_run:
        latest = table.ledger(latest=True) if meta is not None else LEDGER_SCHEMA.empty_table()
        todo, skipped = select_work(items, latest, cfg.retry_errors)
        gone = _gone(items, latest) if cfg.mirror_deletions else []
        return {
            "run_id": None,
            "status": "dry_run",
            "inputs_listed": len(items),
            "skipped": skipped,
            "to_tombstone": len(gone),
            "work": [i.uri for i in todo],
            **estimate(cfg, facts, todo, loaded, log),
        }
    del loaded
    table.check_writable()
    # The lease first, then the ledger: a run that waited for another one's lease sees what that run committed.
    table.acquire_lease(run_id, cfg.lease_ttl_s, cfg.lease_wait_s)
    try:
        used = table.run_files(run_id)
    except BaseException:
        table.release_lease()
        raise
    if used:  # a run never overwrites another run's shards or record
        table.release_lease()
        raise RunIdTaken(
            f"run id {run_id!r} is already used in {cfg.output} ({len(used)} file(s), e.g. "
            f"{used[0].rsplit('/', 1)[-1]}): give a new --run-id, or none for a fresh one"
        )
    if cfg.tick:
        try:
            done = [r for r in table.runs() if r.get("tick") == cfg.tick and r.get("status") == "complete"]
        except BaseException:
            table.release_lease()
            raise
        if done:
            table.release_lease()
            log(
                f"[mert] tick {cfg.tick} is already complete in {cfg.output} (run {done[0]['run_id']}): nothing to do"
            )
            return {
                "run_id": None,
                "status": "noop",
                "tick": cfg.tick,
                "done_by": done[0]["run_id"],
                "counts": {"listed": len(items)},
            }
    counts: dict[str, Any] = {
        "listed": len(items),
        "skipped": 0,
        "processed": 0,
        "ok": 0,
        "error": 0,
        "too_short": 0,
        "deleted": 0,
        "errors_by_kind": {},
        "truncated": 0,
    }
    summary: dict[str, Any] = {
        "run_id": run_id,
        "status": "running",
        "started_at": _now(),
        "tick": cfg.tick,
        "config": cfg.public_dict(),
        "config_hash": facts.config_hash,
        "provenance": facts.provenance,
        "counts": counts,
    }
    audio_s = 0.0
    writer = beat = attempts = None
    signals = _Signals()
    # when the stages started to deliver, so that a summary separates start-up (Ray, actor model load, the first
    # batch) from the steady rate: seconds since t0, and segment audio seconds delivered after the first block
    timings: dict = {}
    signals.install()
    try:
        table.init_or_check(_table_meta(cfg, facts))
        cleaned = table.vacuum(live_runs={run_id})
        if cleaned["removed_files"]:
            log(f"[mert] removed {len(cleaned['removed_files'])} file(s) of interrupted runs")
        latest = table.ledger(latest=True)
        todo, counts["skipped"] = select_work(items, latest, cfg.retry_errors)
        writer = ShardWriter(table, run_id, facts, cfg, log)
        if cfg.mirror_deletions:
            gone = _gone(items, latest)
            live = sum(1 for s_ in latest.column("status").to_pylist() if s_ != "deleted")
            if len(gone) > cfg.max_delete_fraction * live:
                raise PipelineError(
                    f"{len(gone)} of the table's {live} recordings are no longer listed in {cfg.input}: more "
                    f"than --max-delete-fraction {cfg.max_delete_fraction:.0%}. Nothing was tombstoned. Check "
                    "the input (a mistyped prefix lists nothing of the catalog), or raise the fraction"
                )
            with signals.hold():
                for row in gone:
                    writer.tombstone(row, f"{row['uri']}: no longer listed in {cfg.input} (run {run_id})")
                counts["deleted"] = len(gone)
                writer.commit()
            if gone:
                log(f"[mert] tombstoned {len(gone)} recording(s) whose input is gone")
        log(
            f"[mert] run {run_id}: {len(todo)} to process, {counts['skipped']} skipped (already in the "
            f"table), model {facts.spec.name}, layers {list(facts.layers)}"
        )
        if todo:
            ray = connect(cfg, log)
            signals.install()  # again: starting Ray's core worker puts its own (aborting) SIGTERM handler in place
            placement = place(cfg, ray, log)
            timings["ray_ready_s"] = round(time.time() - t0, 3)
            facts.provenance["device"] = device_name(ray, placement)
            writer.metadata["mert.device"] = facts.provenance["device"]
            attempts = Attempts.start(ray)
            ds = build_dataset(ray, cfg, facts, todo, placement, attempts)
            assembler = Assembler()
            first: list[dict] = []
            stop_reason = None
            sizes = {i.recording_id: i.size for i in todo}
            beat = Progress(
                counts,
                len(todo),
                sum(sizes.values()),
                log,
                every_s=10.0 if cfg.progress else 0,
                metrics=RayMetrics(facts.spec.name),
            )
            # prefetch_batches=0: each block reaches the driver when its task finishes. Ray's prefetcher
            # holds finished blocks back until it has more of them (with 2, a short run delivered everything
            # at the end), which delays commits and progress; the executor keeps running either way.
            for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                with signals.hold():  # a signal here waits for the block's commit, then ends the loop
                    beat.segments(*_time_block(timings, block, t0))
                    for record, segs in assembler.add(block):
                        counts["processed"] += 1
                        status = record["status"]
                        counts[status] += 1
                        if status == "error":
                            k = record.get("error_kind") or "?"
                            counts["errors_by_kind"][k] = counts["errors_by_kind"].get(k, 0) + 1
                        if record.get("truncated"):
                            counts["truncated"] += 1
                        if status == "ok":
                            audio_s += float(record.get("duration_s") or 0.0)
                        beat.input_done(record, sizes.get(record["recording_id"], 0))
                        writer.add(record, segs)
                        if writer.due():
                            writer.commit()
                        if counts["processed"] <= SYSTEMIC_FIRST:
                            first.append(record)
                            stop_reason = systemic_failure(first, len(todo))
                            if stop_reason:
                                break
                        if (
                            counts["processed"] >= cfg.error_rate_min_inputs
                            and counts["error"] / counts["processed"] > cfg.max_error_rate
                        ):
                            stop_reason = (
                                f"error rate {counts['error']}/{counts['processed']} passed the limit "
                                f"{cfg.max_error_rate:.0%} (errors by kind: {counts['errors_by_kind']}); "
                                "the finished work is committed. Check the inputs, or raise --max-error-rate"
                            )
                            break
                    if (
                        not stop_reason and writer.due()
                    ):  # the interval also passes while blocks are in flight
                        writer.commit()
                if stop_reason or signals.received:
                    break
            beat.close()
            with signals.hold():
                writer.commit()
            if signals.received:
                raise _Interrupt(signals.received)
            if stop_reason:
                summary["status"] = "stopped"
                summary["stop_reason"] = stop_reason
            elif assembler.pending:
                raise PipelineError(f"{len(assembler.pending)} recording(s) never completed in the dataset")
        if summary["status"] == "running":
            summary["status"] = "complete"
    except _Interrupt as exc:
        # Between blocks or while waiting for one: commit the recordings already complete, then stop. Nothing
        # is half-written: a commit is never cut by the signal, and a shard only counts once its ledger file is.
        with signals.hold():
            if writer is not None:
                writer.commit()
        summary["status"] = "interrupted"
        summary["stop_reason"] = (
            f"{exc.signame} received: the run stopped at a commit boundary with "
            f"{counts['processed']} input(s) committed; rerun to resume"
        )
    except BaseException as exc:
        summary["status"] = "failed"
        summary["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        with signals.hold():
            if beat is not None:
                beat.close()
            if attempts is not None:
                attempts.close()
            wall = time.time() - t0
            summary.update(
                finished_at=_now(),
                wall_s=round(wall, 3),
                audio_hours=round(audio_s / 3600, 6),
                audio_s_per_s=round(audio_s / wall, 3) if wall > 0 else None,
                shards=writer.shard if writer else 0,
                timings=_steady(timings),
                versions={"pipeline": __version__, "python": platform.python_version(), **_versions()},
            )
            try:
                table.write_run(run_id, summary)  # written last
            finally:
                table.release_lease()
                signals.uninstall()
    if summary["status"] == "stopped":
        raise RunStopped(f"run {run_id} stopped: {summary['stop_reason']}", summary)
    if summary["status"] == "interrupted":
        raise RunInterrupted(f"run {run_id} interrupted: {summary['stop_reason']}", summary)
    return summary


def _gone(items: list[InputItem], latest: pa.Table) -> list[dict]:
    """Newest ledger rows of recordings that are no longer listed (and not already tombstoned)."""
    listed = {i.recording_id for i in items}
    rows = latest.select(["recording_id", "uri", "fingerprint", "status"]).to_pylist()
    return [r for r in rows if r["recording_id"] not in listed and r["status"] != "deleted"]


class _Interrupt(BaseException):
    def __init__(self, signame: str):
        super().__init__(signame)
        self.signame = signame


class _Signals:
    """SIGTERM and SIGINT end a run at a commit boundary. Inside hold() a signal is only noted (the driver
    finishes the block or commit in hand, then stops); outside (waiting on Ray for the next block) it raises
    _Interrupt at once. Installed only in the main thread; elsewhere signals keep their handlers."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._holding = 0
        self._old: dict = {}

    def install(self) -> None:
        import signal

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                old = signal.signal(sig, self._handle)
                self._old.setdefault(sig, old)

    def uninstall(self) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        import signal

        first = self.received is None
        self.received = self.received or signal.Signals(signum).name
        if self._holding == 0 and first and self._old:
            raise _Interrupt(self.received)

    def hold(self):
        import contextlib

        @contextlib.contextmanager
        def _hold():
            self._holding += 1
            try:
                yield
            finally:
                self._holding -= 1

        return _hold()


def _time_block(timings: dict, block: pa.Table, t0: float) -> tuple[float, int]:
    """Note when an embedded block reached the driver; returns the segment audio (seconds) and the number of
    segment rows it carries."""
    import pyarrow.compute as pc

    now = round(time.time() - t0, 3)
    is_seg = pc.is_null(block.column("record"))
    seg = pc.sum(pc.filter(block.column("duration_s"), is_seg)).as_py() or 0.0
    count = int(pc.sum(pc.cast(is_seg, pa.int64())).as_py() or 0)
    if "first_output_s" not in timings:
        timings["first_output_s"] = now
        timings["steady_audio_s"] = 0.0  # audio delivered after the first block
    else:
        timings["steady_audio_s"] += seg
    timings["last_output_s"] = now
    return seg, count


def _steady(timings: dict) -> dict:
    """timings plus steady_audio_s_per_s: the rate between the first and the last delivered block, i.e. without
    Ray start-up, the actors' model load and the first batch (None with fewer than two blocks)."""
    out = dict(timings)
    span = out.get("last_output_s", 0.0) - out.get("first_output_s", 0.0)
    if "steady_audio_s" in out:
        out["steady_audio_s"] = round(out["steady_audio_s"], 3)
    out["steady_audio_s_per_s"] = round(out["steady_audio_s"] / span, 3) if span > 0 else None
    return out


def _versions() -> dict:
    import pyarrow
    import ray
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ray": ray.__version__,
        "pyarrow": pyarrow.__version__,
    }


def _table_meta(cfg: RunConfig, facts: ModelFacts) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "config_hash": facts.config_hash,
        "config": facts.numbers,
        "dim": facts.spec.dim,
        "provenance": facts.provenance,
        "created_at": _now(),
    }

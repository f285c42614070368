"""The only library module that imports Ray: joining or starting a cluster, placing actors, the flow of work
(decode tasks -> embed actors -> the writers on each node, on Ray core) and the run's Ray metrics."""

from __future__ import annotations

import logging
import math
import os
import platform
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

from pipeline.config import RunConfig
from pipeline.engine.plan import Log, ModelFacts, stderr_log
from pipeline.errors import PipelineError
from pipeline.inputs import InputItem


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


def connect(cfg: RunConfig, log: Log):
    """Join the cluster (cfg.address or RAY_ADDRESS), or start a local Ray: always a new one (address="local").
    Ray's own default joins the last cluster `ray start` left on this machine (/tmp/ray/ray_current_cluster),
    and hangs in its GCS client when that cluster is gone but the file is not (a `ray start --block` ended by
    SIGINT leaves it)."""
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        else:
            ray.init(address="local", logging_level=logging.WARNING, include_dashboard=False)
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


def place(cfg: RunConfig, ray, log: Log = stderr_log) -> Placement:
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


DECODE_TABLE_SEGMENTS = 8  # the fewest segments per table a decode task makes (stages.decode_input)
# An input under which the worker process died this many times becomes an `error` row (worker_crash). A decode
# task is retried that many times for each of its inputs (each may kill it), plus one spare for a node that dies
# under innocent inputs (decode_task_retries).
INPUT_CRASH_LIMIT = 2
# Inputs per decode task, at most: the driver's work is per task (a submit and a get, ~8 ms of its CPU with Ray's
# threads), so a task of 16 three-minute tracks costs it ~0.015 ms per segment. Each slot's first task takes one
# input, so that the first summary comes soon; later ones about half of what is left per slot, so the end of a run
# is not one slow task. A retried task redoes its inputs (the copies are dropped), so this also bounds that.
INPUTS_PER_TASK = 16


def decode_task_retries(inputs: int) -> int:
    """Ray's retry bound for a decode task of `inputs` inputs: each may take INPUT_CRASH_LIMIT deaths before it
    becomes an error row, plus one spare."""
    return INPUT_CRASH_LIMIT * inputs + 1


def chunk_size(started: int, slots: int, left: int) -> int:
    """How many inputs the next decode task takes (see INPUTS_PER_TASK); `started`: tasks started so far."""
    if started < slots:
        return min(1, left)
    return min(left, INPUTS_PER_TASK, max(1, left // (2 * slots)))


class Attempts:
    """begin/end (or skip) of each input's decode, counted on the driver's node (it outlives the workers that die)
    by that node's writer, in a thread of its own (ATTEMPTS_GROUP): a run starts no process for them, and a flush
    never holds a decode task's begin back. Passed to the decode stage, which knows nothing of Ray: see
    stages.decode_input."""

    def __init__(self, handle):
        self.handle = handle

    @classmethod
    def on(cls, ray, pool: WriterPool) -> Attempts:
        """The counts held by the writer on the driver's node."""
        here = ray.get_runtime_context().get_node_id()
        if here not in pool.by_node:
            raise PipelineError(f"no writer on the driver's node {here}: its attempts would not be counted")
        return cls(pool.by_node[here])

    def _ask(self, method: str, key: str) -> Any:
        """`method` of the writer's counts for `key`, waited for (at most 60 s); None if the writer did not answer:
        without the counter, Ray's own retry bound still holds."""
        import ray

        try:
            return ray.get(
                getattr(self.handle, method).options(concurrency_group=ATTEMPTS_GROUP).remote(key), timeout=60
            )
        except Exception:
            return None

    def begin(self, key: str) -> int:
        return int(self._ask("begin_attempt", key) or 0)

    def end(self, key: str) -> None:
        try:
            self.handle.end_attempt.options(concurrency_group=ATTEMPTS_GROUP).remote(key)
        except Exception:
            pass

    def skip(self, key: str) -> None:
        """This try gave up on the input without reading it: it is no death, and the count stays at the deaths
        seen, so that every later try gives the same verdict. Waited for: the worker may die right after, under
        another input of its task."""
        self._ask("skip_attempt", key)


CALLS_AHEAD = 2  # embed calls a decode task keeps queued at its actor: one running, one waiting
CLOSE_WAIT_S = 10.0  # the longest a stopping flow waits for its decode tasks once their actors are gone
WAIT_S = 1.0  # the longest the driver blocks in Ray between events (a signal is handled at the latest then)


def decode_and_embed(items: list[dict], kwargs: dict, actor) -> Any:
    """A decode task: its inputs' decode tables (stages.decode_item), one input after the other, each table sent
    to `actor` as soon as it is made, so that no table passes through the driver or is owned by it. At most
    CALLS_AHEAD calls wait at the actor; then the task blocks on the oldest, and Ray lends its CPU to others while
    it waits (a restarting actor, a task re-run to rebuild what a dead node lost). Each input's record table goes
    in one call with its last segments.

    Returns the inputs' summary (WriterSink.merge): their record rows and one counts row, a few hundred bytes per
    input whatever its length. A retry (the worker died) decodes and sends its inputs again; the writers and the
    assembler drop the copies (FlushWriter.add, engine.assemble)."""
    import ray

    from pipeline.stages import decode_item

    calls: deque = deque()
    outs = []
    for item in items:
        held = None  # the newest segment table, held back so that the record table can go with it
        for table in decode_item(item, kwargs):
            if table.column("record").null_count < table.num_rows:  # the record table, always the last
                calls.append(actor.embed_tables.remote(*([] if held is None else [held]), table))
                held = None
            else:
                if held is not None:
                    calls.append(actor.embed_tables.remote(held))
                held = table
            while len(calls) > CALLS_AHEAD:
                outs.append(ray.get(calls.popleft()))
        if held is not None:
            calls.append(actor.embed_tables.remote(held))
    outs.extend(ray.get(list(calls)))
    return WriterSink.merge(outs)


class Flow:
    """The run's work on Ray core: decode tasks (decode_and_embed, on the CPU), each over a few inputs
    (chunk_size), which send their decode tables to the embed actor they are given (one model replica each), which
    hands the rows to the writer on its node (WriterSink). Iterating yields each task's summary as it ends: its
    inputs' record rows and segment counts, a few hundred bytes per input; and None when WAIT_S passes without
    one, so that the driver can poll the writers, which see the segments land (progress, flushes, commits).

    The driver's work grows with tasks, not segments: it starts a task, assigns it the actor with the fewest
    tasks, and takes its summary; it never owns or sees a decode table. What waits anywhere stays bounded: at most
    `slots` decode tasks run (the CPUs the actors leave free), and each keeps at most CALLS_AHEAD calls queued at
    its actor. The driver blocks in ray.wait between events; it never polls.

    Faults: a decode task whose worker dies is retried (decode_task_retries), and the input it was reading becomes
    an error row after INPUT_CRASH_LIMIT deaths (Attempts). An embed actor that dies is restarted twice, its queued
    calls retried on the new one. An actor lost for good fails its tasks, and the run with them."""

    def __init__(
        self,
        ray,
        cfg: RunConfig,
        facts: ModelFacts,
        todo: list[InputItem],
        placement: Placement,
        attempts: Attempts | None,
        sink: WriterSink,
    ):
        from pipeline.stages import EmbedStage, work_item

        self.ray = ray
        self.todo = deque(work_item(i) for i in todo)
        free = float(ray.cluster_resources().get("CPU", 1)) - placement.actors * placement.cpus_per_actor
        self.slots = placement.decode_workers or max(1, int(free))
        self._decode = ray.remote(num_cpus=1)(decode_and_embed)
        self.started = 0  # decode tasks started
        self._decode_kwargs = ray.put(
            {
                "sample_rate": facts.spec.sample_rate,
                "segments": facts.segments,
                # one model batch per call (at least DECODE_TABLE_SEGMENTS: fewer calls per segment)
                "segments_per_table": max(DECODE_TABLE_SEGMENTS, cfg.batch_size),
                "storage_options": cfg.in_options,
                "time_limit_s": cfg.decode_timeout_s,
                "attempts": attempts,
                "crash_limit": INPUT_CRASH_LIMIT,
            }
        )
        actor = ray.remote(
            num_cpus=placement.cpus_per_actor,
            num_gpus=placement.num_gpus or None,
            max_restarts=2,
            max_task_retries=2,
            max_concurrency=1,
        )(EmbedStage)
        # Created first: each replica loads its model while the first inputs decode.
        self.actors = [
            actor.remote(
                cfg.model,
                storage_options=cfg.in_options,
                cache_dir=cfg.model_cache,
                layers=facts.layers,
                granularity=cfg.granularity,
                device=placement.device,
                compute_dtype=cfg.compute_dtype,
                storage_dtype=cfg.storage_dtype,
                normalize=facts.normalize,
                batch_size=cfg.batch_size,
                threads=placement.threads,
                trust_remote_code=cfg.trust_remote_code,
                expected_code_hash=facts.code_hash,  # each actor checks its staged code against the driver's
                sink=sink,  # the rows go to the node's writer; the task gets records and counts
            )
            for _ in range(placement.actors)
        ]
        self.tasks: dict = {}  # decode task -> its actor's index
        self.load = [0] * len(self.actors)  # decode tasks running per actor

    def __iter__(self):
        ray = self.ray
        try:
            while True:
                while self.todo and len(self.tasks) < self.slots:
                    k = min(range(len(self.actors)), key=self.load.__getitem__)
                    n = chunk_size(self.started, self.slots, len(self.todo))
                    chunk = [self.todo.popleft() for _ in range(n)]
                    task = self._decode.options(max_retries=decode_task_retries(n))
                    ref = task.remote(chunk, self._decode_kwargs, self.actors[k])
                    self.tasks[ref] = k
                    self.load[k] += 1
                    self.started += 1
                if not self.tasks:
                    return
                ready, _ = ray.wait(list(self.tasks), num_returns=1, timeout=WAIT_S)
                if not ready:
                    yield None  # a tick: no task ended for WAIT_S (the driver polls its writers)
                for ref in ready:
                    self.load[self.tasks.pop(ref)] -= 1
                    yield self._result(ref)
        finally:
            self.close()

    def _result(self, ref):
        from ray.exceptions import RayError

        try:
            return self.ray.get(ref)
        except RayError as exc:
            raise PipelineError(f"the embed stage failed: {type(exc).__name__}: {_last_line(exc)}") from None

    def close(self) -> None:
        """End the actors, then let the decode tasks still running end (at most CLOSE_WAIT_S) and take their
        errors (idempotent). A task fails at its next call to its ended actor, so it stops within one decode table;
        the tasks are not cancelled (Ray 2.60's driver aborted in task_manager.cc, "Tried to complete task that was
        not pending", when a cancelled task's reply came). What the cut calls wrote is never committed (the run
        drops uncommitted flushes)."""
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:
                pass
        tasks = list(self.tasks)
        if tasks:
            ready, _ = self.ray.wait(tasks, num_returns=len(tasks), timeout=CLOSE_WAIT_S, fetch_local=False)
            for task in ready:
                try:
                    self.ray.get(task)
                except Exception:  # taken, so that Ray does not report it as an unhandled error
                    pass
        self.tasks, self.actors = {}, []


def _last_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else ""


ATTEMPTS_GROUP = "attempts"  # the writers' concurrency group (one thread) for the attempt counts (Attempts)


class _Writer:
    """A FlushWriter in its own process on one node (see pipeline.table.writer). The one on the driver's node also
    counts decode attempts (Attempts): `begin_attempt` / `end_attempt` run in ATTEMPTS_GROUP's thread, the only
    one that touches the counts; the writing methods run in the default group's, one at a time."""

    def __init__(self, kwargs: dict):
        import socket

        import ray

        from pipeline.table.writer import FlushWriter

        node = ray.get_runtime_context().get_node_id()
        self.w = FlushWriter(**kwargs, node_id=node, host=socket.gethostname())
        self.open: dict[str, int] = {}  # tries of an input that began and never ended

    def begin_attempt(self, key: str) -> int:
        n = self.open.get(key, 0)
        self.open[key] = n + 1
        return n

    def end_attempt(self, key: str) -> None:
        self.open.pop(key, None)

    def skip_attempt(self, key: str) -> None:
        if self.open.get(key, 0) > 0:
            self.open[key] -= 1

    def add(self, block) -> None:
        self.w.add(block)

    def take(self, force: bool = False) -> dict:
        """Flushes finished since the last call, and the running count of what this writer received."""
        if force:
            self.w.flush()
        return {"flushes": self.w.take(), "embedded": dict(self.w.embedded)}

    def finish(self) -> dict:
        return {"flushes": self.w.finish(), "embedded": dict(self.w.embedded)}

    def stats(self) -> dict:
        return self.w.stats()


class WriterPool:
    """One writer per alive node, pinned there; the embed actors hand rows to their own node's writer (at
    recording granularity, each recording's rows to one writer chosen by its id)."""

    def __init__(self, ray, writer_kwargs: dict):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.ray = ray
        self.by_node: dict[str, Any] = {}
        self.lost: list[str] = []  # node ids whose writer died
        self.names: dict[str, str] = {}  # node id -> its writer's actor name (see WriterSink)
        # node id -> what its writer has received so far (segments, audio_s): a run's progress, as it lands
        self.embedded: dict[str, dict] = {}
        cls = ray.remote(
            num_cpus=0, max_restarts=0, max_concurrency=1, concurrency_groups={ATTEMPTS_GROUP: 1}
        )(_Writer)
        token = uuid.uuid4().hex[:12]
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            nid = node["NodeID"]
            self.names[nid] = f"mert-writer-{token}-{nid[:16]}"
            self.by_node[nid] = cls.options(
                name=self.names[nid],
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=nid, soft=False),
            ).remote(writer_kwargs)
        if not self.by_node:
            raise PipelineError("no alive Ray node to write the feature files on")

    def handles(self) -> list:
        return list(self.by_node.values())

    def _call(self, method: str, *args) -> list[tuple[str, Any]]:
        """(node id, answer) of `method` on every writer; a writer whose node died is dropped (and noted in
        `lost`)."""
        from ray.exceptions import RayActorError

        refs = {nid: getattr(h, method).remote(*args) for nid, h in self.by_node.items()}
        out = []
        for nid, ref in refs.items():
            try:
                out.append((nid, self.ray.get(ref)))
            except RayActorError:
                self.lost.append(nid)
                self.by_node.pop(nid, None)
                self.names.pop(nid, None)
        if not self.by_node:
            raise PipelineError(
                "every writer was lost with its node: no node is left to write the features on"
            )
        return out

    def take(self, force: bool = False) -> list[dict]:
        """Flushes finished since the last call; `force`: every writer flushes its buffer first."""
        return self._flushes(self._call("take", force))

    def finish(self) -> list[dict]:
        return self._flushes(self._call("finish"))

    def _flushes(self, answers: list[tuple[str, dict]]) -> list[dict]:
        for nid, a in answers:
            self.embedded[nid] = a["embedded"]
        return [m for _, a in answers for m in a["flushes"]]

    def embedded_total(self) -> tuple[int, float]:
        """Segments and their audio seconds the writers received so far (a writer lost with its node included)."""
        return (
            sum(e["segments"] for e in self.embedded.values()),
            sum(e["audio_s"] for e in self.embedded.values()),
        )

    def stats(self) -> list[dict]:
        return [s for _, s in self._call("stats")]

    def close(self) -> None:
        for h in self.handles():
            try:
                self.ray.kill(h)
            except Exception:
                pass


class WriterSink:
    """What the embed stage calls with its output (stages know nothing of Ray): the rows go to a writer,
    the driver gets back only the record rows and one summary row per block (segments, their audio seconds).

    Segment and frame rows go to the writer on the actor's own node; at recording granularity each recording's
    rows go to one writer chosen by its id (its mean needs all of them). A writer whose node died is dropped
    and its share goes to the others; what it had buffered is lost, and the driver embeds those recordings
    again.

    It holds the writers' actor names, not their handles, and looks them up in the actor that calls it: an actor
    constructor argument that holds a handle lives in the object store, and Ray warns on every restartable
    actor that has one (ray-project/ray#53727)."""

    def __init__(self, names: dict[str, str], by_recording: bool):
        self.names, self.by_recording = dict(names), by_recording
        self._by_node: dict[str, Any] | None = None

    @property
    def by_node(self) -> dict[str, Any]:
        if self._by_node is None:
            import ray
            from ray.exceptions import RayError

            self._by_node = {}
            for nid, name in self.names.items():
                try:
                    self._by_node[nid] = ray.get_actor(name)
                except (ValueError, RayError):  # that writer is gone with its node
                    pass
        return self._by_node

    def __getstate__(self) -> dict:
        return {"names": self.names, "by_recording": self.by_recording, "_by_node": None}

    def _route(self, out, here: str) -> list[tuple[str, Any, Any]]:
        import zlib

        import pyarrow as pa

        alive = list(self.by_node.items())
        if not alive:
            raise RuntimeError("no writer is left alive to take the embedded rows")
        if not self.by_recording:
            mine = [(nid, h) for nid, h in alive if nid == here]
            nid, h = mine[0] if mine else alive[zlib.crc32(here.encode()) % len(alive)]
            return [(nid, h, out)]
        picks: dict[int, list[int]] = {}
        for i, rid in enumerate(out.column("recording_id").to_pylist()):
            picks.setdefault(zlib.crc32(rid.encode()) % len(alive), []).append(i)
        return [(alive[k][0], alive[k][1], out.take(pa.array(idx))) for k, idx in picks.items()]

    def __call__(self, out):
        import pyarrow as pa
        import pyarrow.compute as pc
        import ray
        from ray.exceptions import RayActorError

        here = ray.get_runtime_context().get_node_id()
        pending = out
        while pending is not None and pending.num_rows:
            parts = self._route(pending, here)
            refs = [(nid, h.add.remote(rows), rows) for nid, h, rows in parts]
            failed = []
            for nid, ref, rows in refs:
                try:
                    ray.get(ref)
                except RayActorError:
                    self.by_node.pop(nid, None)
                    failed.append(rows)
            pending = pa.concat_tables(failed) if failed else None
        is_seg = pc.is_null(out.column("record"))
        n = int(pc.sum(pc.cast(is_seg, pa.int64())).as_py() or 0)
        audio = float(pc.sum(pc.filter(out.column("duration_s"), is_seg)).as_py() or 0.0)
        return _summary(out.filter(pc.invert(is_seg)), n, audio)

    @staticmethod
    def merge(summaries: list) -> Any:
        """Several calls' summaries -> one: their record rows and one counts row."""
        import pyarrow as pa
        import pyarrow.compute as pc

        t = pa.concat_tables(summaries)
        n = int(pc.sum(t.column("segments")).as_py() or 0)
        audio = float(pc.sum(t.column("audio_s")).as_py() or 0.0)
        return _summary(t.filter(pc.is_valid(t.column("record"))), n, audio)


def _summary(recs, segments: int, audio_s: float) -> Any:
    """What the driver gets: record rows (recording_id, record) and one counts row (recording_id "", no record,
    the segments embedded and their audio seconds)."""
    import pyarrow as pa

    return pa.table(
        {
            "recording_id": pa.concat_arrays(
                [recs.column("recording_id").combine_chunks().cast(pa.string()), pa.array([""])]
            ),
            "record": pa.concat_arrays(
                [recs.column("record").combine_chunks().cast(pa.string()), pa.nulls(1, pa.string())]
            ),
            "segments": pa.array([0] * recs.num_rows + [segments], pa.int64()),
            "audio_s": pa.array([0.0] * recs.num_rows + [audio_s], pa.float64()),
        }
    )

"""One run, orchestrated on the driver: plan, take the table, stream the dataset, commit metadata, summarize.

list inputs -> minus the ledger -> on Ray: decode tasks (CPU) -> embed actors (one replica per GPU, or CPU
actors) -> a writer on each node that flushes the feature files. The driver receives record rows and flush
descriptions only, and commits each recording once all its segments are durable (see assemble.py).
"""

from __future__ import annotations

import platform
import time
from typing import Any

import pyarrow as pa

from pipeline import __version__
from pipeline.config import RunConfig
from pipeline.engine.assemble import Assembler, Batch
from pipeline.engine.control import Interrupt, Signals, steady
from pipeline.engine.plan import (
    SYSTEMIC_FIRST,
    Log,
    estimate,
    list_work,
    model_facts,
    new_run_id,
    select_work,
    stderr_log,
    systemic_failure,
    table_meta,
    utc_now,
)
from pipeline.errors import PipelineError, RunIdTaken, RunInterrupted, RunStopped
from pipeline.inputs import InputItem
from pipeline.progress import Progress
from pipeline.table import LEDGER_SCHEMA, FeatureTable
from pipeline.table.maintenance import DEFAULT_RETENTION_S, delete_removed

POLL_S = 2.0  # how often the driver asks the writers for finished flushes while blocks arrive


def run(cfg: RunConfig, log: Log = stderr_log) -> dict:
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
            check_only=not cfg.dry_run,  # a dry run's estimate embeds; a run's actors load it strictly
        )
    except PipelineError:
        raise
    except Exception as exc:
        raise PipelineError(f"cannot load model {cfg.model}: {type(exc).__name__}: {exc}") from None
    facts = model_facts(cfg, loaded)
    table = FeatureTable(cfg.output, cfg.out_options)
    meta = table.read_meta()
    if meta is not None and meta.get("config_hash") != facts.config_hash:
        table.create_or_check(table_meta(cfg, facts))  # raises with the differences
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
    if table.run_used(run_id):  # a run never reuses another run's id (its summary, its files' names)
        raise RunIdTaken(
            f"run id {run_id!r} is already used in {cfg.output}: give a new --run-id, or none for a fresh one"
        )
    table.create_or_check(table_meta(cfg, facts))
    # The lease first, then the ledger: a run that waited for another one's lease sees what that run committed.
    lease = table.acquire_lease(run_id, cfg.lease_ttl_s, cfg.lease_wait_s)
    if cfg.tick and cfg.tick in table.snapshot().ticks:
        done_by = table.snapshot().ticks[cfg.tick]
        table.release_lease()
        log(f"[mert] tick {cfg.tick} is already complete in {cfg.output} (run {done_by}): nothing to do")
        return {
            "run_id": None,
            "status": "noop",
            "tick": cfg.tick,
            "done_by": done_by,
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
        "started_at": utc_now(),
        "tick": cfg.tick,
        "config": cfg.public_dict(),
        "config_hash": facts.config_hash,
        "provenance": facts.provenance,
        "counts": counts,
        "epoch": lease.epoch,
    }
    audio_s = 0.0
    received = {"blocks_bytes": 0, "flush_descriptions_bytes": 0, "segments": 0}  # what reached the driver
    beat = attempts = pool = flow = None
    commits: list[int] = []
    batch = Batch(cfg.shard_max_recordings, cfg.commit_interval_s)
    assembler = Assembler()
    signals = Signals()
    # when the stages started to deliver, so that a summary separates start-up (Ray, actor model load, the first
    # batch) from the steady rate: seconds since t0, and segment audio seconds delivered after the first block
    timings: dict = {}

    def commit() -> None:
        rows, adds = batch.take()
        if rows:
            commits.append(table.commit(rows, adds))

    signals.install()
    try:
        latest = table.ledger(latest=True)
        todo, counts["skipped"] = select_work(items, latest, cfg.retry_errors)
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
                    batch.add(
                        _tombstone(row, f"{row['uri']}: no longer listed in {cfg.input} (run {run_id})"),
                        [],
                        {},
                    )
                counts["deleted"] = len(gone)
                commit()
            if gone:
                log(f"[mert] tombstoned {len(gone)} recording(s) whose input is gone")
        log(
            f"[mert] run {run_id}: {len(todo)} to process, {counts['skipped']} skipped (already in the "
            f"table), model {facts.spec.name}, layers {list(facts.layers)}"
        )
        if todo:
            from pipeline.engine import ray_wiring as rd

            ray = rd.connect(cfg, log)
            signals.install()  # again: starting Ray's core worker puts its own (aborting) SIGTERM handler in place
            placement = rd.place(cfg, ray, log)
            timings["ray_ready_s"] = round(time.time() - t0, 3)
            facts.provenance["device"] = rd.device_name(ray, placement)
            pool = rd.WriterPool(ray, _writer_kwargs(cfg, facts, run_id))
            attempts = rd.Attempts.on(ray, pool)
            sink = rd.WriterSink(pool.names, by_recording=cfg.granularity == "recording")
            flow = rd.Flow(ray, cfg, facts, todo, placement, attempts, sink)
            first: list[dict] = []
            sizes = {i.recording_id: i.size for i in todo}
            beat = Progress(
                counts,
                len(todo),
                sum(sizes.values()),
                log,
                every_s=10.0 if cfg.progress else 0,
                metrics=rd.RayMetrics(facts.spec.name),
            )

            def settle(ready) -> str | None:
                """Count and batch ready recordings; commit when due. Returns a stop reason, if any."""
                nonlocal audio_s
                reason = None
                for record, parts in ready:
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
                    batch.add(record, parts, assembler.flushes)
                    if counts["processed"] <= SYSTEMIC_FIRST:
                        first.append(record)
                        reason = reason or systemic_failure(first, len(todo))
                    if (
                        not reason
                        and counts["processed"] >= cfg.error_rate_min_inputs
                        and counts["error"] / counts["processed"] > cfg.max_error_rate
                    ):
                        reason = (
                            f"error rate {counts['error']}/{counts['processed']} passed the limit "
                            f"{cfg.max_error_rate:.0%} (errors by kind: {counts['errors_by_kind']}); "
                            "the finished work is committed. Check the inputs, or raise --max-error-rate"
                        )
                    if reason:  # the rest of what is ready is not committed: a rerun does it
                        break
                if batch.due():
                    commit()
                return reason

            # what the progress shows so far: the writers' counts of the segments they received
            shown: dict[str, Any] = {"segments": 0, "audio_s": 0.0}

            def collect(metas: list[dict]) -> None:
                for meta_ in metas:
                    received["flush_descriptions_bytes"] += len(_dumps(meta_))
                    assembler.add_flush(meta_)
                # progress as the segments land, not as the decode tasks (up to 16 inputs each) end
                segs, audio = pool.embedded_total()
                if segs > shown["segments"]:
                    beat.segments(audio - shown["audio_s"], segs - shown["segments"])
                    shown.update(segments=segs, audio_s=audio)

            def stream(flow) -> str | None:
                """Iterate one flow to its end (or a stop); returns a stop reason, if any."""
                polled = time.monotonic()
                for block in flow:
                    with signals.hold():  # a signal here waits for the block's commit, then ends the loop
                        if block is not None:  # None: a tick, with no decode task ended
                            received["blocks_bytes"] += block.nbytes
                            received["segments"] += _block_counts(timings, block, t0)
                            for rec in block.column("record").to_pylist():
                                if rec is not None:
                                    assembler.add_record(_json(rec))
                        # Records waiting for their segments to be flushed: at --shard-max-recordings of them,
                        # or --commit-interval after the last commit, every writer flushes now.
                        force = assembler.waiting_records() >= cfg.shard_max_recordings or (
                            assembler.waiting_records() and batch.age() >= cfg.commit_interval_s
                        )
                        if force or time.monotonic() - polled >= POLL_S or batch.due():
                            collect(pool.take(force=bool(force)))
                            polled = time.monotonic()
                        reason = settle(assembler.ready())
                    if reason or signals.received:
                        return reason
                return None

            stop_reason = stream(flow)
            with signals.hold():
                collect(pool.finish())
                stop_reason = stop_reason or settle(assembler.ready())
            # A node that died took its writer's buffered rows with it: its recordings' records arrived, not
            # all their segments. Embed those recordings again, once, on the writers that are left.
            lost = assembler.uncovered() if pool.lost and not (stop_reason or signals.received) else []
            if lost:
                log(
                    f"[mert] {len(pool.lost)} writer(s) lost with their node: embedding {len(lost)} recording(s) again"
                )
                summary["re_embedded_after_writer_loss"] = len(lost)
                assembler.forget(lost)
                again = [i for i in todo if i.recording_id in set(lost)]
                sink = rd.WriterSink(pool.names, by_recording=cfg.granularity == "recording")
                flow = rd.Flow(ray, cfg, facts, again, placement, attempts, sink)
                stop_reason = stream(flow)
                with signals.hold():
                    collect(pool.finish())
            beat.close()
            with signals.hold():
                reason = settle(
                    assembler.finish() if not (stop_reason or signals.received) else assembler.ready()
                )
                stop_reason = stop_reason or reason
                commit()
            if signals.received:
                raise Interrupt(signals.received)
            if stop_reason:
                summary["status"] = "stopped"
                summary["stop_reason"] = stop_reason
            elif assembler.incomplete():
                raise PipelineError(f"{assembler.incomplete()} recording(s) never completed in the dataset")
        if summary["status"] == "running":
            summary["status"] = "complete"
    except Interrupt as exc:
        # Between blocks or while waiting for one: commit the recordings already complete, then stop. Nothing
        # is half-written: a commit is never cut by the signal, and a recording counts once its entry exists.
        with signals.hold():
            if pool is not None:
                try:
                    for meta_ in pool.finish():
                        assembler.add_flush(meta_)
                    for record, parts in assembler.ready():
                        batch.add(record, parts, assembler.flushes)
                        counts["processed"] += 1
                        counts[record["status"]] += 1
                except Exception:  # the writers may be gone with Ray: what is committed stays committed
                    pass
            commit()
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
            if pool is not None:
                summary["writers"] = _writer_stats(pool)
                total = received["blocks_bytes"] + received["flush_descriptions_bytes"]
                summary["driver_received"] = {
                    **received,
                    "bytes_per_segment": round(total / received["segments"], 1)
                    if received["segments"]
                    else None,
                }
                if flow is not None:
                    flow.close()
                pool.close()
                _drop_uncommitted(table, assembler, batch)
            if commits and summary["status"] != "failed":
                summary["maintenance"] = _maintain(table, log)
            wall = time.time() - t0
            summary.update(
                finished_at=utc_now(),
                wall_s=round(wall, 3),
                audio_hours=round(audio_s / 3600, 6),
                audio_s_per_s=round(audio_s / wall, 3) if wall > 0 else None,
                commits=len(commits),
                versions_committed=[commits[0], commits[-1]] if commits else None,
                timings=steady(timings),
                versions={"pipeline": __version__, "python": platform.python_version(), **_versions()},
            )
            try:
                table.write_run(run_id, summary)  # written last
            finally:
                # the release entry records a completed tick, so a rerun of the tick finds it in the log
                table.release_lease(tick=cfg.tick, run_status=summary["status"])
                signals.uninstall()
    if summary["status"] == "stopped":
        raise RunStopped(f"run {run_id} stopped: {summary['stop_reason']}", summary)
    if summary["status"] == "interrupted":
        raise RunInterrupted(f"run {run_id} interrupted: {summary['stop_reason']}", summary)
    return summary


def _writer_kwargs(cfg: RunConfig, facts, run_id: str) -> dict:
    import json

    return {
        "root": cfg.output,
        "storage_options": cfg.out_options,
        "run_id": run_id,
        "layers": facts.layers,
        "dim": facts.spec.dim,
        "storage_dtype": cfg.storage_dtype,
        "granularity": cfg.granularity,
        "frame_rate": facts.spec.frame_rate,
        "metadata": {
            f"mert.{k}": json.dumps(v) if not isinstance(v, str) else v for k, v in facts.provenance.items()
        },
        "target_bytes": int(cfg.shard_max_mb * (1 << 20)),
        "max_age_s": cfg.commit_interval_s,
    }


def _writer_stats(pool) -> list[dict] | None:
    try:
        return pool.stats()
    except Exception:
        return None


def _drop_uncommitted(table: FeatureTable, assembler: Assembler, batch: Batch) -> None:
    """Delete this run's flushes that no commit names (rows of failed recordings, a stop midway): they were
    never visible, and nothing can commit them after this run."""
    for fid, meta in assembler.flushes.items():
        if fid in batch.added:
            continue
        for f in meta["files"]:
            try:
                table.fs.rm(f"{table.path}/{f['path']}")
            except Exception:  # vacuum's sweep deletes what is left
                pass


def _maintain(table: FeatureTable, log: Log) -> dict:
    """After a run that committed: delete the files of flushes that compaction or vacuum removed longer than the
    retention ago (from the log, reading no feature file). Rewriting files that hold dead rows is vacuum's and
    compact's (rewritten now, both copies would stay visible to plain readers for the retention period).
    A failure here is reported, never the run's failure."""
    try:
        return delete_removed(table, DEFAULT_RETENTION_S)
    except Exception as exc:
        log(f"[mert] maintenance after the run failed ({type(exc).__name__}: {exc}); `vacuum` will redo it")
        return {"error": f"{type(exc).__name__}"}


def _json(text: str) -> dict:
    import json

    return json.loads(text)


def _dumps(obj: dict) -> str:
    import json

    return json.dumps(obj)


def _tombstone(previous: dict, reason: str) -> dict:
    """A ledger row that hides a recording whose input is gone (its newest row was `previous`)."""
    return {
        "recording_id": previous["recording_id"],
        "uri": previous["uri"],
        "fingerprint": previous["fingerprint"],
        "status": "deleted",
        "error_kind": None,
        "retryable": False,
        "error_message": reason,
        "segments": 0,
    }


def _gone(items: list[InputItem], latest: pa.Table) -> list[dict]:
    """Newest ledger rows of recordings that are no longer listed (and not already tombstoned)."""
    listed = {i.recording_id for i in items}
    rows = latest.select(["recording_id", "uri", "fingerprint", "status"]).to_pylist()
    return [r for r in rows if r["recording_id"] not in listed and r["status"] != "deleted"]


def _block_counts(timings: dict, block: pa.Table, t0: float) -> int:
    """Note when a block reached the driver, and the segment audio it reports; returns its segment count."""
    import pyarrow.compute as pc

    now = round(time.time() - t0, 3)
    seg = float(pc.sum(block.column("audio_s")).as_py() or 0.0)
    count = int(pc.sum(block.column("segments")).as_py() or 0)
    if "first_output_s" not in timings:
        timings["first_output_s"] = now
        timings["steady_audio_s"] = 0.0  # audio delivered after the first block
    else:
        timings["steady_audio_s"] += seg
    timings["last_output_s"] = now
    return count


def _versions() -> dict:
    """The installed versions, from the packages' metadata: importing transformers only for its version failed in
    a Ray job's driver whose working directory Ray had replaced (see models.ensure_cwd), after the run's work."""
    from importlib.metadata import version

    from pipeline.models import torch_build  # torch's own version string: it carries the build (2.11.0+cu130)

    return {
        "torch": torch_build()["torch"],
        **{name: version(name) for name in ("transformers", "ray", "pyarrow")},
    }

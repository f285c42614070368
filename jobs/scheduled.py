"""Scheduled, incremental and reprocessing runs; table maintenance.

    python -m jobs.scheduled tick --config run.yaml --tick 2026-11-25T06:00:00Z --period 1h [--mirror-deletions]
    python -m jobs.scheduled reprocess --config run.yaml --model m-a-p/MERT-v1-330M@REV --tables-root s3://lake/mert/
    python -m jobs.scheduled promote s3://lake/mert/ s3://lake/mert/MERT-v1-330M@REV-1a2b3c4d5e6f7a8b
    python -m jobs.scheduled compact s3://lake/mert/MERT-v1-95M@REV-...

tick       One incremental run per schedule tick. The prefix is listed and diffed against the table's ledger: new
           inputs and inputs whose fingerprint changed are processed, the rest are not touched. The tick is an
           explicit argument (a Kubernetes CronJob does not hand its scheduled time to the pod), floored to the
           period, so that a retried pod or a duplicated tick names the same tick: a tick already complete on the
           table does nothing. Ticks that overlap in time are kept apart by the table's lease, and a run that waited
           for the lease reads the ledger only once it holds it, so no input is processed twice.
           --mirror-deletions tombstones recordings whose input is gone; --compact rewrites the files afterwards.
           OUTPUT may be a root of tables with a _current.json (see promote): the tick writes the current table.
reprocess  The whole catalog into a new table for this model, revision and configuration, beside the old one:
           ROOT/<model>@<revision or content hash>-<configuration hash>. Resumable like any run (rerun it).
promote    Point ROOT/_current.json at a table whose newest run is complete: consumers that read ROOT through
           pipeline.read_features(ROOT, layer), or that read _current.json themselves, switch at once.
compact    Under the table's lease, rewrite the files holding rows that readers already hide (superseded by a
           changed input, tombstoned, of failed recordings), merge small files (frequent small ticks write one small
           file per layer each) into files of ~64 MB, as one commit, and delete files past the retention (one day),
           so that plain Parquet readers then see only the snapshot's rows too.

Exit codes are those of jobs.extract and `mert-pipeline run` (pipeline.errors.ExitCode): 0 complete (or a tick
already complete), 1 could not commit, 2 usage, 3 stopped by the error-rate limit (finished work committed), 75
lease held, 143 SIGTERM.

Run ids: a `run_id` in the YAML (or --run-id) is a prefix. A tick runs as `<run_id or "tick">-<tick>-<UTC
time>-<random>` and a reprocess as `<run_id or "run">-<UTC time>-<random>`, so ticks, retried pods and retried
RayJobs never reuse an id (a used id is refused: it would overwrite its summary). A retry with the same
arguments resumes: a tick already complete does nothing; otherwise only inputs without a committed `ok` row are
processed, under the new id.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from datetime import datetime, timezone

from jobs.extract import execute, log_to_stderr
from pipeline.cli import add_run_arguments, config_from_args, storage_options_arg
from pipeline.config import job_run_id
from pipeline.errors import ExitCode, PipelineError, exit_code
from pipeline.table import resolve_table

_PERIOD = re.compile(r"^(\d+)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_period(text: str) -> int:
    """'15m', '1h', '1d', '1w' -> seconds."""
    m = _PERIOD.match(text.strip())
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"--period {text!r}: give a positive count and a unit, e.g. 15m, 1h, 6h, 1d, 1w")
    return int(m.group(1)) * _UNIT_S[m.group(2)]


def parse_tick(text: str) -> datetime:
    """An ISO 8601 time (UTC unless it names its offset: 2026-11-25T06:00:00Z) or Unix seconds."""
    t = text.strip()
    try:
        if re.fullmatch(r"\d+(\.\d+)?", t):
            return datetime.fromtimestamp(float(t), tz=timezone.utc)
        dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except (ValueError, OverflowError):
        raise ValueError(
            f"--tick {text!r}: give an ISO 8601 time like 2026-11-25T06:00:00Z, or Unix seconds"
        ) from None
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def floor_tick(tick: datetime, period_s: int) -> datetime:
    """The start of the schedule period that holds `tick` (periods are aligned to the Unix epoch, in UTC)."""
    ts = int(tick.timestamp())
    return datetime.fromtimestamp(ts - ts % period_s, tz=timezone.utc)


def tick_label(tick: datetime, period: str) -> str:
    return f"{tick.strftime('%Y-%m-%dT%H:%M:%SZ')}/{period}"


def table_name(cfg) -> str:
    """<model>@<revision or sha256 prefix of the checkpoint>-<configuration hash>: one table per model, revision
    and configuration (a table never mixes configurations)."""
    from pipeline.engine import model_facts
    from pipeline.models import load_model

    loaded = load_model(
        cfg.model,
        storage_options=cfg.in_options,
        cache_dir=cfg.model_cache,
        trust_remote_code=cfg.trust_remote_code,
    )
    facts = model_facts(cfg, loaded)
    rev = (loaded.revision or "")[:12] or "sha256-" + loaded.content_hash[:12]
    name = facts.spec.name.rstrip("/").rsplit("/", 1)[
        -1
    ]  # a registry name, or a folder's or prefix's last part
    return re.sub(r"[^A-Za-z0-9._@-]+", "-", f"{name}@{rev}") + f"-{facts.config_hash}"


def cmd_tick(args: argparse.Namespace) -> int:
    def go() -> dict:
        from pipeline.engine import run

        period_s = parse_period(args.period)
        start = floor_tick(parse_tick(args.tick), period_s)
        cfg = config_from_args(args)
        cfg = dataclasses.replace(
            cfg,
            output=resolve_table(cfg.output, cfg.out_options),  # a root of tables: its current table
            tick=tick_label(start, args.period),
            run_id=job_run_id(cfg.run_id or "tick", start.strftime("%Y%m%dT%H%M%SZ")),
        )
        summary = run(cfg, log=log_to_stderr(not cfg.progress))
        if args.compact and summary.get("status") == "complete":
            _compact(cfg.output, cfg.out_options, cfg.lease_ttl_s, cfg.lease_wait_s, args.retention)
        return summary

    return execute(go, as_json=args.json)


def cmd_reprocess(args: argparse.Namespace) -> int:
    if getattr(args, "output", None):
        print(
            "error: reprocess writes to --tables-root/<model>@<revision>-<config>; do not give OUTPUT",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    root = args.tables_root.rstrip("/")

    def go() -> dict:
        from pipeline.engine import run

        args.output = root  # replaced by the table for this model, revision and configuration
        cfg = config_from_args(args)
        cfg = dataclasses.replace(cfg, output=f"{root}/{table_name(cfg)}", run_id=job_run_id(cfg.run_id))
        print(f"reprocessing into {cfg.output}", file=sys.stderr, flush=True)
        summary = run(cfg, log=log_to_stderr(not cfg.progress))
        if args.promote and summary.get("status") == "complete":
            from pipeline.table import promote

            p = promote(root, cfg.output, cfg.out_options)
            print(f"promoted: {root}/_current.json -> {p['table']} (was {p['previous']})", file=sys.stderr)
        return summary

    return execute(go, as_json=args.json)


def cmd_promote(args: argparse.Namespace) -> int:
    from pipeline.table import promote

    try:
        p = promote(args.root, args.table, _options(args), force=args.force)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_code(exc)
    print(f"{args.root.rstrip('/')}/_current.json -> {p['table']} (was {p['previous']})")
    return ExitCode.OK


def _compact(table: str, options: dict | None, ttl_s: float, wait_s: float, retention_s: float) -> dict:
    from pipeline.table import FeatureTable
    from pipeline.table.maintenance import vacuum

    t0 = time.time()
    out = vacuum(FeatureTable(table, options), retention_s, merge=True, ttl_s=ttl_s, wait_s=wait_s)
    print(
        f"compact {table}: version {out['version']}, rewrote {out['rewritten']} file group(s) holding dead rows "
        f"({out['rows_dropped']} row(s)), merged {out.get('merged_flushes', 0)} small group(s) into "
        f"{out.get('new_flushes', 0)}, deleted {out['deleted_files']} removed and {out['orphans_deleted']} "
        f"orphan file(s) past the retention in {time.time() - t0:.1f} s",
        file=sys.stderr,
    )
    return out


RETENTION = (
    ("--retention",),
    {
        "type": float,
        "default": 24 * 3600.0,
        "metavar": "SECONDS",
        "help": "compact keeps replaced files this long for readers of older versions (default one day; 0: "
        "plain Parquet readers agree with the reader at once)",
    },
)


def cmd_compact(args: argparse.Namespace) -> int:
    def go() -> dict:
        _compact(args.table, _options(args), args.lease_ttl, args.lease_wait, args.retention)
        return {}

    return execute(go)


def _options(args: argparse.Namespace) -> dict | None:
    return args.storage_options  # parsed (and checked, never echoed) by storage_options_arg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.scheduled",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tick", help="one incremental run for a schedule tick")
    add_run_arguments(t)
    t.add_argument(
        "--tick",
        required=True,
        help="the tick's time: ISO 8601 (UTC unless an offset is given) or Unix seconds; floored to --period",
    )
    t.add_argument("--period", default="1h", help="the schedule period: 15m, 1h, 1d, 1w ... (default 1h)")
    t.add_argument("--compact", action="store_true", help="compact the table after a complete tick")
    t.add_argument(*RETENTION[0], **RETENTION[1])
    t.set_defaults(fn=cmd_tick)
    r = sub.add_parser("reprocess", help="the whole catalog into a new table for this model and revision")
    add_run_arguments(r)
    r.add_argument("--tables-root", required=True, help="where tables live: the new one is a folder below it")
    r.add_argument("--promote", action="store_true", help="point ROOT/_current.json at it once complete")
    r.set_defaults(fn=cmd_reprocess)
    pr = sub.add_parser("promote", help="point ROOT/_current.json at a complete table")
    pr.add_argument("root")
    pr.add_argument("table")
    pr.add_argument("--force", action="store_true", help="even when its newest run is not complete")
    pr.add_argument("--storage-options", type=storage_options_arg, help="fsspec options as JSON")
    pr.set_defaults(fn=cmd_promote)
    c = sub.add_parser("compact", help="drop hidden rows from the files (under the table's lease)")
    c.add_argument("table")
    c.add_argument("--storage-options", type=storage_options_arg, help="fsspec options as JSON")
    c.add_argument("--lease-wait", type=float, default=0.0, help="wait this long for a running run's lease")
    c.add_argument("--lease-ttl", type=float, default=120.0)
    c.add_argument(*RETENTION[0], **RETENTION[1])
    c.set_defaults(fn=cmd_compact)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

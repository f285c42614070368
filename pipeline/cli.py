"""`mert-pipeline`: run, dry-run, read, inspect, vacuum, compact, probe, neighbors, models, demo. A thin layer
over the library.

Exit codes are pipeline.errors.ExitCode, shared with jobs.extract and jobs.scheduled: 0 complete, 1 could not
commit, 2 usage (an invalid option, YAML or run id), 3 stopped by the error-rate limit (finished work committed),
75 another run holds the table's lease, 143 SIGTERM/SIGINT at a commit boundary, 130 KeyboardInterrupt.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig, load_yaml, make_config, parse_storage_options
from pipeline.errors import ExitCode, PipelineError, exit_code


def storage_options_arg(text: str) -> dict:
    """argparse type of the --storage-options flags: a JSON object. A malformed value is never echoed (argparse
    would print "invalid loads value: '<the whole text>'", keys included): the message gives only the position."""
    try:
        return parse_storage_options(text, None)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# (flag, RunConfig field, type, help). The run options are stated once: `mert-pipeline run` and jobs/extract.py
# both build their parser from this table.
RUN_OPTIONS: list[tuple[str, str, Callable[[str], Any], str]] = [
    (
        "--model",
        "model",
        str,
        "registry name (see `models`), hub id[@revision], local folder or s3://... prefix",
    ),
    ("--glob", "glob", str, "pattern below the input prefix, e.g. '**/*.flac'"),
    (
        "--extensions",
        "extensions",
        str,
        "comma-separated suffixes to keep when listing (default: common audio)",
    ),
    ("--layers", "layers", str, "hidden states to keep, e.g. 6,7,12 or 0-4 (default: all)"),
    ("--window", "window_s", float, "segment window in seconds (default: the model's, 5.0 for v0/v1)"),
    ("--hop", "hop_s", float, "hop between segment starts in seconds (default: = window)"),
    ("--min-segment", "min_segment_s", float, "shortest segment kept, seconds (default 1.0)"),
    ("--granularity", "granularity", str, "segment | recording | frame (default segment)"),
    ("--compute-dtype", "compute_dtype", str, "float32 | bfloat16 | float16 (half types need a GPU)"),
    ("--storage-dtype", "storage_dtype", str, "float32 | float16 (default float32)"),
    ("--batch-size", "batch_size", int, "segments per model call (default 8)"),
    ("--num-gpus", "num_gpus", int, "GPUs to use, one actor each (default: all; 0 = CPU actors)"),
    ("--gpu-wait", "gpu_wait_s", float, "wait this long for --num-gpus GPUs to join the cluster (default 0)"),
    ("--num-actors", "num_actors", int, "CPU embed actors when there is no GPU (default 1)"),
    ("--cpus-per-actor", "cpus_per_actor", float, "cores per CPU actor (default: all but one)"),
    ("--decode-workers", "decode_workers", int, "concurrent decode tasks (default: as the cluster allows)"),
    ("--storage-options", "storage_options", storage_options_arg, "fsspec options for the input, as JSON"),
    (
        "--output-storage-options",
        "output_storage_options",
        storage_options_arg,
        "fsspec options for the output (JSON)",
    ),
    ("--model-cache", "model_cache", str, "where remote checkpoints are staged on each node"),
    ("--address", "address", str, "Ray cluster address (default: RAY_ADDRESS, else a local Ray)"),
    ("--max-error-rate", "max_error_rate", float, "stop when this fraction of inputs fail (default 0.5)"),
    (
        "--error-rate-min-inputs",
        "error_rate_min_inputs",
        int,
        "... once this many were processed (default 20)",
    ),
    ("--decode-timeout", "decode_timeout_s", float, "one input's decode time limit, seconds (default 600)"),
    (
        "--commit-interval",
        "commit_interval_s",
        float,
        "each writer flushes its files and the driver commits at least this often, seconds (default 60)",
    ),
    (
        "--shard-max-recordings",
        "shard_max_recordings",
        int,
        "commit once this many recordings are ready (default 2000)",
    ),
    (
        "--shard-max-mb",
        "shard_max_mb",
        float,
        "a writer flushes at this much buffered embedding data, MB (default 512)",
    ),
    (
        "--lease-ttl",
        "lease_ttl_s",
        float,
        "another run may take the table this long after the last heartbeat (120)",
    ),
    ("--lease-wait", "lease_wait_s", float, "wait this long for another run's lease (default 0: refuse)"),
    (
        "--run-id",
        "run_id",
        str,
        "run id, A-Z a-z 0-9 . _ - and new to the table (default: UTC time + random); jobs: a prefix",
    ),
    (
        "--max-delete-fraction",
        "max_delete_fraction",
        float,
        "with --mirror-deletions: refuse to tombstone more than this fraction of the table at once (0.5)",
    ),
]
RUN_FLAGS = [
    ("--manifest", "manifest", "INPUT is a Parquet/CSV manifest with a `uri` column"),
    (
        "--allow-http",
        "allow_http",
        "a manifest may list http(s):// inputs (read through fsspec's HTTP filesystem)",
    ),
    ("--retry-errors", "retry_errors", "reprocess inputs whose last row is a permanent error"),
    ("--dry-run", "dry_run", "list the work and estimate audio hours, output size and time"),
    (
        "--mirror-deletions",
        "mirror_deletions",
        "tombstone recordings whose input is gone from the listing: readers hide them, compact drops them",
    ),
    (
        "--trust-remote-code",
        "trust_remote_code",
        "run a checkpoint's own model code (MERT-v2); only with a pinned model (hub id@<40-hex commit>, or a "
        "local/object-storage snapshot). The code runs with the job's credentials and token in reach",
    ),
]


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", nargs="?", help="folder, prefix URI (s3://bucket/audio/) or manifest")
    p.add_argument("output", nargs="?", help="feature table root (folder or s3://bucket/features/)")
    p.add_argument("--config", help="YAML file of run options (keys as in RunConfig); flags override it")
    for flag, dest, kind, text in RUN_OPTIONS:
        p.add_argument(flag, dest=dest, type=kind, default=argparse.SUPPRESS, help=text)
    for flag, dest, text in RUN_FLAGS:
        p.add_argument(flag, dest=dest, action="store_true", default=argparse.SUPPRESS, help=text)
    p.add_argument(
        "--normalize",
        dest="normalize",
        action=argparse.BooleanOptionalAction,
        default=argparse.SUPPRESS,
        help="normalize each segment to zero mean, unit variance (default: as the checkpoint says)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """YAML (if any), then flags; positional INPUT/OUTPUT override the YAML's input/output."""
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    fields = {dest for _, dest, _, _ in RUN_OPTIONS} | {dest for _, dest, _ in RUN_FLAGS} | {"normalize"}
    for name in fields:
        if name in vars(args):
            values[name] = getattr(args, name)
    if getattr(args, "input", None):
        values["input"] = args.input
    if getattr(args, "output", None):
        values["output"] = args.output
    if getattr(args, "quiet", False):
        values["progress"] = False
    missing = [k for k in ("input", "output") if not values.get(k)]
    if missing:
        raise ValueError(f"missing {' and '.join(missing).upper()}: give them as arguments or in --config")
    return make_config(values)


def print_summary(s: dict, out=None) -> None:
    out = out or sys.stdout
    c = s.get("counts", {})
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(c.get("errors_by_kind", {}).items())) or "none"
    print(f"run {s['run_id']}: {s['status']}", file=out)
    print(
        f"  inputs: {c.get('ok', 0)} ok, {c.get('error', 0)} error ({kinds}), {c.get('too_short', 0)} too short, "
        f"{c.get('skipped', 0)} skipped (of {c.get('listed', 0)} listed)",
        file=out,
    )
    print(
        f"  audio: {s.get('audio_hours', 0):.4f} h in {s.get('wall_s', 0):.1f} s wall "
        f"= {s.get('audio_s_per_s') or 0:.1f} audio s per s; {s.get('commits', 0)} commit(s)",
        file=out,
    )
    if s.get("stop_reason"):
        print(f"  stopped: {s['stop_reason']}", file=out)


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.engine import run

    cfg = config_from_args(args)
    log = (lambda m: None) if not cfg.progress else (lambda m: print(m, file=sys.stderr, flush=True))
    result = run(cfg, log=log)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    elif result.get("status") == "dry_run":
        print_plan(result)
    else:
        print_summary(result)
    return ExitCode.OK


def print_plan(p: dict) -> None:
    print(
        f"dry run: {p['inputs_to_process']} input(s) to process, {p['skipped']} skipped, "
        f"of {p['inputs_listed']} listed"
    )
    for uri in p["work"][:20]:
        print(f"  {uri}")
    if len(p["work"]) > 20:
        print(f"  ... and {len(p['work']) - 20} more")
    print(f"  estimated audio: {p['estimated_audio_hours']:.3f} h ({p['input_bytes'] / 1e6:.1f} MB of input)")
    print(f"  estimated output: {p['estimated_output_bytes'] / 1e6:.1f} MB")
    print(
        f"  model speed on this machine's CPU: {p['model_audio_s_per_s_on_this_machine_cpu']} audio s/s per actor "
        f"-> about {p['estimated_hours_at_that_rate_per_actor']} h with one CPU actor ({p['note']})"
    )


def cmd_read(args: argparse.Namespace) -> int:
    from pipeline.table import FeatureTable

    t = FeatureTable(args.table, args.storage_options)
    data = t.read_layer(args.layer, version=args.version)
    if args.out:
        import pyarrow.parquet as pq

        pq.write_table(data, args.out, compression="zstd")
        print(f"wrote {data.num_rows} rows of layer {args.layer} to {args.out}")
    else:
        print(
            f"layer {args.layer}: {data.num_rows} rows, {len(set(data.column('recording_id').to_pylist()))} "
            f"recordings; schema: {data.schema.field('embedding').type}"
        )
        print(data.drop_columns(["embedding"]).slice(0, args.limit).to_pandas().to_string())
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline.table import FeatureTable

    t = FeatureTable(args.table, args.storage_options)
    info = t.inspect(version=args.version)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    cfg, prov = info["config"], info["provenance"] or {}
    print(f"table {info['table']}  version {info['version']}  (configuration {info['config_hash']})")
    print(
        f"  model: {prov.get('model')} hub={prov.get('hub_id')} revision={prov.get('revision')} "
        f"content={prov.get('model_content_hash', '')[:16]}"
    )
    code = f", its own code {prov['model_code_hash'][:16]}" if prov.get("model_code_hash") else ""
    print(
        f"  licence: {prov.get('licence') or 'not recorded (see the model card)'}{code}; layers numbered "
        f"{prov.get('layer_numbering') or '0 = transformer input, i = layer i'}"
    )
    print(
        f"  window {cfg['window_s']} s, hop {cfg['hop_s']} s, min segment {cfg['min_segment_s']} s, "
        f"granularity {cfg['granularity']}, normalize {cfg['normalize']}, compute {cfg['compute_dtype']}, "
        f"storage {cfg['storage_dtype']}"
    )
    print(f"  layers: {info['layers']}  rows per layer: {info['rows_per_layer']}")
    files = info["files"]
    print(
        f"  files: {files['flushes']} flush(es) of one file per layer, {files['bytes']} bytes; "
        f"{files['with_dead_rows']} holding rows no reader shows (vacuum rewrites them), "
        f"{files['removed_not_deleted']} removed and kept for the retention period"
    )
    print(
        f"  recordings: {info['recordings']} by status {info['recordings_by_status']}; errors by kind "
        f"{info['errors_by_kind']}; {info['audio_hours_ok']} audio h ok"
    )
    for r in info["runs"]:
        print(f"  run {r['run_id']}: {r['status']} {r['started_at']} -> {r['finished_at']} {r['counts']}")
    if info["lease"]:
        print(
            f"  lease: epoch {info['lease']['epoch']} taken by run {info['lease']['run_id']} on "
            f"{info['lease']['host']}, not released (running, or died: its heartbeat tells)"
        )
    return 0


def cmd_vacuum(args: argparse.Namespace) -> int:
    from pipeline.table import FeatureTable
    from pipeline.table.maintenance import vacuum

    t = FeatureTable(args.table, args.storage_options)
    # under the table's lease: never beside a running run's commits
    out = vacuum(t, retention_s=args.retention, merge=args.command == "compact", wait_s=args.lease_wait)
    print(
        f"version {out['version']}: rewrote {out['rewritten']} file group(s) holding dead rows "
        f"({out['rows_dropped']} row(s) dropped), removed {out['removed']} without live rows"
        + (
            f", merged {out['merged_flushes']} small group(s) into {out['new_flushes']}"
            if out.get("merged_flushes")
            else ""
        )
        + f"; deleted the files of {out['deleted_flushes']} removed group(s) past the retention "
        f"({out['deleted_files']} file(s)) and {out['orphans_deleted']} orphan file(s)"
    )
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    from pipeline.table import FeatureTable
    from pipeline.table.upgrade import upgrade

    out = upgrade(FeatureTable(args.table, args.storage_options), wait_s=args.lease_wait)
    if not out["upgraded"]:
        print(f"{args.table} is already on the commit log (version {out['version']}): nothing to do")
    else:
        print(
            f"upgraded {args.table} to the commit log: version {out['version']}, {out['shards']} shard(s) added "
            f"in place, {out['recordings']} recording(s); {out['files_with_dead_rows']} file group(s) hold "
            "superseded rows (vacuum rewrites them)"
        )
    return 0


def _layer_list(text: str) -> tuple[int, ...]:
    """'6,7,12' or '0-4' (or both, '0-2,6') -> (6, 7, 12); ValueError naming the text otherwise."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise ValueError(f"--layers {text!r}: give layers like 6,7,12 or 0-4") from None
    if len(set(out)) != len(out) or any(i < 0 for i in out):
        raise ValueError(f"--layers {text!r}: distinct non-negative layer numbers")
    return tuple(out)


def cmd_probe(args: argparse.Namespace) -> int:
    from pipeline.probe import ProbeConfig, run_probe

    decays = ProbeConfig.weight_decays
    if args.weight_decays:
        try:
            decays = tuple(float(v) for v in args.weight_decays.split(","))
        except ValueError:
            raise ValueError(f"--weight-decays {args.weight_decays!r}: give numbers like 1e-3,0.1") from None
    cfg = ProbeConfig(
        weight_decays=decays,
        folds=args.folds,
        seed=args.seed,
        control_repeats=args.control_repeats,
        memory_mb=args.memory_mb,
        device=args.device,
        layers=_layer_list(args.layers) if args.layers else None,
    )
    so = json.loads(args.storage_options) if args.storage_options else None
    log = (lambda m: None) if args.quiet else (lambda m: print(f"[probe] {m}", file=sys.stderr, flush=True))
    report = run_probe(args.table, args.labels, args.out, cfg, storage_options=so, note=args.note, log=log)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    rec = report["recordings"]
    print(
        f"probe of {report['table']} ({report['model']['name']}), {report['task'].replace('_', '-')}, "
        f"{len(report['classes'])} classes, {rec['matched']} recordings ({rec['split']}, {rec['folds']} fold(s); "
        f"{rec['unmatched']} label row(s) unmatched)"
    )
    print(f"  {'layer':>8} {'macro-F1':>9} {'control':>8} {'accuracy':>9} {'weight':>7}")
    for e in report["layers"]:
        print(
            f"  {e['layer']:>8} {e['scores']['macro_f1']:>9.3f} {e['control']['macro_f1']:>8.3f} "
            f"{e['scores']['accuracy']:>9.3f} {report['weights'][str(e['layer'])]:>7.3f}"
        )
    w = report["weighted"]
    print(
        f"  {'weighted':>8} {w['scores']['macro_f1']:>9.3f} {w['control']['macro_f1']:>8.3f} "
        f"{w['scores']['accuracy']:>9.3f} {1:>7.3f}"
    )
    print(f"  best layer: {report['best_layer']}; chance macro-F1 {report['chance']['macro_f1']:.3f}")
    print(f"  report: {Path(args.out) / 'report.html'} (report.json, report.png)")
    return 0


def cmd_neighbors(args: argparse.Namespace) -> int:
    from pipeline.neighbors import neighbors

    so = json.loads(args.storage_options) if args.storage_options else None
    info, found = neighbors(args.table, args.query, args.layer, args.k, model=args.model, storage_options=so)
    if args.json:
        print(json.dumps({**info, "neighbors": [vars(n) for n in found]}, indent=2))
        return 0
    what = info["query_recording"] if info["query_kind"] == "recording" else f"{args.query} (embedded now)"
    print(f"nearest to {what} in layer {args.layer} of {info['table']} ({info['recordings']} recordings):")
    for n in found:
        print(f"  {n.rank:>3}  {n.similarity:.4f}  {n.recording_id}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from pipeline.registry import REGISTRY

    print(
        f"{'name':16} {'hub id':24} {'rate':>6} {'frames/s':>8} {'states':>6} {'dim':>5}  {'window':>6}  "
        "architecture; layer numbering; licence"
    )
    for s in REGISTRY.values():
        if s.remote_code:
            arch = "its own code (--trust-remote-code, pinned)" + (", gated" if s.gated else "")
        else:
            arch = f"{s.family}, {'pre-LN' if s.pre_ln else 'post-LN'}"
        print(
            f"{s.name:16} {s.hub_id:24} {s.sample_rate:>6} {s.frame_rate:>8g} {s.num_hidden_states:>6} "
            f"{s.dim:>5}  {s.default_window_s:>5g}s  {arch}; {s.layer_numbering}; {s.licence or 'see the card'}"
        )
    return 0


DEMO_BANNER = """
########################################################################################
#  DEMO MODE: the model has the exact MERT-v1-95M architecture but RANDOM WEIGHTS.      #
#  The features written are MEANINGLESS. They only show the pipeline working.          #
#  For real features use a real checkpoint: --model MERT-v1-95M (hub) or a local copy.  #
########################################################################################
"""


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.checkpoints import write_random_checkpoint
    from pipeline.engine import run
    from pipeline.synth import write_corpus, write_labelled_corpus

    root = Path(args.folder).resolve()
    print(DEMO_BANNER, file=sys.stderr)
    audio, model, table = root / "audio", root / "random-MERT-v1-95M", root / "table"
    if not (model / "config.json").exists():
        print(
            f"[demo] writing a random-weight MERT-v1-95M checkpoint (hub layout) to {model}", file=sys.stderr
        )
        write_random_checkpoint(model, like="MERT-v1-95M", size="full", seed=0)
    if not audio.exists():
        print(f"[demo] generating {args.files} music-like audio files in {audio}", file=sys.stderr)
        write_corpus(audio, n=args.files, seed=0)
    cfg = RunConfig(input=str(audio), output=str(table), model=str(model), progress=True)
    summary = run(cfg)
    print_summary(summary)
    # which layer? a labelled corpus (4 pitch classes x 10 tones), its table, the probe, then neighbours
    labelled, ltable, probe_dir = root / "labelled-audio", root / "labelled-table", root / "probe"
    labels = labelled / "labels.csv"
    if not labels.exists():
        print(
            f"[demo] generating a labelled corpus (4 pitch classes x 10 tones) in {labelled}", file=sys.stderr
        )
        write_labelled_corpus(labelled, classes=4, per_class=10, duration_s=1.5, seed=0)
    print_summary(run(RunConfig(input=str(labelled), output=str(ltable), model=str(model), progress=True)))
    note = "DEMO: RANDOM WEIGHTS. This is what random weights give, not what MERT gives"
    probe_argv = ["probe", str(ltable), "--labels", str(labels), "--out", str(probe_dir), "--note", note]
    cmd_probe(build_parser().parse_args(probe_argv))
    first = sorted(labelled.glob("*.wav"))[0]
    cmd_neighbors(
        build_parser().parse_args(["neighbors", str(ltable), str(first), "--layer", "6", "-k", "5"])
    )
    print(
        f"\nread it:  mert-pipeline inspect {table}\n          mert-pipeline read {table} --layer 12"
        f"\nwhich layer?  open {probe_dir / 'report.html'}"
        f"\nmore like this:  mert-pipeline neighbors {ltable} {first} --layer 6"
    )
    print(DEMO_BANNER, file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mert-pipeline", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="embed every input into the feature table (or --dry-run)")
    add_run_arguments(r)
    r.set_defaults(fn=cmd_run)
    for name, fn, text in (
        ("inspect", cmd_inspect, "what a table holds"),
        ("vacuum", cmd_vacuum, "rewrite files holding dead rows; delete removed and orphan files"),
        ("compact", cmd_vacuum, "vacuum, and merge small files into larger ones"),
        ("read", cmd_read, "one layer's committed rows"),
        ("upgrade", cmd_upgrade, "put a table of the version-1 layout on the commit log"),
    ):
        s = sub.add_parser(name, help=text)
        s.add_argument("table")
        s.add_argument("--storage-options", type=storage_options_arg, help="fsspec options as JSON")
        if name == "read":
            s.add_argument("--layer", type=int, required=True)
            s.add_argument("--out", help="write the rows to this Parquet file")
            s.add_argument("--limit", type=int, default=10, help="rows to print")
        if name == "inspect":
            s.add_argument("--json", action="store_true")
        if name in ("read", "inspect"):
            s.add_argument("--version", type=int, help="the table at this log version (default: the newest)")
        if name in ("vacuum", "compact", "upgrade"):
            s.add_argument(
                "--lease-wait", type=float, default=0.0, help="wait this long for a running run's lease"
            )
        if name in ("vacuum", "compact"):
            s.add_argument(
                "--retention",
                type=float,
                default=24 * 3600.0,
                metavar="SECONDS",
                help="keep files removed or orphaned less than this long ago, for readers still scanning an "
                "older version (default one day; 0 after which plain Parquet readers see exactly the snapshot)",
            )
        s.set_defaults(fn=fn)
    pr = sub.add_parser("probe", help="which layer? linear probes per layer, a layer weighting, a control")
    pr.add_argument("table")
    pr.add_argument(
        "--labels",
        required=True,
        help="CSV or Parquet with recording_id (or uri), label ('a|b' = multi-label), optional split",
    )
    pr.add_argument(
        "--out", required=True, help="folder for report.json, report.png, report.html, splits.csv"
    )
    pr.add_argument("--layers", help="layers to probe, e.g. 6,7,12 or 0-4 (default: all the table holds)")
    pr.add_argument("--folds", type=int, default=5, help="k-fold by recording when there is no split (5)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--control-repeats", type=int, default=3, help="shuffled-label controls averaged (3)")
    pr.add_argument(
        "--weight-decays", help="comma-separated L2 strengths chosen on valid (default 1e-4,1e-3,1e-2,0.1,1)"
    )
    pr.add_argument(
        "--memory-mb", type=float, default=512.0, help="layer weighting: minibatch memory limit, MB (512)"
    )
    pr.add_argument("--device", default="auto", help="auto | cpu | cuda (default: cuda when present)")
    pr.add_argument("--note", help="a line to print on the report (e.g. 'random weights')")
    pr.add_argument("--storage-options", help="fsspec options as JSON")
    pr.add_argument("--quiet", action="store_true", help="no progress lines")
    pr.add_argument("--json", action="store_true", help="print the report as JSON")
    pr.set_defaults(fn=cmd_probe)
    nb = sub.add_parser("neighbors", help="nearest recordings by cosine similarity (exact, in blocks)")
    nb.add_argument("table")
    nb.add_argument("query", help="a recording id (or uri) of the table, or an audio file to embed now")
    nb.add_argument("--layer", type=int, required=True)
    nb.add_argument("-k", type=int, default=10, help="how many (10)")
    nb.add_argument(
        "--model", help="for an audio query: the table's checkpoint (its content hash is checked)"
    )
    nb.add_argument("--storage-options", help="fsspec options as JSON")
    nb.add_argument("--json", action="store_true")
    nb.set_defaults(fn=cmd_neighbors)
    m = sub.add_parser("models", help="the model registry")
    m.set_defaults(fn=cmd_models)
    d = sub.add_parser("demo", help="random-weight MERT-v1-95M on generated audio (meaningless features)")
    d.add_argument("folder", nargs="?", default="demo-out")
    d.add_argument("--files", type=int, default=6)
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit codes: pipeline.errors.ExitCode (the same as jobs.extract's for the same outcome)."""
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (PipelineError, ValueError) as exc:
        summary = getattr(exc, "summary", None)
        if summary and getattr(args, "json", False):
            print(json.dumps(summary, indent=2, default=str))
        elif summary:
            print_summary(summary)
        print(f"mert-pipeline: error: {exc}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt as exc:
        print("mert-pipeline: interrupted", file=sys.stderr)
        return exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())

"""One run of the pipeline as a Ray job:

    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.extract --config run.yaml

It takes exactly the options of `mert-pipeline run` (the same parser: pipeline.cli.add_run_arguments), joins the
cluster the job runs on (RAY_ADDRESS, set by the job supervisor), prints the run summary and exits with

    0    the run committed: complete, or stopped by the error-rate limit (the summary says which and why)
    1    the run could not commit: a systemic failure (model, credentials, bucket, configuration) or a crash
    2    the command line or the YAML is invalid
    75   another run holds the table's lease (EX_TEMPFAIL: try again later, or give --lease-wait)
    143  SIGTERM (or SIGINT) stopped it at a commit boundary: what finished is committed; rerun to resume
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from pipeline.cli import add_run_arguments, config_from_args, print_summary
from pipeline.errors import PipelineError, RunInterrupted, RunStopped

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BUSY, EXIT_INTERRUPTED = 0, 1, 2, 75, 143


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.extract", description="One pipeline run, as a Ray job.")
    add_run_arguments(p)
    return p


def log_to_stderr(quiet: bool) -> Callable[[str], None]:
    return (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))


def report(summary: dict, as_json: bool) -> None:
    if as_json:  # one line: Ray's worker log lines may share stdout with it (take the last line that parses)
        print(json.dumps(summary, default=str), flush=True)
    elif summary.get("status") == "noop":
        print(f"tick {summary.get('tick')}: already complete (run {summary.get('done_by')}); nothing to do")
    elif summary.get("run_id"):
        print_summary(summary)
    sys.stdout.flush()


def execute(fn: Callable[[], dict], as_json: bool = False) -> int:
    """Run fn (which returns a run summary) and map its outcome to the exit codes above."""
    from pipeline.table import LeaseHeld

    try:
        report(fn(), as_json)
        return EXIT_OK
    except RunStopped as exc:
        report(exc.summary, as_json)
        return EXIT_OK
    except RunInterrupted as exc:
        report(exc.summary, as_json)
        print(f"interrupted: {exc}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except LeaseHeld as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BUSY
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def go() -> dict:
        from pipeline.engine import run

        cfg = config_from_args(args)
        return run(cfg, log=log_to_stderr(not cfg.progress))

    return execute(go, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())

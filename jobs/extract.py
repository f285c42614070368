"""One run of the pipeline as a Ray job:

    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.extract --config run.yaml

It takes exactly the options of `mert-pipeline run` (the same parser: pipeline.cli.add_run_arguments), joins the
cluster the job runs on (RAY_ADDRESS, set by the job supervisor), prints the run summary and exits with the codes
of `mert-pipeline run` (pipeline.errors.ExitCode, one table for every entrypoint):

    0    the run committed and is complete
    1    the run could not commit: a systemic failure (model, credentials, bucket, configuration) or a crash
    2    the command line or the YAML is invalid (an option's value, a run id)
    3    the error-rate limit (or failing first inputs) stopped the run; what finished is committed (the summary
         says why): look at the errors before rerunning
    75   another run holds the table's lease (EX_TEMPFAIL: try again later, or give --lease-wait)
    143  SIGTERM (or SIGINT) stopped it at a commit boundary: what finished is committed; rerun to resume

Run ids: a job is retried with the same arguments (a RayJob's backoffLimit, a resubmitted command), so a `run_id`
given in the YAML or with --run-id is a PREFIX: each attempt runs as `<run_id>-<UTC time>-<random>` (default
prefix `run`). A retry therefore never overwrites an attempt's files: it resumes, processing only the inputs
without a committed `ok` row (and transient errors), under its own new run id.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable

from pipeline.cli import add_run_arguments, config_from_args, print_summary
from pipeline.config import job_run_id
from pipeline.errors import ExitCode, PipelineError, RunEnded, RunInterrupted, exit_code

# Kept for callers that import them; the table is pipeline.errors.ExitCode.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED, EXIT_BUSY, EXIT_INTERRUPTED = (
    ExitCode.OK,
    ExitCode.FAILED,
    ExitCode.USAGE,
    ExitCode.STOPPED,
    ExitCode.BUSY,
    ExitCode.INTERRUPTED,
)


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
    """Run fn (which returns a run summary) and map its outcome to the exit codes above (errors.exit_code)."""
    try:
        report(fn(), as_json)
        return exit_code(None)
    except RunEnded as exc:  # stopped or interrupted, after committing what finished: the summary says why
        report(exc.summary, as_json)
        what = "interrupted" if isinstance(exc, RunInterrupted) else "stopped"
        print(f"{what}: {exc}", file=sys.stderr, flush=True)
        return exit_code(exc)
    except (PipelineError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exit_code(exc)
    except KeyboardInterrupt as exc:
        print("interrupted", file=sys.stderr, flush=True)
        return exit_code(exc)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def go() -> dict:
        from pipeline.engine import run

        cfg = config_from_args(args)
        cfg = dataclasses.replace(cfg, run_id=job_run_id(cfg.run_id))  # a retry never reuses an id
        return run(cfg, log=log_to_stderr(not cfg.progress))

    return execute(go, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())

"""Named faults. Bad input is data: the CPU stage turns an InputFault into a ledger row, never a crashed job.

Every fault names the input and the cause, and says whether a rerun may succeed by itself (`transient`: storage
timeouts, throttling) or not (`permanent`: the content cannot be decoded). Messages never carry credentials.

Also here: `ExitCode` and `exit_code(exc)`, the one table of exit codes every entrypoint uses.
"""

from __future__ import annotations

from enum import IntEnum


class PipelineError(Exception):
    """A systemic failure that stops the run with one clear message (bad model, bad credentials, bad config)."""


class InputFault(Exception):
    """One input cannot be turned into segments. Subclasses set `kind` and `transient`."""

    kind = "input"
    transient = False

    def __init__(self, uri: str, cause: str, hint: str | None = None):
        self.uri = uri
        self.cause = cause
        self.hint = hint
        text = f"{uri}: {cause}"
        if hint:
            text += f" ({hint})"
        super().__init__(text)

    @property
    def error_kind(self) -> str:
        return self.kind


class InputNotFound(InputFault):
    kind = "not_found"
    transient = False


class StorageError(InputFault):
    """The object store failed to serve the input (timeout, throttling, connection reset)."""

    kind = "storage"
    transient = True


class AccessDenied(InputFault):
    kind = "access_denied"
    transient = False


class DecodeError(InputFault):
    kind = "decode"
    transient = False


class NoAudioStream(InputFault):
    kind = "no_audio_stream"
    transient = False


class EmptyAudio(InputFault):
    """The file holds an audio stream but no samples (or the file itself is empty)."""

    kind = "empty"
    transient = False


class NonFiniteAudio(InputFault):
    kind = "non_finite"
    transient = False


class DecodeTimeout(InputFault):
    kind = "decode_timeout"
    transient = False


class DecoderCrashed(InputFault):
    kind = "decoder_crash"
    transient = False


class TooShort(InputFault):
    """Decoded fine, but shorter than the minimum segment: ledger status `too_short`, not `error`."""

    kind = "too_short"
    transient = False


def redact(text: str, secrets: list[str] | tuple[str, ...] = ()) -> str:
    """Remove secret values (keys, tokens) from a message before it is logged or stored."""
    for s in secrets:
        if s and isinstance(s, str) and len(s) >= 4:
            text = text.replace(s, "***")
    return text


class ModelLoadError(PipelineError):
    """A checkpoint cannot be found, fetched or loaded (no config.json, unknown architecture, bad weights).

    The message names the checkpoint's path or URI, what is wrong and what to do; the run stops before any input.
    """


class RunEnded(PipelineError):
    """A run that ended early after committing what it finished. `summary` is its run record."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


class RunStopped(RunEnded):
    """The error-rate limit or a systemic first-inputs failure stopped the run."""


class RunInterrupted(RunEnded):
    """SIGTERM or SIGINT ended the run at a commit boundary: the finished work is committed, a rerun resumes."""


class UsageError(PipelineError):
    """What the command was given cannot be used (a labels file without its columns, a query checkpoint that is
    not the table's, a path that is not a table): exit 2, like an invalid option."""


class RunIdTaken(UsageError):
    """The run id already names a run or a shard in the table: a run never overwrites another run's files."""


# ---- exit codes: one meaning per outcome, for `mert-pipeline run`, jobs.extract and jobs.scheduled ------------
class LeaseHeld(PipelineError):
    """Another live run holds the table's lease (a courtesy: it avoids two runs doing the same work)."""


class StaleWriter(PipelineError):
    """This writer's epoch was superseded in the table's commit log (another writer took the table over after
    this one stopped renewing its lease): its commits are refused."""


class ExitCode(IntEnum):
    """What a finished entrypoint tells its caller (a shell, `ray job submit`, a RayJob, a CronJob)."""

    OK = 0  # the run committed and is complete (or a tick was already complete: nothing to do)
    FAILED = 1  # it could not commit: a systemic failure (model, credentials, bucket) or a crash
    USAGE = 2  # an invalid option, YAML or run id: fix the command line
    STOPPED = 3  # the error-rate limit (or failing first inputs) stopped it; what finished is committed
    BUSY = (
        75  # another run holds the table's lease, or took it over (EX_TEMPFAIL): retry later, or --lease-wait
    )
    KEYBOARD = 130  # KeyboardInterrupt outside a run's commit loop
    INTERRUPTED = 143  # SIGTERM (or SIGINT) stopped the run at a commit boundary; rerun to resume


def exit_code(exc: BaseException | None) -> ExitCode:
    """The exit code for an outcome: None (success) or the exception an entrypoint caught."""
    if exc is None:
        return ExitCode.OK
    if isinstance(exc, RunInterrupted):
        return ExitCode.INTERRUPTED
    if isinstance(exc, RunStopped):
        return ExitCode.STOPPED
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.KEYBOARD
    if isinstance(exc, (ValueError, UsageError)):
        return ExitCode.USAGE
    if isinstance(exc, PipelineError):
        return ExitCode.BUSY if isinstance(exc, (LeaseHeld, StaleWriter)) else ExitCode.FAILED
    return ExitCode.FAILED

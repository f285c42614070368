"""Configuration: frozen dataclasses validated on construction.

An invalid value raises ValueError naming the field, the value and what is allowed.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass, fields
from functools import cache

RUN_ID_MAX = 128
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@cache
def min_segment_seconds() -> tuple[float, str]:
    """(seconds, explanation): the longest receptive field among the registry's models, in seconds.

    A window or minimum segment shorter than this gives no frame for some natively built registry model
    (`ModelSpec.receptive_field`: the conv front end's facts in the registry). A model with its own code is checked
    against its own receptive field when the run meets the checkpoint (engine.model_facts).
    """
    from pipeline.registry import NATIVE, REGISTRY

    longest = max(
        (REGISTRY[name].receptive_field / REGISTRY[name].sample_rate, -i, name, REGISTRY[name].sample_rate)
        for i, name in enumerate(NATIVE)
    )
    seconds, _, name, rate = longest
    why = f"the longest receptive field of the registry's models ({name}: {round(seconds * rate)} samples at "
    why += f"{rate} Hz)"
    return seconds, why


@dataclass(frozen=True)
class SegmentConfig:
    window_s: float = 5.0  # segment length; MERT was pre-trained on 5 s contexts
    hop_s: float | None = None  # distance between segment starts; None = window_s (no overlap)
    min_segment_s: float = 1.0  # shortest partial window kept at the end; also the shortest recording

    def __post_init__(self) -> None:
        if not (isinstance(self.window_s, (int, float)) and 0 < self.window_s <= 600):
            raise ValueError(f"window_s={self.window_s!r}: must be a number of seconds in (0, 600]")
        least, why = min_segment_seconds()
        if self.window_s < least:
            raise ValueError(f"window_s={self.window_s!r}: must be at least {least:.4g} s, {why}")
        if self.hop_s is not None and not (isinstance(self.hop_s, (int, float)) and self.hop_s > 0):
            raise ValueError(
                f"hop_s={self.hop_s!r}: must be a positive number of seconds (or unset = window_s)"
            )
        if not (isinstance(self.min_segment_s, (int, float)) and 0 < self.min_segment_s <= self.window_s):
            raise ValueError(
                f"min_segment_s={self.min_segment_s!r}: must be positive and at most window_s={self.window_s}"
            )
        if self.min_segment_s < least:
            raise ValueError(f"min_segment_s={self.min_segment_s!r}: must be at least {least:.4g} s, {why}")

    @property
    def hop(self) -> float:
        return float(self.window_s if self.hop_s is None else self.hop_s)


GRANULARITIES = ("segment", "recording", "frame")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
STORAGE_DTYPES = ("float32", "float16")
AUDIO_EXTENSIONS = (
    ".wav",
    ".flac",
    ".mp3",
    ".ogg",
    ".oga",
    ".opus",
    ".m4a",
    ".aac",
    ".mp4",
    ".aif",
    ".aiff",
    ".wma",
    ".webm",
)


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs. Field names are the YAML keys; CLI flags override them."""

    input: str  # a prefix/folder/file (any fsspec URI), or a manifest (.csv/.parquet) when `manifest` is true
    output: str  # the feature table's root (any fsspec URI)
    model: str = "MERT-v1-95M"  # registry name, hub id[@revision], local directory, or object-storage prefix
    manifest: bool = (
        False  # input is a Parquet/CSV manifest with a `uri` column (and optional `recording_id`)
    )
    allow_http: bool = False  # a manifest may list http(s):// inputs (read through fsspec's HTTP filesystem)
    glob: str | None = None  # pattern below the prefix, e.g. "**/*.flac"; default: every file, recursively
    extensions: tuple[str, ...] = AUDIO_EXTENSIONS  # kept when listing a prefix (case-insensitive); () = all
    layers: tuple[int, ...] | None = None  # hidden-state indices to keep; None = all
    window_s: float | None = None  # None: the model's default (5 s for v0/v1, 30 s for v2; registry)
    hop_s: float | None = None
    min_segment_s: float = 1.0
    granularity: str = "segment"  # segment | recording | frame
    normalize: bool | None = None  # None: what the checkpoint's preprocessor_config.json says
    compute_dtype: str = "float32"  # float32 | bfloat16 | float16 (half types need a GPU)
    storage_dtype: str = "float32"  # float32 | float16
    batch_size: int = 8  # segments per model call (equal-length only)
    num_gpus: int | None = None  # GPUs to use (one actor each); None = all the cluster has; 0 = CPU actors
    gpu_wait_s: float = 0.0  # wait this long for num_gpus GPUs to join (pods starting, an autoscaler)
    num_actors: int | None = None  # embed actors when running on CPU; None = 1
    cpus_per_actor: float | None = None  # CPU actors: cores reserved (and torch threads); None = auto
    decode_workers: int | None = None  # concurrent decode tasks; None = auto
    storage_options: dict | None = None  # fsspec options for the input (endpoint, credentials, anon)
    output_storage_options: dict | None = None  # for the output; None = same as storage_options
    model_cache: str | None = None  # where remote checkpoints are staged on each node
    address: str | None = None  # Ray cluster address; None = RAY_ADDRESS, else a local Ray
    retry_errors: bool = False  # reprocess inputs whose last row is a permanent error
    max_error_rate: float = 0.5  # stop the run when more than this fraction of processed inputs fail ...
    error_rate_min_inputs: int = 20  # ... once at least this many have been processed
    decode_timeout_s: float = 600.0  # one input's decode time limit
    commit_interval_s: float = 60.0  # writers flush and the driver commits this often (bounds a crash's loss)
    shard_max_recordings: int = 2000  # ... or once this many recordings are ready to commit
    shard_max_mb: float = 512.0  # a writer flushes at this much buffered data (a layer file ~ this / layers)
    lease_ttl_s: float = 120.0  # others may take the table this long after the holder's last heartbeat
    lease_wait_s: float = 0.0  # wait this long for another run's lease before giving up
    run_id: str | None = None  # [A-Za-z0-9._-], new to the table; default: UTC time + random (jobs: a prefix)
    mirror_deletions: bool = False  # inputs gone from the listing get a tombstone row: readers hide them
    max_delete_fraction: float = (
        0.5  # ... but refuse to tombstone more than this fraction of the table at once
    )
    tick: str | None = None  # a schedule tick label (jobs.scheduled): a tick already complete does nothing
    dry_run: bool = False
    progress: bool = True
    # A checkpoint that ships its own model code (MERT-v2) runs only with this, and only pinned (a hub id at a
    # 40-hex commit, or a local/object-storage snapshot); the code runs with the job's credentials in reach.
    # The natively built v0/v1 models ignore it.
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        def bad(field: str, allowed: str) -> ValueError:
            return ValueError(f"{field}={getattr(self, field)!r}: {allowed}")

        if not isinstance(self.input, str) or not self.input:
            raise bad("input", "give a folder, a prefix URI (s3://bucket/audio/) or a manifest file")
        if not isinstance(self.output, str) or not self.output:
            raise bad("output", "give a folder or a prefix URI for the feature table")
        if not isinstance(self.model, str) or not self.model:
            raise bad(
                "model", "give a registry name (see `mert-pipeline models`), a hub id, a folder or a URI"
            )
        if self.granularity not in GRANULARITIES:
            raise bad("granularity", f"must be one of {', '.join(GRANULARITIES)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise bad("compute_dtype", f"must be one of {', '.join(COMPUTE_DTYPES)}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise bad("storage_dtype", f"must be one of {', '.join(STORAGE_DTYPES)}")
        if self.layers is not None:
            if not self.layers or any((not isinstance(i, int)) or i < 0 for i in self.layers):
                raise bad("layers", "must be non-negative hidden-state indices, e.g. 6,7,12")
            if len(set(self.layers)) != len(self.layers):
                raise bad("layers", "lists a layer twice")
        for name in ("batch_size", "shard_max_recordings", "error_rate_min_inputs"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "must be a whole number >= 1")
        for name in ("num_gpus",):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise bad(name, "must be a whole number >= 0")
        for name in ("num_actors", "decode_workers"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise bad(name, "must be a whole number >= 1")
        if self.cpus_per_actor is not None and not (self.cpus_per_actor > 0):
            raise bad("cpus_per_actor", "must be > 0")
        if not (isinstance(self.max_error_rate, (int, float)) and 0 < self.max_error_rate <= 1):
            raise bad("max_error_rate", "must be a fraction in (0, 1]")
        for name in ("decode_timeout_s", "commit_interval_s", "shard_max_mb", "lease_ttl_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0):
                raise bad(name, "must be a positive number")
        if not (isinstance(self.gpu_wait_s, (int, float)) and self.gpu_wait_s >= 0):
            raise bad("gpu_wait_s", "must be >= 0 seconds")
        if not (isinstance(self.max_delete_fraction, (int, float)) and 0 < self.max_delete_fraction <= 1):
            raise bad("max_delete_fraction", "must be a fraction in (0, 1]")
        if not (isinstance(self.lease_wait_s, (int, float)) and self.lease_wait_s >= 0):
            raise bad("lease_wait_s", "must be >= 0 seconds")
        for name in ("storage_options", "output_storage_options"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, dict):  # the value is never echoed: it may hold a secret
                raise ValueError(
                    f"{name}: must be a mapping of fsspec options (got a {type(v).__name__}, not shown)"
                )
        if self.run_id is not None:
            check_run_id(self.run_id)
        # last: the receptive-field minimum imports torch once per process, so the cheap checks answer first
        self.segment_config()  # validates window_s, hop_s, min_segment_s

    def segment_config(self, default_window_s: float = 5.0) -> SegmentConfig:
        """The segment rule, with the model's default window when the run gives none."""
        window = default_window_s if self.window_s is None else self.window_s
        return SegmentConfig(window_s=window, hop_s=self.hop_s, min_segment_s=self.min_segment_s)

    @property
    def out_options(self) -> dict:
        return dict(
            self.output_storage_options
            if self.output_storage_options is not None
            else (self.storage_options or {})
        )

    @property
    def in_options(self) -> dict:
        return dict(self.storage_options or {})

    def public_dict(self) -> dict:
        """The configuration as written next to the output: storage options are reduced to their key names."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("storage_options", "output_storage_options") and v is not None:
                v = sorted(_flatten_keys(v))
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out


def check_run_id(run_id: object, field: str = "run_id") -> str:
    """A run id names files in the table (runs/<id>.json, <id>-<n>.parquet): letters, digits, '.', '_', '-'."""
    if not (isinstance(run_id, str) and len(run_id) <= RUN_ID_MAX and _RUN_ID.fullmatch(run_id)):
        raise ValueError(
            f"{field}={run_id!r}: must be 1 to {RUN_ID_MAX} characters of A-Z a-z 0-9 . _ - starting with a "
            "letter or digit: it names files in the table (no '/' or '..'; a leading '.' or '_' would hide them)"
        )
    return run_id


def job_run_id(prefix: str | None, label: str | None = None) -> str:
    """A fresh run id for a job: `<prefix>-[<label>-]<UTC time>-<random>`, so that a retried job or a second tick
    never reuses an id (a YAML `run_id` is a prefix in jobs); default prefix "run"."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    suffix = "-".join(p for p in (label, stamp, secrets.token_hex(3)) if p)
    head = check_run_id(prefix) if prefix is not None else "run"
    room = RUN_ID_MAX - len(suffix) - 1
    if len(head) > room:
        raise ValueError(
            f"run_id={prefix!r}: in a job the run id is a prefix to which -{suffix} is appended; give at most "
            f"{room} characters"
        )
    return check_run_id(f"{head}-{suffix}")


_JSON_TYPES = {
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def parse_storage_options(text: str, option: str | None = "--storage-options") -> dict:
    """JSON text -> a dict of fsspec options. Errors name the option and the position, never the text (keys).

    option: named at the start of the message (None: not named, for argparse, which names it itself).
    """
    head = f"{option}: " if option else ""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{head}not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}, char {exc.pos}; the "
            "value is not shown, it may hold credentials): give an object like '{\"anon\": true}'"
        ) from None
    if not isinstance(value, dict):
        raise ValueError(
            f"{head}must be a JSON object of fsspec options, like '{{\"anon\": true}}' "
            f"(got a JSON {_JSON_TYPES.get(type(value), type(value).__name__)}, not shown)"
        )
    return value


def _flatten_keys(d: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        if isinstance(v, dict):
            keys += _flatten_keys(v, f"{prefix}{k}.")
        else:
            keys.append(f"{prefix}{k}")
    return keys


def load_yaml(path: str) -> dict:
    """Read a YAML run config: a mapping whose keys are RunConfig fields."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as exc:
        raise ValueError(
            f"--config {path}: cannot read it ({exc.strerror or exc}); give the path of a YAML file"
        ) from None
    except yaml.YAMLError as exc:
        # Only the problem and its position: never a snippet of the text, which may hold storage_options secrets.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ValueError(f"--config {path}: not valid YAML ({problem}{where})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a run config must be a YAML mapping of option: value")
    known = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return data


def make_config(values: dict) -> RunConfig:
    """Build a RunConfig from a mapping (YAML and CLI merged), normalizing list values to tuples."""
    v = dict(values)
    for key in ("layers", "extensions"):
        if isinstance(v.get(key), list):
            v[key] = tuple(v[key])
        if isinstance(v.get(key), str):
            v[key] = parse_list(v[key], int if key == "layers" else str)
    return RunConfig(**v)


def parse_list(text: str, kind=int) -> tuple:
    """'6,7,12' -> (6, 7, 12); '0-3' ranges allowed for ints."""
    out: list = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if kind is int and "-" in part[1:]:
            a, b = part.split("-", 1)
            try:
                out.extend(range(int(a), int(b) + 1))
            except ValueError:
                raise ValueError(f"layers: {part!r} is not a range like 4-8") from None
            continue
        try:
            out.append(kind(part))
        except ValueError:
            raise ValueError(f"{part!r} is not a valid {kind.__name__}") from None
    return tuple(out)

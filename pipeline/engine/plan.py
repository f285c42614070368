"""Planning a run: the model's facts and the configuration hash, the work list against the ledger, the fail-fast
rule for systemic input failures, and the dry run's estimates. No Ray here."""

from __future__ import annotations

import hashlib
import json
import platform
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline import __version__
from pipeline.audio import probe_duration
from pipeline.config import RunConfig, SegmentConfig
from pipeline.errors import PipelineError
from pipeline.inputs import InputItem, list_inputs, read_manifest
from pipeline.registry import ModelSpec
from pipeline.table import SCHEMA_VERSION

Log = Callable[[str], None]


def stderr_log(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


# When the first inputs of a run all fail to be read for these reasons, the cause is the setup, not the files.
SYSTEMIC_KINDS = ("access_denied", "storage")
SYSTEMIC_FIRST = 5


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
    from pipeline.models import receptive_field, torch_build

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
    build = torch_build()
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
        "torch_version": build["torch"],
        "cuda_version": build["cuda"],
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


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def estimate(cfg: RunConfig, facts: ModelFacts, todo: list[InputItem], loaded, log: Log) -> dict:
    """Dry-run estimates: audio hours from a sample of headers, output size from the layout, time from one
    model batch timed on this machine."""
    sample = todo[:: max(1, len(todo) // 16)][:16]
    secs, size = 0.0, 0
    for item in sample:
        d = probe_duration(item.uri, cfg.in_options)
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


def table_meta(cfg: RunConfig, facts: ModelFacts) -> dict:
    """Version 0 of a new table's log: the configuration every later run must match."""
    return {
        "schema_version": SCHEMA_VERSION,
        "config_hash": facts.config_hash,
        "config": facts.numbers,
        "dim": facts.spec.dim,
        "provenance": facts.provenance,
        "created_at": utc_now(),
    }

"""The two stages of the pipeline as plain functions over Arrow batches. They know nothing of Ray.

decode: one input row (uri, recording_id, fingerprint, and optional fault_kind, fault_message) -> tables of
        segments, then one `record` row that carries the input's ledger fields (status, error kind, duration,
        source rate, ...). A bad input (or one found bad while listing: a fault) yields only its record row:
        faults are data.
embed:  a table of segment rows (and passing record rows) -> the same rows with one embedding column per layer.

The record row travels behind the recording's segments so that the driver knows when a recording is complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa

from pipeline.config import SegmentConfig
from pipeline.errors import InputFault, TooShort
from pipeline.table.writer import layer_column

DECODE_SCHEMA = pa.schema(
    [
        ("recording_id", pa.string()),
        ("segment", pa.int32()),
        ("start_s", pa.float64()),
        ("duration_s", pa.float64()),
        ("audio", pa.large_list(pa.float32())),  # (N,) mono at the model rate; null on record rows
        ("record", pa.string()),  # JSON ledger fields; null on segment rows
    ]
)


def _segment_table(rid: str, segs: list) -> pa.Table:
    audio = pa.LargeListArray.from_arrays(
        pa.array(np.cumsum([0] + [len(s.samples) for s in segs]), pa.int64()),
        pa.array(np.concatenate([s.samples for s in segs]).astype(np.float32, copy=False), pa.float32()),
    )
    return pa.Table.from_arrays(
        [
            pa.array([rid] * len(segs), pa.string()),
            pa.array([s.index for s in segs], pa.int32()),
            pa.array([s.start_s for s in segs], pa.float64()),
            pa.array([s.duration_s for s in segs], pa.float64()),
            audio,
            pa.nulls(len(segs), pa.string()),
        ],
        schema=DECODE_SCHEMA,
    )


def _record_table(rid: str, record: dict) -> pa.Table:
    return pa.Table.from_arrays(
        [
            pa.array([rid]),
            pa.array([-1], pa.int32()),
            pa.array([None], pa.float64()),
            pa.array([None], pa.float64()),
            pa.nulls(1, pa.large_list(pa.float32())),
            pa.array([json.dumps(record)]),
        ],
        schema=DECODE_SCHEMA,
    )


def decode_input(
    uri: str,
    recording_id: str,
    fingerprint: str,
    *,
    sample_rate: int,
    segments: SegmentConfig,
    storage_options: dict | None = None,
    time_limit_s: float = 600.0,
    isolate: bool = True,
    segments_per_table: int = 8,
    attempts=None,
    crash_limit: int = 2,
    fault_kind: str | None = None,
    fault_message: str | None = None,
) -> Iterator[pa.Table]:
    """Decode one input into tables of at most `segments_per_table` segments, then its record row.

    `fault_kind` set (an input found bad while listing: a manifest row without an id, a symlink cycle; see
    inputs.InputItem): the input is not opened; only its record row comes, status `error` with that
    `error_kind`, not retryable, and `fault_message` (which names the input and says what to do) as its message.

    Memory stays bounded by a few windows: segments leave as soon as a table is full.

    `attempts` (optional) counts, across processes, the tries of this input that began and never ended: the
    worker process died under them. After `crash_limit` of those the input is not tried again; it becomes an
    `error` row of kind `worker_crash`, so that a file that kills its worker ends the run's retries instead of
    failing the dataset. It is any object with begin(key) -> tries left unfinished before, end(key), and
    skip(key) (this try gave up on the input without reading it: not a death).
    """
    from pipeline.audio import injected, read_segments

    record = {
        "recording_id": recording_id,
        "uri": uri,
        "fingerprint": fingerprint,
        "status": "ok",
        "error_kind": None,
        "retryable": False,
        "error_message": None,
        "truncated": False,
        "warning": None,
        "duration_s": None,
        "sample_rate": None,
        "channels": None,
        "codec": None,
        "segments": 0,
    }
    if fault_kind is not None:
        record.update(
            status="error",
            error_kind=fault_kind,
            retryable=False,
            error_message=fault_message or f"{uri or recording_id}: bad input ({fault_kind})",
            sent=0,
        )
        yield _record_table(recording_id, record)
        return
    died = attempts.begin(recording_id) if attempts is not None else 0
    if died >= crash_limit:
        record.update(
            status="error",
            error_kind="worker_crash",
            error_message=(
                f"{uri}: the worker process died {died} times while reading this input (a crash inside a decoding "
                "library, or memory exhausted); it is recorded as an error so the run can finish. Check the file; "
                "rerun with --retry-errors to try it again"
            ),
            sent=0,
        )
        # not ended, only this try taken back: the count stays at the deaths seen, so a retry of a task that
        # holds more inputs (it died under another one) gives the same verdict instead of reading this one again
        attempts.skip(recording_id)
        yield _record_table(recording_id, record)
        return
    if injected(uri).get("worker_crash"):  # fault injection (tests): die like a worker killed by a bad file
        os._exit(137)
    count = 0
    stream = None
    try:
        stream = read_segments(
            uri,
            sample_rate=sample_rate,
            segments=segments,
            storage_options=storage_options,
            isolate=isolate,
            time_limit_s=time_limit_s,  # isolated: this thread's reused decoder child
        )
        with stream:
            pending = []
            for seg in stream:
                pending.append(seg)
                if len(pending) >= segments_per_table:
                    yield _segment_table(recording_id, pending)
                    count += len(pending)
                    pending = []
            if pending:
                yield _segment_table(recording_id, pending)
                count += len(pending)
    except TooShort as exc:
        record.update(status="too_short", error_kind=None, error_message=str(exc))
    except InputFault as exc:
        record.update(
            status="error", error_kind=exc.kind, retryable=bool(exc.transient), error_message=str(exc)
        )
    except Exception as exc:  # an unexpected fault on one input is still that input's row
        record.update(
            status="error",
            error_kind="internal",
            retryable=False,
            error_message=f"{uri}: unexpected {type(exc).__name__}: {exc}",
        )
    info = getattr(stream, "info", None)
    if info is not None:
        record.update(
            duration_s=info.duration_s,
            sample_rate=info.sample_rate,
            channels=info.channels,
            codec=info.codec,
            truncated=bool(info.truncated),
            warning=info.warning,
        )
    if record["status"] == "ok" and count == 0:  # the stream ended without the too_short signal
        record.update(
            status="too_short", error_message=f"{uri}: no segment of at least {segments.min_segment_s} s"
        )
    # `sent`: segment rows already on their way (the driver waits for them, then drops them when the input
    # failed midway: an error row has no features).
    record["sent"] = count
    record["segments"] = count if record["status"] == "ok" else 0
    if attempts is not None:
        attempts.end(recording_id)
    yield _record_table(recording_id, record)


def work_item(item) -> dict:
    """What a decode task receives for one input (an inputs.InputItem): a plain dict. An item with a fault (a bad
    manifest row, a symlink cycle) reaches the decode stage too: it becomes that input's error row there."""
    return {
        "uri": item.uri,
        "recording_id": item.recording_id,
        "fingerprint": item.fingerprint,
        "fault_kind": item.fault_kind,
        "fault_message": item.fault_message,
    }


def decode_item(item: dict, kwargs: dict) -> Iterator[pa.Table]:
    """Stage function: one input (a dict of uri, recording_id, fingerprint, and optional fault_kind and
    fault_message) -> its decode tables (see decode_input, which takes `kwargs`)."""
    yield from decode_input(
        item["uri"],
        item["recording_id"],
        item["fingerprint"],
        fault_kind=item.get("fault_kind"),
        fault_message=item.get("fault_message"),
        **kwargs,
    )


class EmbedStage:
    """Holds one model replica; turns decode tables into rows with one embedding column per layer."""

    def __init__(
        self,
        model: str,
        *,
        storage_options: dict | None = None,
        cache_dir: str | None = None,
        layers: tuple[int, ...] | None = None,
        granularity: str = "segment",
        device: str = "auto",
        compute_dtype: str = "float32",
        storage_dtype: str = "float32",
        normalize: bool | None = None,
        batch_size: int = 8,
        threads: int | None = None,
        trust_remote_code: bool = False,
        expected_code_hash: str | None = None,
        sink: Callable[[pa.Table], pa.Table] | None = None,
    ):
        """`sink`: where the output goes (the engine's writers); its return value is the stage's output."""
        import torch

        from pipeline.embed import Embedder
        from pipeline.models import load_model

        if threads:
            torch.set_num_threads(threads)
        self.loaded = load_model(
            model,
            storage_options=storage_options,
            cache_dir=cache_dir,
            trust_remote_code=trust_remote_code,
            expected_code_hash=expected_code_hash,
        )
        self.embedder = Embedder(
            self.loaded,
            layers=layers,
            granularity=granularity,
            device=device,
            dtype=compute_dtype,
            out_dtype=storage_dtype,
            normalize=normalize,
        )
        self.granularity = granularity
        self.batch_size = batch_size
        self.sink = sink
        from pipeline.table import embedding_type

        self.emb_type = embedding_type(self.embedder.spec.dim, storage_dtype, granularity)
        self.value_type = pa.float16() if storage_dtype == "float16" else pa.float32()

    def __call__(self, batch: pa.Table) -> pa.Table:
        is_seg = np.asarray(batch.column("record").is_null().to_numpy(zero_copy_only=False))
        seg_idx = np.flatnonzero(is_seg)
        audio = batch.column("audio").combine_chunks()
        offsets = audio.offsets.to_numpy()
        values = audio.values.to_numpy(zero_copy_only=False)
        waves = [values[offsets[i] : offsets[i + 1]] for i in seg_idx]
        outs = self.embedder.embed_segments(waves, batch_size=self.batch_size) if waves else []
        n = batch.num_rows
        n_frames = np.zeros(n, dtype=np.int32)
        per_layer: dict[int, list] = {layer: [None] * n for layer in self.embedder.layers}
        for j, i in enumerate(seg_idx):
            out = outs[j]  # (L, D) or (L, T, D)
            n_frames[i] = self.embedder.frames(len(waves[j]))
            for k, layer in enumerate(self.embedder.layers):
                per_layer[layer][i] = out[k]
        cols = {
            "recording_id": batch.column("recording_id"),
            "segment": batch.column("segment"),
            "start_s": batch.column("start_s"),
            "duration_s": batch.column("duration_s"),
            "n_frames": pa.array(n_frames, pa.int32()),
            "record": batch.column("record"),
        }
        for layer, vecs in per_layer.items():
            cols[layer_column(layer)] = self._arrow(vecs)
        out = pa.table(cols)
        return self.sink(out) if self.sink is not None else out

    def embed_tables(self, *tables: pa.Table) -> pa.Table:
        """One call over several decode tables (they share DECODE_SCHEMA): the engine sends a few at a time."""
        return self(tables[0] if len(tables) == 1 else pa.concat_tables(tables))

    def _arrow(self, vecs: list) -> pa.Array:
        """Per-row arrays (D,) or (T, D), None for record rows -> a (list of) fixed_size_list column."""
        dim = self.embedder.spec.dim
        np_type = np.float16 if self.value_type == pa.float16() else np.float32
        mask = np.array([v is None for v in vecs])
        if self.granularity != "frame":
            flat = np.zeros((len(vecs), dim), dtype=np_type)
            for i, v in enumerate(vecs):
                if v is not None:
                    flat[i] = v
            return pa.FixedSizeListArray.from_arrays(
                pa.array(flat.reshape(-1), self.value_type), dim, mask=pa.array(mask)
            )
        lengths = [0 if v is None else v.shape[0] for v in vecs]
        frames = [v.reshape(-1, dim).astype(np_type, copy=False) for v in vecs if v is not None]
        flat = np.concatenate(frames) if frames else np.zeros((0, dim), np_type)
        inner = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), self.value_type), dim)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        return pa.ListArray.from_arrays(offsets, inner, mask=pa.array(mask))


def cpu_threads_default() -> int:
    return max(1, (os.cpu_count() or 2) - 1)

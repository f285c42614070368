"""More like this: exact nearest recordings by cosine similarity in one layer of a feature table.

The query is a recording of the table (its recording_id, or the uri / local path it was read from), or an audio
file embedded on the fly with the table's own configuration (window, hop, minimum segment, normalization, compute
and storage dtypes): the checkpoint given must have the content hash the table was built with.

The search is exact: the layer's recording vectors (pipeline.probe.recording_vectors, N x D float32) are scored
against the query in blocks of `block` rows (16384: 48 MB of float32 at 768 dims), keeping the k best so far,
so the search holds the vectors plus one block. Past a few million vectors, export the layer and use an ANN index
(FAISS, LanceDB).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc

from pipeline.errors import UsageError
from pipeline.probe import recording_vectors
from pipeline.storage import canonical_uri, scheme_of
from pipeline.table import FeatureTable, weighted_mean


@dataclass
class Neighbor:
    rank: int
    recording_id: str
    similarity: float
    uri: str | None


def _table_lookup(table: FeatureTable) -> tuple[dict[str, str], dict[str, str]]:
    """(key -> recording_id for ok recordings by id, uri and canonical uri; recording_id -> uri)."""
    latest = table.ledger(latest=True)
    ok = latest.filter(pc.equal(latest.column("status"), "ok"))
    lookup: dict[str, str] = {}
    uris: dict[str, str] = {}
    for rid, uri in zip(ok.column("recording_id").to_pylist(), ok.column("uri").to_pylist(), strict=True):
        uris[rid] = uri
        for k in (rid, uri):
            if k:
                lookup.setdefault(k, rid)
                lookup.setdefault(canonical_uri(k), rid)
    return lookup, uris


def embed_query(
    table: FeatureTable,
    audio: str,
    layer: int,
    model: str,
    *,
    storage_options: dict | None = None,
    batch_size: int = 8,
) -> np.ndarray:
    """(D,) float32: `audio` embedded with the table's configuration, `layer`'s frame-weighted mean over its
    segments (what the table's recording vectors are). Refuses a checkpoint whose content hash is not the
    table's."""
    from pipeline.audio import read_segments
    from pipeline.config import SegmentConfig
    from pipeline.embed import Embedder
    from pipeline.errors import InputFault, TooShort
    from pipeline.models import load_model

    meta = table.read_meta()
    if meta is None:
        raise UsageError(f"{table.root} is not a feature table (no commit log)")
    cfg = meta["config"]
    loaded = load_model(model)
    if loaded.content_hash != cfg.get("model_content_hash"):
        raise UsageError(
            f"the checkpoint {model} (content {loaded.content_hash[:16]}) is not the one {table.root} was built "
            f"with (content {str(cfg.get('model_content_hash'))[:16]}); give that checkpoint with --model, or "
            "query by recording id"
        )
    compute = cfg.get("compute_dtype", "float32")
    import torch

    if compute != "float32" and not torch.cuda.is_available():
        raise UsageError(
            f"{table.root} was computed in {compute}, which needs a GPU; this machine has none, so a query "
            "embedded here would not match the table: query by recording id, or run this on a GPU"
        )
    emb = Embedder(
        loaded,
        layers=[layer],
        granularity="segment",
        dtype=compute,
        out_dtype=cfg.get("storage_dtype", "float32"),
        normalize=bool(cfg.get("normalize")),
    )
    seg_cfg = SegmentConfig(
        window_s=float(cfg["window_s"]), hop_s=float(cfg["hop_s"]), min_segment_s=float(cfg["min_segment_s"])
    )
    try:
        stream = read_segments(
            audio,
            sample_rate=loaded.spec.sample_rate,
            segments=seg_cfg,
            storage_options=storage_options,
            isolate=False,
        )
        with stream:
            waves = [s.samples for s in stream]
    except TooShort as exc:
        raise UsageError(f"query {audio}: {exc}") from None
    except InputFault as exc:
        raise UsageError(f"cannot read the query {audio}: {exc}") from None
    outs = emb.embed_segments(waves, batch_size=batch_size)  # each (1, D)
    vecs = np.stack([o[0].astype(np.float32) for o in outs])
    frames = np.array([emb.frames(len(w)) for w in waves], dtype=np.float64)
    return weighted_mean(vecs, frames).astype(np.float32)


def search(
    vectors: np.ndarray, query: np.ndarray, k: int, block: int = 16384, prefer: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by cosine similarity of (N, D) `vectors` to (D,) `query`, scored in blocks of `block` rows.
    Returns (indices, similarities), best first; `prefer` (the query's own row, similarity 1 by definition)
    comes first whatever rounding says, and ties go to lower indices."""
    if k < 1:
        raise ValueError(f"k={k}: must be at least 1")
    if block < 1:
        raise ValueError(f"block={block}: must be at least 1")
    q = query.astype(np.float32)
    q = q / max(float(np.linalg.norm(q)), 1e-12)
    best_i = np.zeros(0, dtype=np.int64)
    best_s = np.zeros(0, dtype=np.float32)
    for start in range(0, len(vectors), block):
        x = np.asarray(vectors[start : start + block], dtype=np.float32)  # (b, D)
        s = (x @ q) / np.maximum(np.linalg.norm(x, axis=1), 1e-12)  # (b,) cosine similarities
        take = np.argsort(-s, kind="stable")[:k]
        best_i = np.r_[best_i, start + take]
        best_s = np.r_[best_s, s[take]]
        keep = np.lexsort((best_i, -best_s, best_i != (prefer if prefer is not None else -1)))[:k]
        best_i, best_s = best_i[keep], best_s[keep]
    return best_i, best_s


def neighbors(
    table_uri: str,
    query: str,
    layer: int,
    k: int = 10,
    *,
    model: str | None = None,
    storage_options: dict | None = None,
    block: int = 16384,
) -> tuple[dict, list[Neighbor]]:
    """The k recordings of `layer` nearest to `query` by cosine similarity. Returns (what was asked: query kind,
    the recording it resolved to, layer, table size; the neighbors, best first)."""
    table = FeatureTable(table_uri, storage_options)
    meta = table.read_meta()
    if meta is None:
        raise UsageError(f"{table_uri} is not a feature table (no commit log): give the table's root folder")
    if layer not in table.layers():
        raise UsageError(f"{table_uri} has no layer {layer}; it holds layers {table.layers()}")
    lookup, uris = _table_lookup(table)
    ids, vectors = recording_vectors(table, layer)
    rid = lookup.get(query) or (lookup.get(canonical_uri(query)) if scheme_of(query) == "file" else None)
    own = None
    if rid is not None:
        kind = "recording"
        own = ids.index(rid)
        q = vectors[own]
    else:
        local = scheme_of(query) == "file"
        if local and not os.path.exists(query[len("file://") :] if query.startswith("file://") else query):
            raise UsageError(
                f"query {query} is neither a recording of {table_uri} (by recording_id or uri) nor an audio file "
                "that exists: give a recording id (see `mert-pipeline read`) or an audio file"
            )
        if model is None:
            raise UsageError(
                f"query {query} is not a recording of {table_uri}: to embed it on the fly give the table's "
                "checkpoint with --model (it must have the table's content hash)"
            )
        kind = "audio"
        q = embed_query(table, query, layer, model, storage_options=storage_options)
    idx, sims = search(vectors, q, min(k, len(ids)), block=block, prefer=own)
    found = [
        Neighbor(r + 1, ids[i], float(s), uris.get(ids[i]))
        for r, (i, s) in enumerate(zip(idx.tolist(), sims.tolist(), strict=True))
    ]
    info = {
        "table": table.root,
        "query": query,
        "query_kind": kind,
        "query_recording": rid,
        "layer": layer,
        "recordings": len(ids),
        "model": (meta.get("provenance") or {}).get("model"),
    }
    return info, found

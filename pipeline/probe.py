"""Which layer? Linear probes over a feature table: one per layer, the model card's learnable layer weighting,
and a shuffled-label control for each, scored on held-out recordings.

- `read_labels`: a CSV or Parquet labels file (`recording_id` or `uri`, `label`, optional `split`) matched to the
  table's `ok` recordings. `a|b|c` in a label makes the task multi-label.
- `recording_vectors`: one layer's recording vectors, (N, D) float32: the stored vector at recording granularity,
  else the frame-weighted mean of the recording's segments (or of all its frames).
- `plan_splits`: the given train / valid / test split, or k folds by recording (test = fold i, valid = fold i+1,
  train = the rest). Probes see train rows only; valid chooses the weight decay; test reports.
- metrics in numpy: `accuracy`, `macro_f1`, `roc_auc`, `average_precision`.
- `run_probe`: reads one layer at a time (a per-layer probe each, full-batch L-BFGS), keeps the recording vectors
  in an on-disk (N, L, D) float32 stack, then trains the layer weighting (softmax weights over the layers and a
  linear head, together, with Adam) on minibatches of recordings streamed from that stack within
  `ProbeConfig.memory_mb`. Writes DIR/report.json, DIR/report.png, DIR/report.html (pipeline.report) and
  DIR/splits.csv.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import __version__
from pipeline.errors import UsageError
from pipeline.storage import canonical_uri, get_fs
from pipeline.table import FeatureTable

SPLITS = {
    "train": "train",
    "valid": "valid",
    "validation": "valid",
    "val": "valid",
    "dev": "valid",
    "test": "test",
}


# ---- configuration -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeConfig:
    """How the probes are trained. Defaults suit a few thousand recordings on a CPU."""

    weight_decays: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # L2 on the head, chosen on valid
    folds: int = 5  # k-fold by recording when the labels have no split
    seed: int = 0  # folds, the control's permutations, minibatch order
    control_repeats: int = 3  # shuffled-label controls averaged (fewer: faster, noisier)
    max_iter: int = 100  # L-BFGS iterations per per-layer fit
    epochs: int = 150  # layer weighting: passes over the train split
    lr: float = 0.05  # layer weighting: Adam's learning rate
    memory_mb: float = 512.0  # layer weighting: the minibatch of recordings x layers x dims held at once
    device: str = "auto"  # "auto" = cuda when available, else cpu
    threads: int | None = (
        None  # torch CPU threads; None = 1 for small problems (< 1M values a layer), else torch's
    )
    layers: tuple[int, ...] | None = None  # hidden states to probe; None = all the table holds

    def __post_init__(self) -> None:
        if not self.weight_decays or any(
            not isinstance(w, (int, float)) or w < 0 or not math.isfinite(w) for w in self.weight_decays
        ):
            raise ValueError(f"weight_decays={self.weight_decays!r}: give one or more finite values >= 0")
        if not isinstance(self.folds, int) or self.folds < 3:
            raise ValueError(f"folds={self.folds!r}: at least 3 (test, valid and train folds)")
        if not isinstance(self.control_repeats, int) or self.control_repeats < 1:
            raise ValueError(f"control_repeats={self.control_repeats!r}: at least 1")
        for name in ("max_iter", "epochs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: a positive integer")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr={self.lr!r}: a positive number")
        if not (isinstance(self.memory_mb, (int, float)) and self.memory_mb > 0):
            raise ValueError(f"memory_mb={self.memory_mb!r}: a positive number of MB")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads={self.threads!r}: a positive integer, or None")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device={self.device!r}: auto, cpu, cuda or cuda:N")


# ---- labels ------------------------------------------------------------------------------------------------
@dataclass
class Labels:
    """Labels matched to a table: ids[i] has tags[i] (one tag unless multi-label) and split[i] (or None)."""

    source: str
    ids: list[str]
    tags: list[tuple[str, ...]]
    split: list[str] | None
    classes: list[str]
    multi_label: bool
    rows: int  # rows in the labels file
    unmatched: list[str] = field(default_factory=list)  # keys that match no `ok` recording of the table

    def targets(self) -> np.ndarray:
        """(N,) int class indices, or (N, C) float 0/1 for multi-label."""
        index = {c: i for i, c in enumerate(self.classes)}
        if not self.multi_label:
            return np.array([index[t[0]] for t in self.tags], dtype=np.int64)
        y = np.zeros((len(self.tags), len(self.classes)), dtype=np.float32)
        for i, t in enumerate(self.tags):
            y[i, [index[c] for c in t]] = 1.0
        return y


def _read_label_table(path: str, storage_options: dict | None) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        fs, p = get_fs(path, storage_options)
        with fs.open(p, "rb") as f:
            if path.lower().endswith((".parquet", ".pq")):
                return pq.read_table(f)
            names = ("recording_id", "uri", "label", "split")
            return pacsv.read_csv(
                f,
                # one thread: a CSV reader thread still alive at interpreter exit aborts the process
                read_options=pacsv.ReadOptions(use_threads=False),
                convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}),
            )
    except FileNotFoundError:
        raise UsageError(f"labels file {path} does not exist: check the path") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise UsageError(
            f"cannot read the labels file {path}: {type(exc).__name__}: {exc}; give a CSV or Parquet file with "
            "columns recording_id (or uri), label and optionally split"
        ) from None


def read_labels(path: str, table: FeatureTable, storage_options: dict | None = None) -> Labels:
    """Read a labels file and match its rows to the table's `ok` recordings (by recording_id, else by uri; a
    local path matches its file:// URI). Raises UsageError (exit 2) for missing columns, empty or conflicting labels,
    unknown split names, no match at all, or a single class."""
    t = _read_label_table(path, storage_options)
    cols = set(t.column_names)
    key = "recording_id" if "recording_id" in cols else "uri" if "uri" in cols else None
    if key is None or "label" not in cols:
        missing = (["recording_id (or uri)"] if key is None else []) + (
            ["label"] if "label" not in cols else []
        )
        raise UsageError(
            f"labels file {path} lacks the column(s) {', '.join(missing)}; it has {sorted(cols) or 'none'}. "
            "Give recording_id (the table's id, see `mert-pipeline read`) or uri, and label (tags separated by "
            "'|' for multi-label), and optionally split (train, valid, test)"
        )
    keys = [None if v is None else str(v) for v in t.column(key).to_pylist()]
    raw = t.column("label").cast(pa.string()).to_pylist()
    splits = t.column("split").cast(pa.string()).to_pylist() if "split" in cols else None

    latest = table.ledger(latest=True)
    ok = latest.filter(pc.equal(latest.column("status"), "ok"))
    lookup: dict[str, str] = {}
    for rid, uri in zip(ok.column("recording_id").to_pylist(), ok.column("uri").to_pylist(), strict=True):
        for k in (rid, uri):
            if k:
                lookup.setdefault(k, rid)
                lookup.setdefault(canonical_uri(k), rid)

    multi = any(v is not None and "|" in str(v) for v in raw)
    seen: dict[str, int] = {}
    ids: list[str] = []
    tags: list[tuple[str, ...]] = []
    split_out: list[str] = []
    unmatched: list[str] = []
    for row, (k, v) in enumerate(zip(keys, raw, strict=True)):
        tag = tuple(sorted({s.strip() for s in str(v).split("|") if s.strip()})) if v is not None else ()
        if not k or not tag:
            raise UsageError(
                f"labels file {path}, row {row + 2}: empty {key if not k else 'label'}; every row needs "
                f"{key} and label"
            )
        sp = None
        if splits is not None:
            name = (splits[row] or "").strip().lower()
            if name not in SPLITS:
                raise UsageError(
                    f"labels file {path}, row {row + 2}: split {splits[row]!r} is not one of train, valid, test"
                )
            sp = SPLITS[name]
        rid = lookup.get(k) or lookup.get(canonical_uri(k))
        if rid is None:
            unmatched.append(k)
            continue
        if rid in seen:
            j = seen[rid]
            if tags[j] != tag or (sp is not None and split_out[j] != sp):
                raise UsageError(
                    f"labels file {path}: {k} appears twice with different labels or splits "
                    f"({'|'.join(tags[j])} vs {'|'.join(tag)}); give one row per recording"
                )
            continue
        seen[rid] = len(ids)
        ids.append(rid)
        tags.append(tag)
        if sp is not None:
            split_out.append(sp)
    if not ids:
        example = sorted(lookup)[:1]
        raise UsageError(
            f"labels file {path}: none of its {len(keys)} {key}s matches a recording of {table.root} "
            f"(e.g. {keys[0]!r}; the table has ids like {example[0] if example else 'none: it holds no ok recording'}"
            f"). Use the table's recording_id or the uri it was read from"
        )
    classes = sorted({c for t_ in tags for c in t_})
    if len(set(tags)) < 2:
        raise UsageError(
            f"labels file {path}: every matched recording ({len(ids)}) has the label {'|'.join(tags[0])!r}; a "
            "probe needs at least two classes"
        )
    return Labels(
        path, ids, tags, split_out if splits is not None else None, classes, multi, len(keys), unmatched
    )


# ---- features ----------------------------------------------------------------------------------------------
ROWS_PER_CHUNK = 16384  # rows (or frames) converted to float64 at a time when pooling a layer


def _pool(values: np.ndarray, group: np.ndarray, weights: np.ndarray, groups: int) -> np.ndarray:
    """(groups, D) float64 weighted means of (R, D) `values` rows by `group` (R,) ids in [0, groups), with
    (R,) `weights`. Rows are taken in group order, ROWS_PER_CHUNK at a time: beyond the input, memory is the
    (groups, D) result and one chunk."""
    dim = values.shape[1]
    total = np.zeros((groups, dim))
    order = np.argsort(group, kind="stable")
    for s in range(0, len(order), ROWS_PER_CHUNK):
        o = order[s : s + ROWS_PER_CHUNK]
        g = group[o]
        starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
        part = np.add.reduceat(values[o].astype(np.float64) * weights[o, None], starts, axis=0)
        total[g[starts]] += part  # each group once per chunk
    wsum = np.bincount(group, weights=weights, minlength=groups)
    return total / np.maximum(wsum, 1e-12)[:, None]


def recording_vectors(
    table: FeatureTable, layer: int, ids: Sequence[str] | None = None
) -> tuple[list[str], np.ndarray]:
    """One layer's recording vectors: (ids, (N, D) float32), in the order of `ids` (default: every recording,
    sorted). Recording granularity: the stored vector; segment: the mean of the segments weighted by their frame
    counts; frame: the mean of all the recording's frames (the same thing). Holds one layer's rows (as read,
    float32 or float16), the (N, D) result and a chunk of ROWS_PER_CHUNK rows in float64."""
    meta = table.read_meta()
    if meta is None:
        raise UsageError(f"{table.root} is not a feature table (no commit log)")
    dim, granularity = int(meta["dim"]), meta["config"]["granularity"]
    t = table.read_layer(layer, ["recording_id", "n_frames", "embedding"])
    rid = np.asarray(t.column("recording_id").to_numpy(zero_copy_only=False)).astype(object)
    uniq, inverse = (
        np.unique(rid, return_inverse=True) if len(rid) else (np.array([], object), np.array([], np.int64))
    )
    if not t.num_rows:
        vectors = np.zeros((0, dim), np.float32)
    else:
        emb = t.column("embedding").combine_chunks()
        if granularity == "frame":  # every frame a row of weight 1, in its recording's group
            counts = pc.list_value_length(emb).to_numpy(zero_copy_only=False).astype(np.int64)
            values = emb.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
            group, weights = np.repeat(inverse, counts), np.ones(len(values))
        else:
            values = emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
            group = inverse
            if granularity == "recording":
                weights = np.ones(len(values))
            else:
                nf = t.column("n_frames").to_numpy(zero_copy_only=False).astype(np.float64)
                weights = np.where(np.isnan(nf), 1.0, nf)
        vectors = _pool(values, group, weights, len(uniq)).astype(np.float32)
    where = {r: i for i, r in enumerate(uniq.tolist())}
    if ids is None:
        return [str(r) for r in uniq.tolist()], vectors
    missing = [r for r in ids if r not in where]
    if missing:
        raise UsageError(
            f"{table.root} layer {layer}: no rows for {len(missing)} recording(s) the ledger has as ok "
            f"(e.g. {missing[0]}); run `mert-pipeline vacuum` or rerun the table's job"
        )
    return list(ids), vectors[[where[r] for r in ids]]


# ---- splits ------------------------------------------------------------------------------------------------
@dataclass
class Fold:
    train: np.ndarray  # indices into Labels.ids
    valid: np.ndarray
    test: np.ndarray


def plan_splits(
    n: int, strata: np.ndarray | None, given: Sequence[str] | None, folds: int = 5, seed: int = 0
) -> tuple[str, list[Fold]]:
    """("given", [one Fold]) from split names, or ("k-fold", k Folds) by recording: fold i is the test set, fold
    i+1 the valid set, the rest train; folds are stratified by `strata` (class index) when given. A given split
    without valid rows takes a stratified fifth of train as valid. Every recording is in one role per fold."""
    rng = np.random.default_rng(seed)

    def spread(idx: np.ndarray, k: int) -> np.ndarray:
        """A fold number for each of idx, class by class, so that folds are balanced."""
        out = np.empty(len(idx), dtype=np.int64)
        groups = [idx] if strata is None else [idx[strata[idx] == c] for c in np.unique(strata[idx])]
        pos = 0
        where = {int(j): i for i, j in enumerate(idx)}
        for g in groups:
            for j in rng.permutation(g):
                out[where[int(j)]] = pos % k
                pos += 1
        return out

    if given is not None:
        names = np.asarray(given)
        train, valid, test = (np.flatnonzero(names == s) for s in ("train", "valid", "test"))
        if len(train) == 0 or len(test) == 0:
            raise UsageError(
                f"the split gives {len(train)} train and {len(test)} test recordings: both must be non-empty"
            )
        if len(valid) == 0:
            f = spread(train, 5)
            valid, train = train[f == 0], train[f != 0]
        return "given", [Fold(np.sort(train), np.sort(valid), np.sort(test))]
    if n < 2 * folds:
        raise UsageError(
            f"{n} labelled recordings are too few for {folds}-fold probing (at least {2 * folds}); label more "
            "recordings or lower --folds"
        )
    f = spread(np.arange(n), folds)
    plan = []
    for i in range(folds):
        test, valid = np.flatnonzero(f == i), np.flatnonzero(f == (i + 1) % folds)
        train = np.flatnonzero((f != i) & (f != (i + 1) % folds))
        plan.append(Fold(train, valid, test))
    return "k-fold", plan


# ---- metrics (numpy) ---------------------------------------------------------------------------------------
def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Single-label: the fraction right. Multi-label ((N, C) 0/1): the fraction of rows with every tag right."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.ndim == 2:
        return float(np.mean(np.all(t.astype(bool) == p.astype(bool), axis=1)))
    return float(np.mean(t == p))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The mean over classes of 2TP / (2TP + FP + FN), over the classes that occur in y_true or y_pred.
    Single-label: (N,) class indices; multi-label: (N, C) 0/1, one class per column."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.ndim == 1:
        classes = np.union1d(t, p)
        t = (t[:, None] == classes[None, :]).astype(bool)
        p = (p[:, None] == classes[None, :]).astype(bool)
    t, p = t.astype(bool), p.astype(bool)
    tp = (t & p).sum(0)
    denom = 2 * tp + (p & ~t).sum(0) + (t & ~p).sum(0)
    used = denom > 0
    return float(np.mean(2 * tp[used] / denom[used])) if used.any() else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties averaged."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Macro ROC-AUC over the columns of (N, C) 0/1 y_true with both classes present (Mann-Whitney, ties
    counted half). A 1-D y_true is one column. NaN when no column has both classes."""
    t, s = np.atleast_2d(np.asarray(y_true).T).T, np.atleast_2d(np.asarray(scores, dtype=np.float64).T).T
    out = []
    for c in range(t.shape[1]):
        pos = t[:, c].astype(bool)
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos and n_neg:
            r = _ranks(s[:, c])
            out.append((r[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(out)) if out else float("nan")


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Macro average precision over the columns with a positive: sum over score thresholds (ties grouped) of
    (R_k - R_{k-1}) P_k, as scikit-learn defines it. NaN when no column has a positive."""
    t, s = np.atleast_2d(np.asarray(y_true).T).T, np.atleast_2d(np.asarray(scores, dtype=np.float64).T).T
    out = []
    for c in range(t.shape[1]):
        pos = t[:, c].astype(bool)
        if not pos.any():
            continue
        order = np.argsort(-s[:, c], kind="mergesort")
        sc, hit = s[order, c], pos[order]
        last = np.r_[np.flatnonzero(np.diff(sc) != 0), len(sc) - 1]  # the last index of each distinct score
        tp = np.cumsum(hit)[last]
        precision = tp / (last + 1)
        recall = tp / pos.sum()
        out.append(float(np.sum(np.diff(np.r_[0.0, recall]) * precision)))
    return float(np.mean(out)) if out else float("nan")


def score(y_true: np.ndarray, probs: np.ndarray, multi_label: bool) -> dict[str, float]:
    """accuracy and macro_f1 (and roc_auc, average_precision for multi-label) of (N, C) probabilities."""
    if not multi_label:
        pred = np.argmax(probs, axis=1)
        return {"accuracy": accuracy(y_true, pred), "macro_f1": macro_f1(y_true, pred)}
    pred = (probs >= 0.5).astype(np.int64)
    return {
        "accuracy": accuracy(y_true, pred),
        "macro_f1": macro_f1(y_true, pred),
        "roc_auc": roc_auc(y_true, probs),
        "average_precision": average_precision(y_true, probs),
    }


def chance(y_train: np.ndarray, y_test: np.ndarray, multi_label: bool) -> dict[str, float]:
    """The expected scores of guessing at random with the train split's class frequencies (single-label), or of
    tagging each tag independently at its train frequency (multi-label: macro-F1 only)."""
    if multi_label:
        q, p = np.asarray(y_train).mean(0), np.asarray(y_test).mean(0)
        used = (p + q) > 0
        return {"macro_f1": float(np.mean(2 * p[used] * q[used] / (p[used] + q[used])))}
    classes = np.union1d(y_train, y_test)
    q = np.array([np.mean(y_train == c) for c in classes])
    p = np.array([np.mean(y_test == c) for c in classes])
    used = (p + q) > 0
    return {
        "accuracy": float(np.sum(p * q)),
        "macro_f1": float(np.mean(2 * p[used] * q[used] / (p[used] + q[used]))),
    }


# ---- training (torch) --------------------------------------------------------------------------------------
def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(
            f"device {name!r} asked for, but CUDA is not available here: use --device cpu or auto"
        )
    return torch.device(name)


def _loss(logits, y, multi_label: bool):
    import torch.nn.functional as F

    return F.binary_cross_entropy_with_logits(logits, y) if multi_label else F.cross_entropy(logits, y)


def _probs(logits, multi_label: bool) -> np.ndarray:
    return (logits.sigmoid() if multi_label else logits.softmax(dim=1)).detach().cpu().double().numpy()


def fit_linear(x, y, num_classes: int, multi_label: bool, weight_decay: float, max_iter: int = 100):
    """A linear head on (n, D) standardized features, full-batch L-BFGS from zeros (deterministic): minimizes
    the mean cross-entropy (BCE for multi-label) + weight_decay * ||W||^2. Returns (W (D, C), b (C,))."""
    import torch

    w = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _loss(x @ w + b, y, multi_label) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


class _Stack:
    """The (N, L, D) float32 recording vectors of every probed layer, on disk (a memmap), filled a layer at a
    time and read back in minibatches of recordings."""

    def __init__(self, path: str, n: int, layers: int, dim: int):
        self.path = path
        self.array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, layers, dim))

    def close(self) -> None:
        del self.array
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass


def _batch_rows(memory_mb: float, layers: int, dim: int) -> int:
    """Recordings per minibatch of the layer weighting: the batch, its standardized copy and the weighted sum's
    gradient (about 3 copies of B x L x D float32) fit in memory_mb."""
    return max(1, int(memory_mb * (1 << 20) // (3 * 4 * layers * dim)))


def fit_weighting(
    stack: np.ndarray,
    idx: np.ndarray,
    y: np.ndarray,
    mean,
    std,
    num_classes: int,
    multi_label: bool,
    weight_decay: float,
    cfg: ProbeConfig,
    device,
    seed: int,
    stats: dict[str, int] | None = None,
):
    """The model card's layer weighting: softmax(a) over L layers, the weighted sum of the standardized layers,
    then a linear head, trained together with Adam on minibatches of `idx`'s recordings read from `stack`
    ((N, L, D), a memmap). mean, std: (L, D) tensors from the train rows. Returns (a, W, b); `stats` (optional)
    gets `largest_batch`, the most recordings held at once."""
    import torch

    L, D = stack.shape[1], stack.shape[2]
    a = torch.zeros(L, device=device, requires_grad=True)
    w = torch.zeros(D, num_classes, device=device, requires_grad=True)
    b = torch.zeros(num_classes, device=device, requires_grad=True)
    opt = torch.optim.Adam([a, w, b], lr=cfg.lr)
    bs = _batch_rows(cfg.memory_mb, L, D)
    gen = np.random.default_rng(seed)
    yt = torch.as_tensor(y, device=device)  # aligned with idx
    whole = None
    if len(idx) <= bs:  # the whole train split fits the budget: read it once
        whole = ((torch.as_tensor(stack[idx], device=device) - mean) / std, yt)
    for _ in range(cfg.epochs):
        batches = (
            [whole]
            if whole is not None
            else _stream(stack, idx, gen.permutation(len(idx)), bs, yt, mean, std)
        )
        for xb, yb in batches:
            if stats is not None:  # what the memory limit allowed, as it happened
                stats["largest_batch"] = max(stats.get("largest_batch", 0), int(xb.shape[0]))
            opt.zero_grad()
            h = (xb * torch.softmax(a, 0)[None, :, None]).sum(1)  # (B, D)
            loss = _loss(h @ w + b, yb, multi_label) + weight_decay * (w * w).sum()
            loss.backward()
            opt.step()
    return a.detach(), w.detach(), b.detach()


def _stream(stack, idx, perm, bs, yt, mean, std):
    """Minibatches (x (B, L, D) standardized, y) of idx[perm], read from the memmap one batch at a time."""
    import torch

    for s in range(0, len(idx), bs):
        sel = np.sort(perm[s : s + bs])  # sorted: the memmap reads forward
        xb = (torch.as_tensor(stack[idx[sel]], device=mean.device) - mean) / std  # (B, L, D)
        yield xb, yt[torch.as_tensor(sel, device=mean.device)]


def predict_weighting(stack: np.ndarray, idx: np.ndarray, a, w, b, mean, std, multi_label: bool, bs: int):
    """(len(idx), C) probabilities of the layer weighting, streamed in batches of bs recordings."""
    import torch

    out = []
    with torch.no_grad():
        for s in range(0, len(idx), bs):
            xb = (torch.as_tensor(stack[idx[s : s + bs]], device=a.device) - mean) / std
            h = (xb * torch.softmax(a, 0)[None, :, None]).sum(1)
            out.append(_probs(h @ w + b, multi_label))
    return np.concatenate(out) if out else np.zeros((0, w.shape[1]))


# ---- the job -----------------------------------------------------------------------------------------------
def _standardizer(x: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over the rows idx (the train split): (..., D) each."""
    mean = x[idx].mean(axis=0)
    std = x[idx].std(axis=0) + 1e-6
    return mean, std


def _select(fits: Sequence[tuple[float, dict[str, float], Any]]) -> tuple[float, Any]:
    """The fit with the best valid macro-F1; ties go to the stronger weight decay (the simpler head)."""
    best = max(fits, key=lambda f: (f[1]["macro_f1"], f[0]))
    return best[0], best[2]


def _select_linear(x_train, y_train, x_valid, y_valid: np.ndarray, C: int, multi: bool, cfg: ProbeConfig):
    """Fit a linear head for every weight decay on the train rows; keep the best on valid: (wd, (W, b))."""
    fits = []
    for wd in cfg.weight_decays:
        w, b = fit_linear(x_train, y_train, C, multi, wd, cfg.max_iter)
        fits.append((wd, score(y_valid, _probs(x_valid @ w + b, multi), multi), (w, b)))
    return _select(fits)


def _select_weighting(
    arr: np.ndarray,
    f: Fold,
    y_train,
    y_valid,
    mean,
    std,
    C: int,
    multi: bool,
    cfg: ProbeConfig,
    k: int,
    stats: dict[str, int],
):
    """Fit the layer weighting for every weight decay on fold f's train rows; keep the best on valid:
    (wd, (a, W, b))."""
    bs = _batch_rows(cfg.memory_mb, arr.shape[1], arr.shape[2])
    fits = []
    for wd in cfg.weight_decays:
        a, w, b = fit_weighting(
            arr, f.train, y_train, mean, std, C, multi, wd, cfg, mean.device, cfg.seed + k, stats
        )
        probs = predict_weighting(arr, f.valid, a, w, b, mean, std, multi, bs)
        fits.append((wd, score(y_valid, probs, multi), (a, w, b)))
    return _select(fits)


class _Pooled:
    """Test probabilities gathered over folds (each recording is a test recording once)."""

    def __init__(self, n: int, classes: int):
        self.probs = np.full((n, classes), np.nan)

    def put(self, idx: np.ndarray, probs: np.ndarray) -> None:
        self.probs[idx] = probs

    def scores(self, y: np.ndarray, multi: bool) -> dict[str, float]:
        done = ~np.isnan(self.probs[:, 0])
        return score(y[done], self.probs[done], multi)


def _mean_scores(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}


def run_probe(
    table_uri: str,
    labels_path: str,
    out_dir: str,
    cfg: ProbeConfig | None = None,
    *,
    storage_options: dict | None = None,
    note: str | None = None,
    log=None,
) -> dict:
    """Probe every layer of the table at `table_uri` with the labels at `labels_path`; write the report into
    `out_dir` (report.json, report.png, report.html, splits.csv) and return the report dict."""
    import torch

    from pipeline.report import write_report

    cfg = cfg or ProbeConfig()
    log = log or (lambda m: None)
    started = time.time()
    table = FeatureTable(table_uri, storage_options)
    meta = table.read_meta()
    if meta is None:
        raise UsageError(f"{table_uri} is not a feature table (no commit log): give the table's root folder")
    held = table.layers()
    layers = list(cfg.layers) if cfg.layers is not None else held
    absent = [i for i in layers if i not in held]
    if absent or not layers:
        raise UsageError(f"{table_uri} has no layer(s) {absent or layers}; it holds layers {held}")
    labels = read_labels(labels_path, table, storage_options)
    y = labels.targets()
    multi = labels.multi_label
    C = len(labels.classes)
    strata = None if multi else y
    scheme, folds = plan_splits(len(labels.ids), strata, labels.split, cfg.folds, cfg.seed)
    for k, f in enumerate(folds):
        present = np.unique(y[f.train]) if not multi else np.flatnonzero(y[f.train].sum(0))
        if len(present) < 2:
            raise UsageError(
                f"fold {k}: the train split holds a single class ({labels.classes[int(present[0])]}); a probe "
                "needs at least two: label more recordings of the other classes"
            )
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    dim = int(meta["dim"])
    threads_before = torch.get_num_threads()
    # tiny matrices: one thread (more only spin, and on a shared machine cost 50x); big ones: torch's default
    torch.set_num_threads(cfg.threads or (1 if len(labels.ids) * dim < 1_000_000 else threads_before))
    os.makedirs(out_dir, exist_ok=True)
    stack = _Stack(os.path.join(out_dir, ".probe-stack.npy"), len(labels.ids), len(layers), dim)
    n = len(labels.ids)
    perms = [
        [
            np.random.default_rng(cfg.seed + 1 + r + 1000 * k).permutation(len(f.train))
            for k, f in enumerate(folds)
        ]
        for r in range(cfg.control_repeats)
    ]
    tensor_y = torch.as_tensor(y, device=device)
    per_layer: list[dict] = []
    try:
        for li, layer in enumerate(layers):
            _, x = recording_vectors(table, layer, labels.ids)  # (N, D): one layer in memory
            stack.array[:, li, :] = x
            real, controls = _Pooled(n, C), [_Pooled(n, C) for _ in range(cfg.control_repeats)]
            decays = []
            for k, f in enumerate(folds):
                mean, std = _standardizer(x, f.train)
                xt = torch.as_tensor((x - mean) / std, device=device)
                tr, va, te = (torch.as_tensor(i, device=device) for i in (f.train, f.valid, f.test))

                wd, (w, b) = _select_linear(xt[tr], tensor_y[tr], xt[va], y[f.valid], C, multi, cfg)
                decays.append(wd)
                real.put(f.test, _probs(xt[te] @ w + b, multi))
                for r in range(cfg.control_repeats):
                    shuffled = tensor_y[tr][torch.as_tensor(perms[r][k], device=device)]
                    _, (w, b) = _select_linear(xt[tr], shuffled, xt[va], y[f.valid], C, multi, cfg)
                    controls[r].put(f.test, _probs(xt[te] @ w + b, multi))
            entry: dict[str, Any] = {
                "layer": layer,
                "scores": real.scores(y, multi),
                "control": _mean_scores([c.scores(y, multi) for c in controls]),
                "weight_decay": decays,
            }
            per_layer.append(entry)
            log(
                f"layer {layer}: macro-F1 {entry['scores']['macro_f1']:.3f} "
                f"(control {entry['control']['macro_f1']:.3f})"
            )

        # the layer weighting: minibatches of recordings across all layers, streamed from the stack
        arr = stack.array
        bs = _batch_rows(cfg.memory_mb, len(layers), dim)
        real, controls = _Pooled(n, C), [_Pooled(n, C) for _ in range(cfg.control_repeats)]
        weights, decays = [], []
        stats: dict[str, int] = {}
        for k, f in enumerate(folds):
            mean_np, std_np = _weighting_standardizer(arr, f.train, bs)
            mu, sd = torch.as_tensor(mean_np, device=device), torch.as_tensor(std_np, device=device)  # (L, D)
            wd, (a, w, b) = _select_weighting(arr, f, y[f.train], y[f.valid], mu, sd, C, multi, cfg, k, stats)
            decays.append(wd)
            weights.append(torch.softmax(a, 0).double().cpu().numpy())
            real.put(f.test, predict_weighting(arr, f.test, a, w, b, mu, sd, multi, bs))
            for r in range(cfg.control_repeats):
                ys = y[f.train][perms[r][k]]
                _, (a, w, b) = _select_weighting(arr, f, ys, y[f.valid], mu, sd, C, multi, cfg, k, stats)
                controls[r].put(f.test, predict_weighting(arr, f.test, a, w, b, mu, sd, multi, bs))
        weighted: dict[str, Any] = {
            "scores": real.scores(y, multi),
            "control": _mean_scores([c.scores(y, multi) for c in controls]),
            "weight_decay": decays,
        }
        log(
            f"layer weighting: macro-F1 {weighted['scores']['macro_f1']:.3f} "
            f"(control {weighted['control']['macro_f1']:.3f})"
        )
    finally:
        stack.close()
        torch.set_num_threads(threads_before)

    mean_w = np.mean(weights, axis=0)
    mean_w = mean_w / mean_w.sum()
    best = max(per_layer, key=lambda e: (e["scores"]["macro_f1"], -e["layer"]))
    train_y = y[folds[0].train] if scheme == "given" else y
    test_y = y[folds[0].test] if scheme == "given" else y
    prov = meta.get("provenance") or {}
    report = {
        "table": table.root,
        "model": {
            "name": prov.get("model"),
            "hub_id": prov.get("hub_id"),
            "revision": prov.get("revision"),
            "content_hash": meta["config"].get("model_content_hash"),
            "source": prov.get("model_source"),
        },
        "config_hash": meta.get("config_hash"),
        "granularity": meta["config"]["granularity"],
        "labels": labels_path,
        "task": "multi_label" if multi else "single_label",
        "classes": labels.classes,
        "recordings": {
            "label_rows": labels.rows,
            "matched": n,
            "unmatched": len(labels.unmatched),
            "unmatched_examples": labels.unmatched[:5],
            "split": scheme,
            "folds": len(folds),
            "train": [len(f.train) for f in folds],
            "valid": [len(f.valid) for f in folds],
            "test": [len(f.test) for f in folds],
        },
        "metric": "macro_f1",
        "chance": chance(train_y, test_y, multi),
        "layers": per_layer,
        "weighted": weighted,
        "weights": {str(layer): float(v) for layer, v in zip(layers, mean_w, strict=True)},
        "best_layer": best["layer"],
        "control": {
            "how": (
                f"train labels permuted ({cfg.control_repeats} seeded permutations, scores averaged), trained and "
                "selected the same way, scored on the real test labels"
            ),
            "best_layer": best["control"],
            "weighted": weighted["control"],
            "per_layer": {str(e["layer"]): e["control"] for e in per_layer},
        },
        "probe_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "device": str(device),
        "memory": {
            "weighting_limit_mb": cfg.memory_mb,
            "weighting_batch_recordings": bs,
            "weighting_largest_batch_seen": stats.get("largest_batch", 0),
            "layer_vectors_mb": round(n * dim * 4 / 2**20, 3),
            "stack_on_disk_mb": round(n * len(layers) * dim * 4 / 2**20, 3),
        },
        "note": note,
        "pipeline_version": __version__,
        "elapsed_s": round(time.time() - started, 2),
    }
    _write_splits(os.path.join(out_dir, "splits.csv"), labels, folds)
    write_report(report, out_dir)
    return report


def _weighting_standardizer(arr: np.ndarray, idx: np.ndarray, bs: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer mean and std over the train rows of the (N, L, D) stack, accumulated in batches: (L, D) each."""
    total = np.zeros(arr.shape[1:], np.float64)
    sq = np.zeros(arr.shape[1:], np.float64)
    order = np.sort(idx)
    for s in range(0, len(order), bs):
        xb = arr[order[s : s + bs]].astype(np.float64)
        total += xb.sum(0)
        sq += (xb * xb).sum(0)
    mean = total / len(order)
    std = np.sqrt(np.maximum(sq / len(order) - mean * mean, 0.0)) + 1e-6
    return mean.astype(np.float32), std.astype(np.float32)


def _write_splits(path: str, labels: Labels, folds: list[Fold]) -> None:
    """splits.csv: recording_id, fold, role (train | valid | test) for every recording in every fold."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["recording_id", "label", "fold", "role"])
        for k, fold in enumerate(folds):
            for role, idx in (("train", fold.train), ("valid", fold.valid), ("test", fold.test)):
                for i in idx:
                    w.writerow([labels.ids[i], "|".join(labels.tags[i]), k, role])

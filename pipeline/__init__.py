"""MERT feature pipeline: MERT embeddings of an audio catalog as a layer-partitioned Parquet table."""

from __future__ import annotations

__version__ = "0.1.0"


def read_features(
    table: str, layer: int, storage_options: dict | None = None, columns: list[str] | None = None
):
    """One layer's committed rows as a pyarrow Table (no uncommitted, duplicate or superseded rows).

    `embedding` is a fixed_size_list<float32|float16>[dim] (frame granularity: a list of them per row).
    `table` may also be a root of tables with a `_current.json` (jobs.scheduled promote): the current one is read.
    """
    from pipeline.table import FeatureTable, resolve_table

    return FeatureTable(resolve_table(table, storage_options), storage_options).read_layer(layer, columns)


def read_features_pandas(table: str, layer: int, storage_options: dict | None = None, columns=None):
    """read_features as a pandas DataFrame (embeddings as numpy arrays per row)."""
    return read_features(table, layer, storage_options, columns).to_pandas()


def read_ledger(table: str, storage_options: dict | None = None, latest: bool = True):
    """The recordings ledger: the newest row per input (latest=True), or every committed row."""
    from pipeline.table import FeatureTable, resolve_table

    return FeatureTable(resolve_table(table, storage_options), storage_options).ledger(latest=latest)

"""The feature table: layer-partitioned Parquet files made visible by a versioned commit log.

log.py           the commit log: numbered entries created once, checkpoints, the commit protocol
snapshot.py      the table at one version: live files, the newest ledger row per recording (pure)
lease.py         the writer lease: epochs in the log, a heartbeat on the storage's clock
writer.py        the workers' side: buffer rows, flush one file per layer, describe the flush
feature_table.py FeatureTable: create, commit, read (any version), inspect
maintenance.py   vacuum and compact, as commits
marker.py        migration both ways: upgrading version-1 tables, and markers that old releases refuse
catalog.py       a root of tables and the one consumers read (promote)
"""

from pipeline.errors import LeaseHeld, StaleWriter
from pipeline.table.catalog import CURRENT, promote, resolve_table
from pipeline.table.feature_table import FeatureTable
from pipeline.table.schema import (
    LEDGER_SCHEMA,
    SCHEMA_VERSION,
    embedding_type,
    feature_schema,
    footer_metadata,
)
from pipeline.table.writer import FlushWriter, layer_column, weighted_mean

__all__ = [
    "CURRENT",
    "LEDGER_SCHEMA",
    "SCHEMA_VERSION",
    "FeatureTable",
    "FlushWriter",
    "LeaseHeld",
    "StaleWriter",
    "embedding_type",
    "feature_schema",
    "footer_metadata",
    "layer_column",
    "promote",
    "resolve_table",
    "weighted_mean",
]

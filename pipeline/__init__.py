"""MERT feature pipeline: MERT embeddings of an audio catalog as a layer-partitioned Parquet table."""

__version__ = "0.1.0"

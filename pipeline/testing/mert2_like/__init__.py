"""A checkpoint's own code, MERT-v2's interface in miniature (see pipeline.testing). Copied, never imported."""

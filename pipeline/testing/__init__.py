"""Test helpers that ship with the library: `mert2_like/` is a tiny checkpoint's own modeling and processing code
(the MERT-v2 interface: AutoModel/AutoFeatureExtractor through `auto_map`, 24 hidden states with index 0 =
block 1, `feature_attention_mask`), copied into a checkpoint folder by
`pipeline.checkpoints.write_remote_code_checkpoint`. Nothing in the pipeline imports it: transformers loads it
from the checkpoint folder, as it would a hub repository's code."""

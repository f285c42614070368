"""`python -m pipeline.audio`: the decoder child (pipeline.audio.isolate.child_main), started by DecoderProcess."""

from pipeline.audio.isolate import child_main

child_main()

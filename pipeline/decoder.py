"""Moved to pipeline.audio.isolate (the decoder child is now `python -m pipeline.audio`); kept for importers."""

from pipeline.audio.isolate import FAULT_ENV, PARENT_ENV, DecoderProcess, default_decoder, injected

__all__ = ["FAULT_ENV", "PARENT_ENV", "DecoderProcess", "default_decoder", "injected"]

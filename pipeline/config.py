"""Configuration: frozen dataclasses validated on construction.

An invalid value raises ValueError naming the field, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SegmentConfig:
    window_s: float = 5.0  # segment length; MERT was pre-trained on 5 s contexts
    hop_s: float | None = None  # distance between segment starts; None = window_s (no overlap)
    min_segment_s: float = 1.0  # shortest partial window kept at the end; also the shortest recording

    def __post_init__(self) -> None:
        if not (isinstance(self.window_s, (int, float)) and 0 < self.window_s <= 600):
            raise ValueError(f"window_s={self.window_s!r}: must be a number of seconds in (0, 600]")
        if self.hop_s is not None and not (isinstance(self.hop_s, (int, float)) and self.hop_s > 0):
            raise ValueError(f"hop_s={self.hop_s!r}: must be a positive number of seconds (or unset = window_s)")
        if not (isinstance(self.min_segment_s, (int, float)) and 0 < self.min_segment_s <= self.window_s):
            raise ValueError(
                f"min_segment_s={self.min_segment_s!r}: must be positive and at most window_s={self.window_s}"
            )

    @property
    def hop(self) -> float:
        return float(self.window_s if self.hop_s is None else self.hop_s)

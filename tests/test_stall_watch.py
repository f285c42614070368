"""The flow's stall rule (ray_wiring.StallWatch), on a fake clock: decode tasks paused by backpressure hold CPUs
that a restarting actor or a rebuilt table needs; once embed calls make no progress for long and no CPU is free,
the flow drains the decode tasks. tests/test_cluster.py's worker-node death is where it was seen."""

from __future__ import annotations

from pipeline.engine.ray_wiring import STALL_FIRST_S, STALL_MIN_S, StallWatch


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_stall_needs_a_long_quiet_time_and_no_free_cpu():
    clock, free = Clock(), [0.0]
    asked: list[float] = []

    def cpus() -> float:
        asked.append(clock.t)
        return free[0]

    w = StallWatch(cpus, clock)
    clock.t += STALL_FIRST_S - 1  # the replicas may still be loading their model
    assert not w.stalled() and not asked, "the CPUs are asked only once the quiet time has passed its limit"
    clock.t += 2
    assert w.stalled() and w.stalls == 1
    w.ended()  # the first call ends: from here on the limit is STALL_MIN_S or 3x the longest gap
    clock.t += 2.0
    w.ended()
    clock.t += STALL_MIN_S - 0.5
    assert not w.stalled()
    clock.t += 1.0
    free[0] = 1.0
    assert not w.stalled(), "a free CPU: nothing starves, the backlog bound holds"
    free[0] = 0.0
    assert w.stalled() and w.stalled() and w.stalls == 2, "one stall is counted once"


def test_slow_calls_raise_the_limit_and_a_stalls_own_wait_does_not():
    clock = Clock()
    w = StallWatch(lambda: 0.0, clock)
    w.ended()
    clock.t += 30.0  # a slow model: 30 s per call
    w.ended()
    clock.t += 89.0
    assert not w.stalled(), "under 3x the longest call is no stall"
    clock.t += 2.0
    assert w.stalled()
    clock.t += 500.0  # the stall lasts; its wait must not lift the limit for the next one
    w.ended()
    clock.t += 91.0
    assert w.stalled() and w.longest_gap == 30.0

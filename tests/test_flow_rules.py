"""The flow's rules, without Ray: how the work list is split into decode tasks (engine.ray_wiring.chunk_size), how
their retries are bounded, and how the attempts count gives an input that kills its worker the same verdict in
every later try of its task."""

from __future__ import annotations

import json

import pytest

from pipeline.config import SegmentConfig
from pipeline.engine.ray_wiring import (
    INPUT_CRASH_LIMIT,
    INPUTS_PER_TASK,
    _Writer,
    chunk_size,
    decode_task_retries,
)
from pipeline.stages import decode_input


def chunks(inputs: int, slots: int) -> list[int]:
    """The task sizes for a work list of `inputs`, started one after the other as the flow does."""
    out: list[int] = []
    left = inputs
    while left:
        n = chunk_size(len(out), slots, left)
        assert 1 <= n <= left
        out.append(n)
        left -= n
    return out


@pytest.mark.parametrize("inputs, slots", [(1, 1), (5, 1), (32, 1), (1000, 1), (1000, 15), (7, 16)])
def test_tasks_cover_the_work_list_once_first_ones_small_and_never_past_the_bound(inputs, slots):
    got = chunks(inputs, slots)
    assert sum(got) == inputs
    assert got[: min(slots, len(got))] == [1] * min(slots, len(got))  # the first summaries come soon
    assert max(got) <= INPUTS_PER_TASK
    assert got[-1] == 1  # the end of a run is not one slow task


def test_a_long_work_list_takes_the_largest_tasks():
    got = chunks(1000, 4)
    assert got.count(INPUTS_PER_TASK) >= 1000 // INPUTS_PER_TASK - 8
    assert len(got) < 1000 / 8  # the driver starts and collects far fewer tasks than inputs


def test_five_inputs_on_one_slot_go_in_tasks_of_1_2_1_1():
    # tests/test_cluster.py relies on it: its two crashing inputs share the second task
    assert chunks(5, 1) == [1, 2, 1, 1]


@pytest.mark.parametrize("n", [1, 2, 16])
def test_a_task_is_retried_enough_for_every_input_it_holds_to_die_its_limit_and_then_finish(n):
    # each input may kill the worker INPUT_CRASH_LIMIT times before it becomes an error row; one spare try
    assert decode_task_retries(n) + 1 >= INPUT_CRASH_LIMIT * n + 1 + 1
    assert decode_task_retries(n) <= INPUT_CRASH_LIMIT * n + 1  # bounded, never Ray's infinite default


class Counts:
    """The driver node's writer's attempt counts (its real methods), as Attempts reaches them."""

    def __init__(self) -> None:
        self.w = _Writer.__new__(_Writer)  # the counting methods only: no FlushWriter, no Ray
        self.w.open = {}

    def begin(self, key: str) -> int:
        return self.w.begin_attempt(key)

    def end(self, key: str) -> None:
        self.w.end_attempt(key)

    def skip(self, key: str) -> None:
        self.w.skip_attempt(key)


def record_of(uri: str, counts: Counts) -> dict:
    tables = list(
        decode_input(
            uri,
            "rec",
            "fp",
            sample_rate=16000,
            segments=SegmentConfig(window_s=1.0, min_segment_s=0.5),
            isolate=False,
            attempts=counts,
            crash_limit=INPUT_CRASH_LIMIT,
        )
    )
    return json.loads(tables[-1].column("record")[0].as_py())


def test_an_input_given_up_on_gets_the_same_verdict_in_every_later_try_without_being_read(tmp_path):
    counts = Counts()
    missing = str(tmp_path / "gone.flac")  # read, it would be a storage error, not worker_crash
    for _ in range(INPUT_CRASH_LIMIT):  # the worker died under it, twice: begun, never ended
        counts.begin("rec")
    for _ in range(3):  # the task's later tries (it held other inputs, and died under one of them)
        rec = record_of(missing, counts)
        assert (rec["status"], rec["error_kind"]) == ("error", "worker_crash")
        assert f"died {INPUT_CRASH_LIMIT} times" in rec["error_message"]
    assert counts.w.open == {"rec": INPUT_CRASH_LIMIT}


def test_an_input_read_to_its_end_clears_its_count(tmp_path):
    counts = Counts()
    counts.begin("rec")  # one death
    rec = record_of(str(tmp_path / "gone.flac"), counts)  # read (and missing): its own row, not a verdict
    assert rec["error_kind"] != "worker_crash"
    assert counts.w.open == {}

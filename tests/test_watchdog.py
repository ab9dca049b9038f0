"""The step watchdog (llm_pretrain/watchdog.py): which rank it names, and when it only warns.
The 2-rank SIGSTOP run is in tests/test_reliability.py."""

import json
import logging

import pytest

from llm_pretrain.watchdog import STALL_EXIT, StepWatchdog, limit_s, stalled_ranks


def rec(step, phase, since, beat):
    return {"step": step, "phase": phase, "since": since, "beat": beat}


def test_the_limit_needs_measured_steps_and_has_a_floor():
    assert limit_s([0.1, 0.1], factor=20, min_s=1) is None  # too few steps to judge
    assert limit_s([0.1, 0.2, 0.3], factor=20, min_s=1) == pytest.approx(4.0)
    assert limit_s([0.01, 0.01, 0.01], factor=20, min_s=1) == 1


def test_a_silent_rank_is_named_before_anything_else():
    now = 100.0
    records = {0: rec(7, "data", 90, now), 1: rec(7, "forward_backward", 90, now - 30)}
    stalled, why = stalled_ranks(records, now, limit=5, min_s=10)
    assert stalled == [1] and "no heartbeat" in why and "rank 1: 30 s" in why


def test_a_rank_behind_in_a_training_phase_is_named():
    now = 100.0
    records = {
        0: rec(7, "data", 99, now),  # waits in the step's first collective
        1: rec(6, "optimizer", 80, now),  # still in the previous step's update, for 20 s
        2: rec(7, "data", 99, now),
    }
    stalled, why = stalled_ranks(records, now, limit=5, min_s=10)
    assert stalled == [1] and "rank 1 in optimizer of step 6 for 20 s" in why


def test_every_rank_slow_at_the_same_place_or_a_rank_between_steps_is_no_stall():
    now = 100.0
    same = {r: rec(7, "optimizer", 50, now) for r in range(3)}  # e.g. a refresh everywhere
    assert stalled_ranks(same, now, limit=5, min_s=10) == ([], "")
    saving = {0: rec(6, "between", 50, now), 1: rec(7, "data", 99, now)}  # rank 0 saves
    assert stalled_ranks(saving, now, limit=5, min_s=10) == ([], "")


class FakeStore:
    def __init__(self):
        self.data = {}

    def set(self, key, value):
        self.data[key] = value

    def check(self, keys):
        return all(k in self.data for k in keys)

    def get(self, key):
        return self.data[key]


def measured_watchdog(exits, messages, rank=0, world_size=2):
    dog = StepWatchdog(
        factor=2,
        min_s=1,
        rank=rank,
        world_size=world_size,
        on_stall=messages.append,
        exit=exits.append,
    )
    for step in range(1, 5):  # 4 steps of 0.5 s (the first is not counted)
        dog.begin(step)
        dog._step_start -= 0.5
        dog.end()
    return dog


def test_a_stall_names_the_rank_records_it_and_exits(caplog):
    exits, messages = [], []
    dog = measured_watchdog(exits, messages)
    dog._store = store = FakeStore()
    dog.begin(5)
    t = dog._step_start
    dog.tick(t + 0.5)  # within the limit: publishes only
    assert json.loads(store.data[dog._key(0)])["step"] == 5 and not exits
    store.set(dog._key(1), json.dumps(rec(5, "forward_backward", t, t)))  # then silent
    with caplog.at_level(logging.ERROR, logger="llm_pretrain"):
        dog.tick(t + 3.0)
    assert exits == [STALL_EXIT]
    assert messages[0].startswith("rank 1 stalled: no heartbeat") and "step 5" in messages[0]
    assert messages[0] in caplog.text


def test_alone_or_slow_everywhere_the_watchdog_only_warns_once_per_step(caplog):
    exits, messages = [], []
    alone = measured_watchdog(exits, messages, world_size=1)
    alone.begin(5)
    with caplog.at_level(logging.WARNING, logger="llm_pretrain"):
        alone.tick(alone._step_start + 10)
        alone.tick(alone._step_start + 20)
    assert caplog.text.count("step 5 has run") == 1 and "slow, still waiting" in caplog.text
    caplog.clear()
    both = measured_watchdog(exits, messages)
    both._store = store = FakeStore()
    both.begin(5)
    t = both._step_start
    store.set(both._key(1), json.dumps(rec(5, "data", t, t + 10)))  # alive, same place
    with caplog.at_level(logging.WARNING, logger="llm_pretrain"):
        both.tick(t + 10)
    assert "every rank is slow at the same place" in caplog.text
    assert not exits and not messages


def test_off_when_the_factor_is_zero():
    dog = StepWatchdog(factor=0, min_s=1, world_size=2)
    dog.start()  # starts nothing: no store, no thread
    assert dog._thread is None and not dog.enabled


def test_a_rank_that_never_published_counts_as_silent():
    exits, messages = [], []
    dog = measured_watchdog(exits, messages)
    dog._store = FakeStore()
    dog.begin(5)
    dog._started = dog._step_start - 5  # rank 1 has said nothing in the 5 s since
    dog.tick(dog._step_start + 3)
    assert exits == [STALL_EXIT] and messages[0].startswith("rank 1 stalled: no heartbeat")

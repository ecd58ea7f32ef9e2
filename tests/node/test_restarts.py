"""node.restarts: the one rule by which receiver and worker pools start dead processes."""

from __future__ import annotations

from node.restarts import RestartPolicy


def test_a_process_stopped_on_purpose_stays_stopped() -> None:
    policy = RestartPolicy(1)
    for now in (0.0, 10.0, 1000.0):
        verdict = policy.dead(0, 0, early=True, now=now)
        assert verdict.stopped and not verdict.start


def test_a_death_after_working_restarts_at_once_and_forgets_early_deaths() -> None:
    policy = RestartPolicy(2)
    assert policy.dead(0, 1, early=False, now=0.0).start
    assert policy.dead(0, -9, early=False, now=0.0).start  # SIGKILL mid-job
    # an early death waits; a later death after working starts over at once
    wait = policy.dead(1, 1, early=True, now=0.0)
    assert not wait.start and wait.pause == 5.0
    assert policy.dead(1, 1, early=True, now=5.0).start
    assert policy.failures(1) == 1
    assert policy.dead(1, 1, early=False, now=100.0).start
    assert policy.failures(1) == 0


def test_early_deaths_wait_a_doubling_pause_up_to_five_minutes() -> None:
    policy = RestartPolicy(1)
    now = 0.0
    pauses = []
    for _ in range(9):
        first = policy.dead(0, 1, early=True, now=now)
        assert not first.start
        pauses.append(first.pause)
        # looks during the pause neither start it nor log again
        during = policy.dead(0, 1, early=True, now=now + first.pause / 2)
        assert not during.start and during.pause == 0.0
        now += first.pause
        assert policy.dead(0, 1, early=True, now=now).start
    assert pauses == [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0, 300.0]


def test_slots_are_independent_and_can_be_added() -> None:
    policy = RestartPolicy(0)
    assert policy.add() == 0 and policy.add() == 1
    assert not policy.dead(0, 1, early=True, now=0.0).start
    assert policy.dead(1, 1, early=False, now=0.0).start

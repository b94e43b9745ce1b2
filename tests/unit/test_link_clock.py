"""LinkClock: how long a transport's broker links were down, which the
orchestrator credits back to hosts it was waiting on."""

from __future__ import annotations

import time

from deploybus.bus.base import LinkClock


def test_a_new_clock_is_up_and_has_no_downtime() -> None:
    clock = LinkClock()
    time.sleep(0.05)
    assert clock.downtime() == 0.0
    assert clock.up_for() >= 0.05


def test_downtime_counts_an_outage_while_it_lasts_and_after() -> None:
    clock = LinkClock()
    clock.down("conn")
    time.sleep(0.1)
    during = clock.downtime()
    assert during >= 0.1
    assert clock.up_for() == 0.0
    time.sleep(0.05)
    clock.up("conn")
    after = clock.downtime()
    assert after >= during + 0.05
    time.sleep(0.05)
    assert clock.downtime() == after, "time up must not count as downtime"
    assert clock.up_for() >= 0.05


def test_down_while_any_link_is_down() -> None:
    clock = LinkClock()
    clock.down("a")
    clock.down("b")
    time.sleep(0.05)
    clock.up("a")
    assert clock.up_for() == 0.0, "b is still down"
    time.sleep(0.05)
    clock.up("b")
    assert clock.downtime() >= 0.1
    assert clock.up_for() < 0.05


def test_up_of_a_link_never_down_changes_nothing() -> None:
    clock = LinkClock()
    time.sleep(0.05)
    clock.up("never-down")
    assert clock.up_for() >= 0.05
    assert clock.downtime() == 0.0
    clock.down("x")
    clock.down("x")
    time.sleep(0.02)
    clock.up("x")
    assert clock.up_for() < 0.02
    assert 0.02 <= clock.downtime() < 1.0

"""LinkClock: how long a transport's broker links were down, which the
orchestrator credits back to hosts it was waiting on."""

from __future__ import annotations

import threading
import time

import pytest

from deploybus.bus import base
from deploybus.bus.base import Backoff, LinkClock


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


class FakeTime:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def fake_clock(monkeypatch: pytest.MonkeyPatch, peer_lag: float = 20.0) -> tuple[LinkClock,
                                                                                   FakeTime]:
    t = FakeTime()
    monkeypatch.setattr(base, "time", t)
    return LinkClock(peer_lag=peer_lag), t


def outage(clock: LinkClock, t: FakeTime, seconds: float) -> None:
    clock.down("conn")
    t.now += seconds
    clock.up("conn")


def test_excused_goes_on_after_an_outage_for_as_long_as_it_lasted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock, t = fake_clock(monkeypatch)
    clock.down("conn")
    t.now += 5
    assert clock.excused() == 5
    clock.up("conn")
    t.now += 3
    assert clock.excused() == 8, "hosts may still be coming back"
    assert clock.heard_for() == 0.0
    t.now += 10
    assert clock.excused() == 10, "a 5 s outage delays a host's return by 5 s at most"
    assert clock.heard_for() == 8
    assert clock.downtime() == 5


def test_excused_after_a_long_outage_is_capped_at_the_peer_lag(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock, t = fake_clock(monkeypatch)
    outage(clock, t, 60)
    t.now += 100
    assert clock.excused() == 80
    assert clock.heard_for() == 80


def test_an_outage_during_the_hosts_return_keeps_what_passed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock, t = fake_clock(monkeypatch)
    outage(clock, t, 10)
    t.now += 4  # 4 of the 10 s allowed for the hosts' return
    clock.down("conn")
    assert clock.excused() == 14
    t.now += 2
    clock.up("conn")
    t.now += 50
    assert clock.excused() == 18, "10 down, 4 of the first return, 2 down, 2 of the second"
    assert clock.downtime() == 12


def test_backoff_waits_are_jittered_and_capped() -> None:
    b = Backoff(initial=1.0, cap=8.0, stop=threading.Event())
    b.stop.set()  # wait() returns at once; only the delays are looked at
    delays = []
    for _ in range(200):
        delays.append(b.delay)
        b.wait()
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0
    assert all(4.0 <= d <= 8.0 for d in delays[4:]), "capped, never under half the cap"
    assert len({round(d, 6) for d in delays[4:]}) > 100, "clients must not all retry in step"
    b.reset()
    assert 0.5 <= b.delay <= 1.0

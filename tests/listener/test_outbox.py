"""The durable outbox: ordered, de-duplicated, fsynced, drained only on the
broker's confirm, each event signed once (deploybus/outbox.py)."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from deploybus import envelope, protocol
from deploybus.errors import BusConnectionError
from deploybus.outbox import Event, Outbox, drain, drain_lock
from deploybus.signing import SigningKey

pytestmark = pytest.mark.unit

ZERO = "0" * 40


def push(i: int, project: str = "app") -> Event:
    return Event("git.commits", "git.push", {"project": project, "ref": "refs/heads/main",
                                             "old": f"{i:040x}", "new": f"{i + 1:040x}"})


class Bus:
    """Records publishes; ``fail_after`` publishes, raises like a dead broker."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.fail_after = fail_after

    def publish(self, topic: str, body: bytes, **_: Any) -> None:
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            raise BusConnectionError("broker away")
        self.sent.append((topic, body))


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate("git")


def test_events_come_out_in_the_order_they_went_in(tmp_path: Path, key: SigningKey) -> None:
    with Outbox(tmp_path / "o.db") as box:
        for i in range(5):
            assert box.add([push(2 * i), push(2 * i + 1)], source="hook")
        bus = Bus()
        assert drain(box, bus, key=key, sender="t") == 10
        assert box.status()["pending"] == 0
    olds = [envelope.decode(b).body["old"] for _, b in bus.sent]
    assert olds == [f"{i:040x}" for i in range(10)]
    assert {t for t, _ in bus.sent} == {"git.commits"}


def test_what_was_added_survives_a_reopen(tmp_path: Path) -> None:
    Outbox(tmp_path / "o.db").add([push(1)], source="github", delivery="github:abc")
    with Outbox(tmp_path / "o.db") as box:
        rows = box.pending()
        assert [r.body["new"] for r in rows] == [f"{2:040x}"] and rows[0].source == "github"
        assert not box.add([push(1)], source="github", delivery="github:abc")


def test_a_delivery_sent_twice_at_the_same_moment_is_added_once(tmp_path: Path) -> None:
    Outbox(tmp_path / "o.db").close()
    barrier = threading.Barrier(16)
    results: list[bool] = []

    def one() -> None:
        box = Outbox(tmp_path / "o.db")  # each its own connection, like two requests
        barrier.wait()
        results.append(box.add([push(7), push(8)], source="gitea", delivery="gitea:d-1"))
        box.close()

    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 15 + [True]
    assert Outbox(tmp_path / "o.db").status()["pending"] == 2


def test_a_failed_publish_keeps_the_event_and_its_successors(tmp_path: Path,
                                                            key: SigningKey) -> None:
    with Outbox(tmp_path / "o.db") as box:
        box.add([push(i) for i in range(4)], source="hook")
        bus = Bus(fail_after=2)
        with pytest.raises(BusConnectionError):
            drain(box, bus, key=key, sender="t")
        st = box.status()
        assert st["pending"] == 2 and st["error"] == "broker away"
        bus.fail_after = None
        assert drain(box, bus, key=key, sender="t") == 2
    assert [envelope.decode(b).body["old"] for _, b in bus.sent] == \
        [f"{i:040x}" for i in range(4)]


def test_an_event_is_signed_once_so_a_resend_is_the_same_envelope(tmp_path: Path,
                                                                  key: SigningKey) -> None:
    """A drainer that died between the broker's confirm and the delete sends
    the same envelope again: consumers' replay checks drop it."""
    with Outbox(tmp_path / "o.db") as box:
        box.add([push(1)], source="hook")
        with pytest.raises(BusConnectionError):
            drain(box, Bus(fail_after=0), key=key, sender="t")
        first = box.pending()[0].sealed
        assert first is not None
        bus = Bus()
        drain(box, bus, key=key, sender="t")
    assert bus.sent[0][1] == first


def test_a_row_the_protocol_refuses_is_set_aside_not_blocking(tmp_path: Path,
                                                              key: SigningKey) -> None:
    with Outbox(tmp_path / "o.db") as box:
        box.add([push(1)], source="hook")
        db = sqlite3.connect(tmp_path / "o.db")
        db.execute("INSERT INTO events (topic, type, body, source, added) VALUES (?,?,?,?,?)",
                   ("git.commits", "git.push", json.dumps({"project": "app", "ref": 5}),
                    "hook", 0.0))
        db.commit()
        db.close()
        box.add([push(3)], source="hook")
        bus = Bus()
        assert drain(box, bus, key=key, sender="t") == 2
        st = box.status()
        assert st["pending"] == 0 and st["rejected"] == 1
    for _, data in bus.sent:
        env = envelope.decode(data)
        protocol.parse(env.type, env.body)


def test_one_drainer_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with drain_lock(path) as held:
        assert held
        with drain_lock(path) as second:
            assert not second
    with drain_lock(path) as again:
        assert again

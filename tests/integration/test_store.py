"""The state store on SQLite and on a real PostgreSQL: rollouts, steps, locks
under contention, the audit trail, what a restarted orchestrator resumes."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploybus.store import Store
from tests.conftest import require

PG = ("127.0.0.1", 5432)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        yield Store(f"sqlite:///{tmp_path / 'state.db'}")
        return
    require(PG, "PostgreSQL")
    import psycopg2
    name = f"deploybus_test_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(host=PG[0], port=PG[1], user="postgres", dbname="postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    s = Store(f"postgresql+psycopg2://postgres@{PG[0]}:{PG[1]}/{name}")
    try:
        yield s
    finally:
        s.engine.dispose()
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.close()


def test_rollout_round_trip_and_redelivery(store: Store) -> None:
    assert store.create_rollout(id="r1", project="app", environment="prod", ref="v1",
                                user="alice", hosts=["a", "b"], strategy={"window": 2})
    assert not store.create_rollout(id="r1", project="app", environment="prod", ref="v1",
                                    user="alice", hosts=["a", "b"]), "a redelivery"
    store.set_step("r1", "a", state="succeeded", release="rel1", previous_release="rel0")
    store.add_log("r1", "a", "post", "ok")
    r = store.rollout("r1")
    assert r is not None and r["strategy"] == {"window": 2}
    assert [(h["host"], h["state"], h["previous_release"]) for h in r["hosts"]] == [
        ("a", "succeeded", "rel0"), ("b", "pending", None)]
    assert r["logs"][0]["text"] == "ok"
    assert [x["id"] for x in store.active_rollouts()] == ["r1"]
    store.set_rollout("r1", state="succeeded")
    assert store.active_rollouts() == []


def test_exactly_one_of_many_racing_rollouts_gets_the_lock(store: Store) -> None:
    ids = [f"r{i}" for i in range(8)]
    for i in ids:
        store.create_rollout(id=i, project="app", environment="prod", ref="v1", user="u",
                             hosts=["a"])
    results: dict[str, object] = {}
    barrier = threading.Barrier(len(ids))

    def take(rid: str) -> None:
        barrier.wait()
        results[rid] = store.acquire_lock(project="app", environment="prod", owner=rid,
                                          reason=f"rollout {rid}", ttl=60, rollout_id=rid)

    threads = [threading.Thread(target=take, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [rid for rid, held in results.items() if held is None]
    assert len(winners) == 1, results
    holder = store.lock("app", "prod")
    assert holder is not None and holder["rollout"] == winners[0]
    # The holder's rollout ends: its lock is stale and the next one may take it.
    store.set_rollout(winners[0], state="succeeded")
    loser = next(i for i in ids if i != winners[0])
    assert store.acquire_lock(project="app", environment="prod", owner="x", reason="next",
                              ttl=60, rollout_id=loser) is None


def test_expired_manual_lock_is_taken_over(store: Store) -> None:
    assert store.acquire_lock(project="app", environment="prod", owner="bob",
                              reason="migration", ttl=0.01) is None
    import time
    time.sleep(0.05)
    assert store.acquire_lock(project="app", environment="prod", owner="carol",
                              reason="deploy", ttl=60) is None
    held = store.lock("app", "prod")
    assert held is not None and held["owner"] == "carol"


def test_audit_trail_is_newest_first(store: Store) -> None:
    for i in range(3):
        store.audit(actor="alice", action="lock", project="app", environment="prod", n=i)
    trail = store.audit_trail()
    assert [a["detail"]["n"] for a in trail] == [2, 1, 0]


def test_presence(store: Store) -> None:
    store.record_presence("web1", {"host": "web1", "interval": 10})
    store.record_presence("web1", {"host": "web1", "interval": 5})
    (h,) = store.hosts()
    assert h["name"] == "web1" and h["info"]["interval"] == 5 and h["age"] < 5


# -- no credential is stored; no SQLAlchemy error escapes -------------------------------

TOKEN = "ghp_StoreS3cretToken0123456789"


def test_free_text_is_stored_without_url_credentials(store: Store) -> None:
    git = f"https://ci:{TOKEN}@github.com/acme/app.git"
    reason = f"fatal: unable to access '{git}/': The requested URL returned error: 403"
    assert store.create_rollout(id="r1", project="app", environment="prod", ref="v1",
                                user="alice", hosts=["a", "b"], reason=reason,
                                override=f"hotfix from https://{TOKEN}@github.com/x.git")
    store.set_rollout("r1", state="failed", reason=reason)
    store.set_step("r1", "a", state="failed", message=reason)
    store.set_steps("r1", ["b"], state="skipped", message=f"amqp://guest:{TOKEN}@mq/ down")
    store.add_logs("r1", "a", [("fetch", f"git fetch -- {git}"), ("fetch", "plain line")])
    store.audit(actor="alice", action="deploy", project="app", environment="prod",
                rollout_id="r1", reason=reason, hosts=2)
    assert store.acquire_lock(project="app", environment="prod", owner="bob",
                              reason=f"mirror {git} broken", ttl=60) is None
    everything = repr([store.rollout("r1"), store.rollouts(), store.steps("r1"),
                       store.audit_trail(), store.locks()])
    assert TOKEN not in everything
    r = store.rollout("r1")
    assert r is not None
    assert r["reason"] == ("fatal: unable to access 'https://ci:***@github.com/acme/app.git/': "
                           "The requested URL returned error: 403")
    assert r["override"] == "hotfix from https://***@github.com/x.git"
    assert [h["message"] for h in r["hosts"]] == [r["reason"], "amqp://guest:***@mq/ down"]
    assert [ln["text"] for ln in r["logs"]] == [
        "git fetch -- https://ci:***@github.com/acme/app.git", "plain line"]
    assert store.audit_trail()[0]["detail"] == {"reason": r["reason"], "hosts": 2}
    held = store.lock("app", "prod")
    assert held is not None
    assert held["reason"] == "mirror https://ci:***@github.com/acme/app.git broken"


def test_every_public_method_translates_driver_errors() -> None:
    import inspect
    public = [n for n, m in vars(Store).items()
              if not n.startswith("_") and inspect.isfunction(m)]
    assert len(public) > 15
    assert all(hasattr(getattr(Store, n), "__wrapped__") for n in public), public

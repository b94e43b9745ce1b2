"""The durable outbox: events accepted from outside wait here for the bus.

The post-receive hook and the webhook listener answer a push the moment its
events are on disk, broker or no broker, and a drainer publishes them later,
in order, deleting each only once the broker has confirmed it. One SQLite
file (WAL, ``synchronous=FULL``: a commit is fsynced) serves every process
on the machine that writes or drains it; a lock file lets one drainer run at
a time, so two never publish the same row.

Nothing accepted is lost, nothing is published twice:

* :meth:`Outbox.add` writes all events of one delivery in one transaction,
  with the delivery's id (a forge's ``X-GitHub-Delivery``...) in a table of
  its own: the same delivery added twice, even by two requests at the same
  moment, is added once.
* The drainer signs a row once and stores the signed bytes before it
  publishes them: if it dies between the broker's confirm and the delete,
  the next drainer sends the very same envelope, which every consumer's
  replay check drops (docs/security.md).
* A row the protocol refuses (it cannot have come from this code, but a
  disk can lie) is moved to ``rejected`` with the reason, so it never blocks
  the rows behind it.

This module imports only the standard library at import time: the git hook
loads it on every push (docs/performance.md, "the hook's cost").
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Seconds a writer waits for another process's transaction.
BUSY_TIMEOUT = 5.0

#: Days a delivery id is remembered (a forge retries a delivery for hours, not days).
DELIVERY_DAYS = 7

#: A signed row older than this share of its type's lifetime is signed anew
#: rather than sent stale (it has not reached the broker in that time).
RESEAL_AFTER = 0.5

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    topic    TEXT NOT NULL,
    type     TEXT NOT NULL,
    body     TEXT NOT NULL,
    source   TEXT NOT NULL,
    added    REAL NOT NULL,
    sealed   BLOB,
    sealed_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error    TEXT
);
CREATE TABLE IF NOT EXISTS deliveries (
    id    TEXT PRIMARY KEY,
    added REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rejected (
    seq    INTEGER PRIMARY KEY,
    topic  TEXT NOT NULL,
    type   TEXT NOT NULL,
    body   TEXT NOT NULL,
    source TEXT NOT NULL,
    added  REAL NOT NULL,
    reason TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Event:
    """One event to publish: its topic, message type and (unsigned) body."""

    topic: str
    type: str
    body: dict[str, Any]


@dataclass(frozen=True)
class Row:
    seq: int
    topic: str
    type: str
    body: dict[str, Any]
    source: str
    added: float
    sealed: bytes | None
    sealed_at: float | None
    attempts: int


class Outbox:
    """A durable queue of events on one SQLite file (see the module docstring).

    Every process opens its own :class:`Outbox`; an instance is used by one
    thread at a time.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def add(self, events: Sequence[Event], *, source: str, delivery: str | None = None) -> bool:
        """Write ``events`` durably, in order; False (and nothing written) if
        ``delivery`` was added before. ``source`` says who accepted them
        (``hook``, ``github``...), for ``deploybus outbox status``."""
        now = time.time()
        try:
            with self._transaction() as db:
                if delivery is not None:
                    db.execute("INSERT INTO deliveries (id, added) VALUES (?, ?)",
                               (delivery, now))
                db.executemany(
                    "INSERT INTO events (topic, type, body, source, added) VALUES (?, ?, ?, ?, ?)",
                    [(e.topic, e.type, json.dumps(e.body, separators=(",", ":")), source, now)
                     for e in events])
        except sqlite3.IntegrityError:
            return False
        return True

    def pending(self, limit: int = 100) -> list[Row]:
        """The oldest ``limit`` rows waiting, oldest first."""
        cur = self._db.execute(
            "SELECT seq, topic, type, body, source, added, sealed, sealed_at, attempts "
            "FROM events ORDER BY seq LIMIT ?", (limit,))
        return [Row(seq, topic, type_, json.loads(body), source, added, sealed, sealed_at,
                    attempts)
                for seq, topic, type_, body, source, added, sealed, sealed_at, attempts in cur]

    def mark_sealed(self, seq: int, sealed: bytes) -> None:
        self._db.execute("UPDATE events SET sealed = ?, sealed_at = ? WHERE seq = ?",
                         (sealed, time.time(), seq))

    def mark_failed(self, seq: int, error: str) -> None:
        self._db.execute("UPDATE events SET attempts = attempts + 1, error = ? WHERE seq = ?",
                         (error[:500], seq))

    def remove(self, seq: int) -> None:
        """Delete a row the broker confirmed."""
        self._db.execute("DELETE FROM events WHERE seq = ?", (seq,))

    def reject(self, row: Row, reason: str) -> None:
        """Set aside a row that can never be published."""
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO rejected VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (row.seq, row.topic, row.type, json.dumps(row.body), row.source,
                        row.added, reason[:500]))
            db.execute("DELETE FROM events WHERE seq = ?", (row.seq,))

    def status(self) -> dict[str, Any]:
        """How many rows wait, since when, the last error, how many were set aside."""
        n, oldest = self._db.execute("SELECT count(*), min(added) FROM events").fetchone()
        err = self._db.execute("SELECT error FROM events WHERE error IS NOT NULL "
                               "ORDER BY seq LIMIT 1").fetchone()
        (rejected,) = self._db.execute("SELECT count(*) FROM rejected").fetchone()
        return {"pending": n, "oldest": oldest, "error": err[0] if err else None,
                "rejected": rejected}

    def prune_deliveries(self, *, days: float = DELIVERY_DAYS) -> int:
        cur = self._db.execute("DELETE FROM deliveries WHERE added < ?",
                               (time.time() - days * 86400,))
        return cur.rowcount


@contextlib.contextmanager
def drain_lock(path: Path, *, wait: bool = False) -> Iterator[bool]:
    """Hold the outbox's drain lock (yields False, holding nothing, if another
    process holds it and ``wait`` is false)."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o660)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing releases the lock


def drain(outbox: Outbox, bus: Any, *, key: Any, sender: str, limit: int = 100,
          log: Any = None) -> int:
    """Publish what waits in ``outbox`` in order, each row deleted once the
    broker confirmed it; the number published. Stops at the first publish
    that fails (BusError propagates) so order is kept; the caller holds
    :func:`drain_lock`."""
    from deploybus import protocol
    from deploybus.errors import EnvelopeError
    sent = 0
    while True:
        rows = outbox.pending(limit)
        if not rows:
            return sent
        for row in rows:
            data = row.sealed
            ttl = protocol.TTL.get(row.type, 3600)
            if data is None or row.sealed_at is None or \
                    time.time() - row.sealed_at > ttl * RESEAL_AFTER:
                try:
                    data = protocol.seal(protocol.parse(row.type, row.body), key=key,
                                         sender=sender)
                except EnvelopeError as exc:
                    outbox.reject(row, str(exc))
                    if log is not None:
                        log.error("outbox row set aside", seq=row.seq, type=row.type,
                                  reason=str(exc))
                    continue
                outbox.mark_sealed(row.seq, data)
            try:
                bus.publish(row.topic, data)
            except Exception as exc:
                outbox.mark_failed(row.seq, str(exc))
                raise
            outbox.remove(row.seq)
            sent += 1

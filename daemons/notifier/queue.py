"""The notifier's durable table: every notification to send, written before
the bus message that asked for it is acknowledged (stdlib :mod:`sqlite3`,
``<state.dir>/notifier.db``).

One row per notification and target (a webhook URL or an email address).
``delivery`` is a stable id of the row, made from what caused it (the
rollout and whether it started or ended, or the CI build) and the target:
it is unique, so a message the bus delivers twice, or a status the
orchestrator says again after a restart, adds nothing
(``INSERT OR IGNORE``), and it is what a receiver sees in
``X-Deploybus-Delivery`` on every try of the same notification.

A row is ``pending`` (with ``attempts`` and ``next_at``, the Unix time of
its next try), ``sent``, or ``gave_up``. Nothing is deleted: the table is
also the record of what was sent (``deploybus`` has no command for it yet;
``sqlite3 notifier.db 'select * from notifications'`` reads it).

The file is in WAL mode with ``synchronous=FULL``: a row whose
transaction returned survives a crash of the process or the machine, so the
bus message may be acked.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PENDING, SENT, GAVE_UP = "pending", "sent", "gave_up"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS notifications (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL,
    event TEXT NOT NULL,
    project TEXT NOT NULL,
    kind TEXT NOT NULL,              -- webhook | email
    address TEXT NOT NULL,           -- the URL, or the email address
    format TEXT,                     -- webhook: slack | json
    secret TEXT,                     -- webhook: the PATH of the secret file, never the secret
    facts TEXT NOT NULL,             -- JSON: what happened (docs/notifications.md)
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    next_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    sent_at REAL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS notifications_due ON notifications (state, next_at);
"""


def delivery_id(source: str, kind: str, address: str) -> str:
    """The stable id of the notification ``source`` causes for one target."""
    return hashlib.sha256(f"{source}\n{kind}\n{address}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class NewNotification:
    """A notification to record: what caused it, for which target."""

    source: str
    event: str
    project: str
    kind: str
    address: str
    facts: dict[str, Any]
    format: str | None = None
    secret: Path | None = None

    @property
    def delivery(self) -> str:
        return delivery_id(self.source, self.kind, self.address)


@dataclass(frozen=True)
class Row:
    """A recorded notification."""

    id: int
    delivery: str
    source: str
    event: str
    project: str
    kind: str
    address: str
    format: str | None
    secret: Path | None
    facts: dict[str, Any]
    state: str
    attempts: int
    created_at: float
    next_at: float
    sent_at: float | None
    last_error: str | None

    @property
    def lane(self) -> str:
        """Deliveries of one lane go one at a time: one target that hangs
        holds one worker, never all of them."""
        return f"{self.kind}:{self.address}"


class Queue:
    """The ``notifications`` table in ``path``. Thread-safe (one connection,
    one lock; every statement is short)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), timeout=30, check_same_thread=False,
                                   isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, notes: Iterable[NewNotification], *, now: float | None = None) -> list[str]:
        """Record ``notes`` in one transaction; returns the deliveries that
        were new (a repeat of a recorded one is left out)."""
        t = time.time() if now is None else now
        added: list[str] = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for n in notes:
                    cur = self._db.execute(
                        "INSERT OR IGNORE INTO notifications (delivery, source, event, project, "
                        "kind, address, format, secret, facts, state, attempts, created_at, "
                        "next_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?)",
                        (n.delivery, n.source, n.event, n.project, n.kind, n.address, n.format,
                         str(n.secret) if n.secret is not None else None,
                         json.dumps(n.facts, sort_keys=True), PENDING, t, t, t))
                    if cur.rowcount:
                        added.append(n.delivery)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return added

    def due(self, *, now: float | None = None, exclude_lanes: Iterable[str] = (),
            limit: int = 1) -> list[Row]:
        """Pending rows whose time has come, oldest first, none of a lane in
        ``exclude_lanes``."""
        t = time.time() if now is None else now
        skip, lanes = _lanes_not_in(exclude_lanes)
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM notifications WHERE state = ? AND next_at <= ?" + skip
                + " ORDER BY next_at, id LIMIT ?", (PENDING, t, *lanes, limit)).fetchall()
        return [_row(r) for r in rows]

    def next_at(self, *, exclude_lanes: Iterable[str] = ()) -> float | None:
        """When the next pending row of a lane not in ``exclude_lanes`` is due."""
        skip, lanes = _lanes_not_in(exclude_lanes)
        with self._lock:
            got = self._db.execute("SELECT MIN(next_at) FROM notifications WHERE state = ?"
                                   + skip, (PENDING, *lanes)).fetchone()[0]
        return float(got) if got is not None else None

    def sent(self, row_id: int, *, attempts: int) -> None:
        t = time.time()
        self._set(row_id, state=SENT, attempts=attempts, sent_at=t, updated_at=t)

    def retry(self, row_id: int, *, attempts: int, next_at: float, error: str) -> None:
        self._set(row_id, attempts=attempts, next_at=next_at, last_error=error,
                  updated_at=time.time())

    def gave_up(self, row_id: int, *, attempts: int, error: str) -> None:
        self._set(row_id, state=GAVE_UP, attempts=attempts, last_error=error,
                  updated_at=time.time())

    def _set(self, row_id: int, **fields: Any) -> None:
        names = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            self._db.execute(f"UPDATE notifications SET {names} WHERE id = ?",
                             (*fields.values(), row_id))

    def counts(self) -> dict[str, int]:
        """Rows by state."""
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM notifications "
                                    "GROUP BY state").fetchall()
        return {r[0]: r[1] for r in rows}

    def rows(self) -> list[Row]:
        """Every row, oldest first (for tests and people)."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM notifications ORDER BY id").fetchall()
        return [_row(r) for r in rows]


def _row(r: sqlite3.Row) -> Row:
    return Row(id=r["id"], delivery=r["delivery"], source=r["source"], event=r["event"],
               project=r["project"], kind=r["kind"], address=r["address"], format=r["format"],
               secret=Path(r["secret"]) if r["secret"] else None, facts=json.loads(r["facts"]),
               state=r["state"], attempts=r["attempts"], created_at=r["created_at"],
               next_at=r["next_at"], sent_at=r["sent_at"], last_error=r["last_error"])


def _lanes_not_in(lanes: Iterable[str]) -> tuple[str, list[str]]:
    """The SQL condition (and its parameters) that leaves out the rows of
    ``lanes`` (``kind:address``); empty when there are none."""
    listed = list(lanes)
    if not listed:
        return "", listed
    return (" AND (kind || ':' || address) NOT IN (" + ", ".join("?" for _ in listed) + ")",
            listed)

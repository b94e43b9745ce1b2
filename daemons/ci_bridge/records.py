"""The CI bridge's record of every build it was asked for, in the state
database (table ``ci_builds``), so that nothing is dropped or built twice
across restarts.

A build goes ``pending`` (a push asked for it; recorded before the push is
acknowledged) -> ``queued`` (the CI server took it; its handle is kept) ->
``started`` -> ``finished`` (with the result), or ``superseded`` (a newer
push of the same ref came before it was triggered) or ``error`` (the CI
server refused it, or cancelled it in its queue). ``announced`` is the
last state published as a ``ci.build`` event: events go out in order, each
once (a crash between publishing and recording it sends it again; the
orchestrator's auto-deploy is idempotent by build).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import JSON, DateTime, Float, Integer, String, Text, select, update
from sqlalchemy.orm import Mapped, mapped_column

from deploybus.store import Base, Store, _aware, utcnow

#: Build states; the last three are final.
PENDING, QUEUED, STARTED, FINISHED, SUPERSEDED, ERROR = (
    "pending", "queued", "started", "finished", "superseded", "error")
FINAL = frozenset({FINISHED, SUPERSEDED, ERROR})
#: Order in which a build's events go out.
ORDER = {PENDING: 0, QUEUED: 1, STARTED: 2, FINISHED: 3, SUPERSEDED: 3, ERROR: 3}


class CiBuildRow(Base):
    __tablename__ = "ci_builds"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    #: The git.push message that asked for it (with project and ref: a push of
    #: several refs asks for several builds): one build per push and ref.
    push_id: Mapped[str] = mapped_column(String(64), index=True)
    project: Mapped[str] = mapped_column(String(64), index=True)
    ref: Mapped[str] = mapped_column(String(250))
    commit: Mapped[str] = mapped_column(String(64))
    server: Mapped[str] = mapped_column(String(64))
    job: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16), index=True)
    announced: Mapped[str | None] = mapped_column(String(16), nullable=True)
    handle: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[str | None] = mapped_column(String(32), nullable=True)
    number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    url: Mapped[str | None] = mapped_column(Text, nullable=True)
    duration: Mapped[float | None] = mapped_column(Float, nullable=True)
    console_tail: Mapped[list[str]] = mapped_column(JSON, default=list)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: A pending build is triggered once this passes (the burst of pushes
    #: of one ref settles first).
    due: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Builds:
    """The ``ci_builds`` table of ``store``'s database."""

    def __init__(self, store: Store) -> None:
        self.store = store
        CiBuildRow.__table__.create(store.engine, checkfirst=True)  # type: ignore[attr-defined]

    def record(self, *, push_id: str, project: str, ref: str, commit: str, server: str,
               job: str, settle: float) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """Record the build a push asks for, due after ``settle`` seconds; the
        pending builds of the same project, ref and job it makes pointless
        are superseded. Returns (the new build, or None if this push was
        already recorded (a redelivery)), and the builds it superseded."""
        now = utcnow()
        with self.store.session.begin() as s:
            known = s.scalars(select(CiBuildRow).where(
                CiBuildRow.push_id == push_id, CiBuildRow.project == project,
                CiBuildRow.ref == ref)).first()
            if known is not None:
                return None, []
            older = list(s.scalars(select(CiBuildRow).where(
                CiBuildRow.project == project, CiBuildRow.ref == ref, CiBuildRow.job == job,
                CiBuildRow.state == PENDING)))
            for row in older:
                row.state, row.updated_at = SUPERSEDED, now
                row.reason = f"superseded by {commit[:12]}, pushed to {ref} before it was built"
            row = CiBuildRow(push_id=push_id, project=project, ref=ref, commit=commit,
                             server=server, job=job, state=PENDING, handle={},
                             console_tail=[], due=now + timedelta(seconds=settle),
                             created_at=now, updated_at=now)
            s.add(row)
            s.flush()
            return self._dict(row), [self._dict(r) for r in older]

    def due(self) -> list[dict[str, Any]]:
        """Pending builds whose settle time has passed, oldest first."""
        with self.store.session() as s:
            rows = s.scalars(select(CiBuildRow).where(CiBuildRow.state == PENDING,
                                                      CiBuildRow.due <= utcnow())
                             .order_by(CiBuildRow.id))
            return [self._dict(r) for r in rows]

    def active(self) -> list[dict[str, Any]]:
        """Builds the CI server has and that did not finish: to poll."""
        with self.store.session() as s:
            rows = s.scalars(select(CiBuildRow).where(CiBuildRow.state.in_((QUEUED, STARTED)))
                             .order_by(CiBuildRow.id))
            return [self._dict(r) for r in rows]

    def unannounced(self) -> list[dict[str, Any]]:
        """Builds whose latest state was not published yet, oldest first."""
        with self.store.session() as s:
            rows = s.scalars(select(CiBuildRow).where(
                (CiBuildRow.announced.is_(None)) | (CiBuildRow.announced != CiBuildRow.state))
                .order_by(CiBuildRow.id))
            return [self._dict(r) for r in rows]

    def next_due(self) -> datetime | None:
        with self.store.session() as s:
            t = s.scalars(select(CiBuildRow.due).where(CiBuildRow.state == PENDING)
                          .order_by(CiBuildRow.due).limit(1)).first()
            return _aware(t) if t is not None else None

    def set(self, build_id: int, **fields: Any) -> None:
        with self.store.engine.begin() as conn:
            conn.execute(update(CiBuildRow).where(CiBuildRow.id == build_id)
                         .values(**fields, updated_at=utcnow()))

    def get(self, build_id: int) -> dict[str, Any] | None:
        with self.store.session() as s:
            row = s.get(CiBuildRow, build_id)
            return self._dict(row) if row is not None else None

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        with self.store.session() as s:
            rows = s.scalars(select(CiBuildRow).order_by(CiBuildRow.id.desc()).limit(limit))
            return [self._dict(r) for r in rows]

    @staticmethod
    def _dict(r: CiBuildRow) -> dict[str, Any]:
        return {"id": r.id, "push_id": r.push_id, "project": r.project, "ref": r.ref,
                "commit": r.commit, "server": r.server, "job": r.job, "state": r.state,
                "announced": r.announced, "handle": r.handle or {}, "result": r.result,
                "number": r.number, "url": r.url, "duration": r.duration,
                "console_tail": r.console_tail or [], "reason": r.reason,
                "due": _aware(r.due).isoformat(),
                "created_at": _aware(r.created_at).isoformat()}

"""Rollout state, per-host steps, logs and host presence (SQLAlchemy).

SQLite file by default, PostgreSQL in production. The orchestrator writes;
the web front end and the CLI read. Every write is one short transaction, so
several processes can share one database.

No SQLAlchemy error leaves a :class:`Store` method: each one is translated
into :class:`StoreError` naming the database (credentials redacted), the
method and the driver's reason. Free text written here (reasons, step
messages, log lines) is stored with URL credentials redacted, so no page,
API answer or ``deploybus history`` shows one, whoever sent it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

from deploybus import redact
from deploybus.errors import StoreError  # still importable from here
from deploybus.states import (  # noqa: F401 - re-exported
    FINAL_STATES,
    ROLLOUT_STATES,
    SETTLED_STEPS,
)

#: Characters of a driver's error message kept in a StoreError.
MAX_REASON = 500

T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Rollout(Base):
    __tablename__ = "rollouts"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project: Mapped[str] = mapped_column(String(64), index=True)
    environment: Mapped[str] = mapped_column(String(64), index=True)
    ref: Mapped[str] = mapped_column(String(200))
    user: Mapped[str] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    action: Mapped[str] = mapped_column(String(16), default="deploy")
    target_release: Mapped[str | None] = mapped_column(String(128), nullable=True)
    #: The full commit id a deploy's ref resolved to (its requests sign it).
    commit: Mapped[str | None] = mapped_column(String(64), nullable=True)
    strategy: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    override: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    steps: Mapped[list[HostStep]] = relationship(back_populates="rollout",
                                                  order_by="HostStep.position")


class HostStep(Base):
    __tablename__ = "host_steps"
    __table_args__ = (UniqueConstraint("rollout_id", "host"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id"), index=True)
    host: Mapped[str] = mapped_column(String(64))
    position: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    release: Mapped[str | None] = mapped_column(String(128), nullable=True)
    commit: Mapped[str | None] = mapped_column(String(64), nullable=True)
    previous_release: Mapped[str | None] = mapped_column(String(128), nullable=True)
    rolled_back: Mapped[str | None] = mapped_column(String(16), nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    rollout: Mapped[Rollout] = relationship(back_populates="steps")


class Lock(Base):
    """One rollout per project and environment; also held by hand (rollout_id None)."""

    __tablename__ = "locks"
    project: Mapped[str] = mapped_column(String(64), primary_key=True)
    environment: Mapped[str] = mapped_column(String(64), primary_key=True)
    rollout_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    owner: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text)
    acquired_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AuditEntry(Base):
    """Append-only trail of who asked for what and what was decided."""

    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(32))
    project: Mapped[str | None] = mapped_column(String(64), nullable=True)
    environment: Mapped[str | None] = mapped_column(String(64), nullable=True)
    rollout_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class LogLine(Base):
    __tablename__ = "rollout_logs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[str] = mapped_column(String(64), index=True)
    host: Mapped[str] = mapped_column(String(64))
    step: Mapped[str] = mapped_column(String(32))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    text: Mapped[str] = mapped_column(Text)


class Host(Base):
    """What the host's keepalive last said: the release of each project there."""

    __tablename__ = "hosts"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class HostDaemon(Base):
    """The last heartbeat of each daemon on each host (see deploybus.liveness)."""

    __tablename__ = "host_daemons"
    host: Mapped[str] = mapped_column(String(64), primary_key=True)
    daemon: Mapped[str] = mapped_column(String(32), primary_key=True)
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    interval: Mapped[float] = mapped_column(Float)
    version: Mapped[str | None] = mapped_column(String(32), nullable=True)


def _aware(t: datetime) -> datetime:
    # SQLite returns naive datetimes even for timezone=True columns.
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t


def _clean(value: Any) -> Any:
    """``value`` with URL credentials redacted if it is text."""
    return redact.text(value) if isinstance(value, str) else value


def _reason(exc: BaseException) -> str:
    """The first line of the driver's own words, without credentials: not the
    SQL statement and parameters SQLAlchemy appends, nor the statement
    PostgreSQL quotes on the next lines (they hold the data)."""
    orig = getattr(exc, "orig", None)
    what = orig if isinstance(orig, BaseException) else exc
    first = next((line.strip() for line in str(what).splitlines() if line.strip()), "")
    return redact.text(f"{type(what).__name__}: {first}")[:MAX_REASON]


def _translate_errors(cls: type[T]) -> type[T]:
    """Wrap every public method of ``cls`` so that a SQLAlchemy error becomes
    a :class:`StoreError`: callers (daemon loops, the web) catch only the
    error tree, and a method added later is covered without thinking of it."""
    def wrap(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def translated(self: Store, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except SQLAlchemyError as exc:
                raise StoreError(f"state database {redact.url(self.url)}: {name} failed: "
                                 f"{_reason(exc)}") from None
        return translated

    for name, member in list(vars(cls).items()):
        if not name.startswith("_") and inspect.isfunction(member):
            setattr(cls, name, wrap(name, member))
    return cls


@_translate_errors
class Store:
    """Short transactions over the state database at ``url``."""

    def __init__(self, url: str) -> None:
        self.url = url
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        try:
            self.engine = create_engine(url, **kwargs)
            if url.startswith("sqlite"):
                event.listen(self.engine, "connect", self._sqlite_pragmas)
            Base.metadata.create_all(self.engine)
            self._add_missing_columns()
        except (SQLAlchemyError, ImportError) as exc:
            # ImportError: the URL names a driver that is not installed (psycopg2).
            raise StoreError(f"cannot open state database {redact.url(url)}: "
                             f"{_reason(exc)}") from None
        self.session = sessionmaker(self.engine, expire_on_commit=False)

    def _add_missing_columns(self) -> None:
        """The one kind of migration this store needs so far: a column added
        to a table that an older deploybus created (create_all makes missing
        tables, not missing columns). Added columns are always nullable."""
        from sqlalchemy import inspect as sa_inspect
        from sqlalchemy import text
        have = sa_inspect(self.engine)
        for table in Base.metadata.sorted_tables:
            present = {c["name"] for c in have.get_columns(table.name)}
            for column in table.columns:
                if column.name in present:
                    continue
                kind = column.type.compile(dialect=self.engine.dialect)
                with self.engine.begin() as conn:
                    conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" '
                                      f'{kind}'))

    @staticmethod
    def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    # -- writes (orchestrator) ---------------------------------------------------

    def create_rollout(self, *, id: str, project: str, environment: str, ref: str, user: str,
                       hosts: list[str], state: str = "queued", reason: str | None = None,
                       action: str = "deploy", target_release: str | None = None,
                       commit: str | None = None, strategy: dict[str, Any] | None = None,
                       override: str | None = None) -> bool:
        """Record a new rollout; False if ``id`` already exists (a redelivery)."""
        with self.session.begin() as s:
            if s.get(Rollout, id) is not None:
                return False
            s.add(Rollout(id=id, project=project, environment=environment, ref=ref, user=user,
                          state=state, reason=_clean(reason), action=action,
                          target_release=target_release, commit=commit,
                          strategy=strategy or {}, override=_clean(override)))
            for i, h in enumerate(hosts):
                s.add(HostStep(rollout_id=id, host=h, position=i))
        return True

    # The frequent writes are single UPDATE statements (SQLAlchemy Core), not
    # load-modify-flush through the ORM: a rollout makes several per host.

    def set_rollout(self, id: str, *, state: str, reason: str | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(Rollout).where(Rollout.id == id)
                         .values(state=state, reason=_clean(reason), updated_at=utcnow()))

    def set_step(self, rollout_id: str, host: str, **fields: Any) -> None:
        self.set_steps(rollout_id, [host], **fields)

    def set_steps(self, rollout_id: str, hosts: list[str], **fields: Any) -> None:
        """Set ``fields`` on the steps of ``hosts``, in one transaction."""
        if not hosts:
            return
        with self.engine.begin() as conn:
            conn.execute(update(HostStep).where(HostStep.rollout_id == rollout_id,
                                                HostStep.host.in_(hosts))
                         .values(**{k: _clean(v) for k, v in fields.items()},
                                 updated_at=utcnow()))

    def steps(self, rollout_id: str) -> dict[str, dict[str, Any]]:
        with self.session() as s:
            return {st.host: {"state": st.state, "release": st.release, "commit": st.commit,
                              "previous_release": st.previous_release,
                              "rolled_back": st.rolled_back, "position": st.position,
                              "message": st.message}
                    for st in s.scalars(select(HostStep).where(HostStep.rollout_id == rollout_id)
                                        .order_by(HostStep.position))}

    def active_rollouts(self) -> list[dict[str, Any]]:
        """Rollouts not in a final state: what a restarted orchestrator resumes."""
        with self.session() as s:
            rows = s.scalars(select(Rollout).where(Rollout.state.not_in(FINAL_STATES))
                             .order_by(Rollout.created_at))
            return [self._rollout_dict(r) for r in rows]

    def acquire_lock(self, *, project: str, environment: str, owner: str, reason: str,
                     ttl: float, rollout_id: str | None = None) -> dict[str, Any] | None:
        """Take the lock; None if taken, else the holder's lock (not ours)."""
        now = utcnow()
        try:
            with self.session.begin() as s:
                lock = s.get(Lock, (project, environment), with_for_update=True)
                if lock is not None and _aware(lock.expires_at) > now:
                    holder = s.get(Rollout, lock.rollout_id) if lock.rollout_id else None
                    if holder is None and lock.rollout_id is not None \
                            or holder is not None and holder.state in FINAL_STATES:
                        pass  # stale: its rollout ended without releasing it
                    elif lock.rollout_id is None or lock.rollout_id != rollout_id:
                        return self._lock_dict(lock)
                if lock is not None:
                    s.delete(lock)
                    s.flush()
                s.add(Lock(project=project, environment=environment, rollout_id=rollout_id,
                           owner=owner, reason=_clean(reason), acquired_at=now,
                           expires_at=now + timedelta(seconds=ttl)))
        except IntegrityError:
            # Another orchestrator took it between our read and insert.
            held = self.lock(project, environment)
            return held or {"owner": "unknown", "reason": "lock race", "rollout": None}
        return None

    def release_lock(self, project: str, environment: str, *,
                     rollout_id: str | None = None) -> bool:
        """Release; with ``rollout_id`` only a lock that rollout holds."""
        with self.session.begin() as s:
            lock = s.get(Lock, (project, environment))
            if lock is None or rollout_id is not None and lock.rollout_id != rollout_id:
                return False
            s.delete(lock)
            return True

    def lock(self, project: str, environment: str) -> dict[str, Any] | None:
        with self.session() as s:
            lock = s.get(Lock, (project, environment))
            return self._lock_dict(lock) if lock is not None else None

    def locks(self) -> list[dict[str, Any]]:
        with self.session() as s:
            return [self._lock_dict(x) for x in s.scalars(select(Lock))]

    @staticmethod
    def _lock_dict(lock: Lock) -> dict[str, Any]:
        return {"project": lock.project, "environment": lock.environment,
                "rollout": lock.rollout_id, "owner": lock.owner, "reason": lock.reason,
                "acquired_at": _aware(lock.acquired_at).isoformat(),
                "expires_at": _aware(lock.expires_at).isoformat()}

    def audit(self, *, actor: str, action: str, project: str | None = None,
              environment: str | None = None, rollout_id: str | None = None,
              **detail: Any) -> None:
        with self.session.begin() as s:
            s.add(AuditEntry(actor=actor, action=action, project=project,
                             environment=environment, rollout_id=rollout_id,
                             detail={k: _clean(v) for k, v in detail.items()}))

    def audit_trail(self, limit: int = 100) -> list[dict[str, Any]]:
        with self.session() as s:
            rows = s.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit))
            return [{"at": _aware(a.at).isoformat(), "actor": a.actor, "action": a.action,
                     "project": a.project, "environment": a.environment,
                     "rollout": a.rollout_id, "detail": a.detail} for a in rows]

    def add_log(self, rollout_id: str, host: str, step: str, text: str) -> None:
        self.add_logs(rollout_id, host, [(step, text)])

    def add_logs(self, rollout_id: str, host: str, lines: list[tuple[str, str]]) -> None:
        """Append ``(step, text)`` lines of one host, in one transaction."""
        if not lines:
            return
        at = utcnow()
        with self.engine.begin() as conn:
            conn.execute(insert(LogLine), [{"rollout_id": rollout_id, "host": host,
                                            "step": step, "text": _clean(text), "at": at}
                                           for step, text in lines])

    def record_presence(self, name: str, info: dict[str, Any], *,
                        daemon: str = "keepalive") -> None:
        """A heartbeat of ``daemon`` on host ``name``; the keepalive's ``info``
        (what runs there) is kept as the host's."""
        now = utcnow()
        interval = info.get("interval")
        if isinstance(interval, bool) or not isinstance(interval, int | float) \
                or not 0 < interval < 86400:
            interval = 10.0
        version = info.get("version")
        with self.session.begin() as s:
            d = s.get(HostDaemon, (name, daemon))
            if d is None:
                s.add(HostDaemon(host=name, daemon=daemon, last_seen=now,
                                 interval=float(interval),
                                 version=str(version)[:32] if version else None))
            else:
                d.last_seen, d.interval = now, float(interval)
                d.version = str(version)[:32] if version else None
            if daemon == "keepalive":
                h = s.get(Host, name)
                if h is None:
                    s.add(Host(name=name, last_seen=now, info=info))
                else:
                    h.last_seen, h.info = now, info

    # -- reads (web, CLI) ----------------------------------------------------------

    def rollout(self, id: str) -> dict[str, Any] | None:
        with self.session() as s:
            r = s.get(Rollout, id)
            if r is None:
                return None
            logs = s.scalars(select(LogLine).where(LogLine.rollout_id == id)
                             .order_by(LogLine.id)).all()
            return self._rollout_dict(r) | {
                "logs": [{"host": ln.host, "step": ln.step, "at": _aware(ln.at).isoformat(),
                          "text": ln.text} for ln in logs]}

    def last_release(self, project: str, host: str, *, before: str) -> str | None:
        """The release the newest rollout of ``project`` other than ``before``
        (and created before it) left on ``host``: what the orchestrator's own
        records say runs there, for switching it back."""
        with self.session() as s:
            this = s.get(Rollout, before)
            q = (select(HostStep.release).join(Rollout)
                 .where(Rollout.project == project, HostStep.host == host,
                        HostStep.state == "succeeded", HostStep.release.is_not(None),
                        Rollout.id != before)
                 .order_by(Rollout.created_at.desc()).limit(1))
            if this is not None:
                q = q.where(Rollout.created_at <= this.created_at)
            return s.scalars(q).first()

    def running_commit(self, project: str, environment: str) -> str | None:
        """The commit the newest deploy of ``project`` to ``environment`` that
        went through (succeeded or partial) rolled out: what runs there now,
        as far as the orchestrator's records tell."""
        with self.session() as s:
            return s.scalars(select(Rollout.commit).where(
                Rollout.project == project, Rollout.environment == environment,
                Rollout.action == "deploy", Rollout.commit.is_not(None),
                Rollout.state.in_(("succeeded", "partial")))
                .order_by(Rollout.created_at.desc()).limit(1)).first()

    def rollouts(self, limit: int = 50) -> list[dict[str, Any]]:
        with self.session() as s:
            rows = s.scalars(select(Rollout).order_by(Rollout.created_at.desc()).limit(limit))
            return [self._rollout_dict(r) for r in rows]

    def hosts(self) -> list[dict[str, Any]]:
        """Every host any daemon was heard from: ``{name, last_seen, age, info,
        daemons: {daemon: {last_seen, age, interval, version}}}``; ``info`` is
        what its keepalive said (``{}`` if none did). Judge them with
        :func:`deploybus.liveness.judge`."""
        with self.session() as s:
            infos = {h.name: h for h in s.scalars(select(Host))}
            daemons: dict[str, dict[str, dict[str, Any]]] = {}
            for d in s.scalars(select(HostDaemon)):
                daemons.setdefault(d.host, {})[d.daemon] = self._daemon_dict(d)
        return [self._host_dict(name, infos.get(name), daemons.get(name, {}))
                for name in sorted(set(infos) | set(daemons))]

    def host(self, name: str) -> dict[str, Any] | None:
        """One host's presence record, or None if no daemon of it was ever heard."""
        with self.session() as s:
            h = s.get(Host, name)
            daemons = {d.daemon: self._daemon_dict(d) for d in
                       s.scalars(select(HostDaemon).where(HostDaemon.host == name))}
        if h is None and not daemons:
            return None
        return self._host_dict(name, h, daemons)

    @staticmethod
    def _daemon_dict(d: HostDaemon) -> dict[str, Any]:
        return {"last_seen": _aware(d.last_seen).isoformat(),
                "age": (utcnow() - _aware(d.last_seen)).total_seconds(),
                "interval": d.interval, "version": d.version}

    @staticmethod
    def _host_dict(name: str, h: Host | None,
                   daemons: dict[str, dict[str, Any]]) -> dict[str, Any]:
        # A host heard only before daemons had their own heartbeats: its keepalive.
        if h is not None and "keepalive" not in daemons:
            daemons = daemons | {"keepalive": {
                "last_seen": _aware(h.last_seen).isoformat(),
                "age": (utcnow() - _aware(h.last_seen)).total_seconds(),
                "interval": (h.info or {}).get("interval") or 10.0,
                "version": (h.info or {}).get("version")}}
        newest = min(daemons.values(), key=lambda d: d["age"])
        return {"name": name, "last_seen": newest["last_seen"], "age": newest["age"],
                "info": h.info if h is not None else {}, "daemons": daemons}

    @staticmethod
    def _rollout_dict(r: Rollout) -> dict[str, Any]:
        return {
            "id": r.id, "project": r.project, "environment": r.environment, "ref": r.ref,
            "user": r.user, "state": r.state, "reason": r.reason, "action": r.action,
            "target_release": r.target_release, "commit": r.commit, "strategy": r.strategy,
            "override": r.override, "created_at": _aware(r.created_at).isoformat(),
            "updated_at": _aware(r.updated_at).isoformat(),
            "hosts": [{"host": st.host, "state": st.state, "release": st.release,
                       "commit": st.commit, "previous_release": st.previous_release,
                       "rolled_back": st.rolled_back, "message": st.message}
                      for st in r.steps],
        }

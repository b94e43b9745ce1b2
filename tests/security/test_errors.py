"""One error tree: every error class lives in deploybus/errors.py, and the
store lets no SQLAlchemy error out, only :class:`StoreError` with a message
that names the database (credentials redacted), the method and the reason.

Failures are real: a database file that is not a database or not a file
any more, dropped tables, a PostgreSQL that is not listening (the tests run
as root, for whom a chmod'ed file stays readable, so "unreadable" is made
with content and file type, not permissions)."""

from __future__ import annotations

import ast
import builtins
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

import deploybus.errors
from deploybus.errors import DeployBusError, StoreError
from deploybus.store import Store
from tests.conftest import require
from tests.faults.proxy import FaultProxy

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PG = ("127.0.0.1", 5432)

#: Exception classes allowed outside errors.py, and why.
ALLOWED = {
    # Raised and caught inside the web app only, in the deploy form's words;
    # it derives from DeployBusError.
    ("frontend/app.py", "FieldError"): "DeployBusError",
    # Not an error: the orchestrator's shutdown signal, unwinding a rollout
    # thread. Were it a DeployBusError, the `except DeployBusError` of a
    # daemon loop would swallow a shutdown.
    ("daemons/orchestrator/rollout.py", "Stopping"): "Exception",
    # The same, for the notifier's handler waiting on its database.
    ("daemons/notifier/service.py", "_Stopping"): "Exception",
}

BUILTIN_EXCEPTIONS = {name for name, obj in vars(builtins).items()
                      if isinstance(obj, type) and issubclass(obj, BaseException)}
TREE = {name for name, obj in vars(deploybus.errors).items()
        if isinstance(obj, type) and issubclass(obj, DeployBusError)}


def exception_classes() -> Iterator[tuple[str, str, str]]:
    """(file, class, base) for every class of deploybus/, daemons/, frontend/
    that derives from a built-in exception, from the error tree, or from
    anything named like an error."""
    for top in ("deploybus", "daemons", "frontend"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(path.read_text(), rel)):
                if not isinstance(node, ast.ClassDef):
                    continue
                for base in node.bases:
                    name = base.attr if isinstance(base, ast.Attribute) else \
                        base.id if isinstance(base, ast.Name) else ""
                    if name in BUILTIN_EXCEPTIONS or name in TREE or \
                            name.endswith(("Error", "Exception")):
                        yield rel, node.name, name


def test_every_error_class_is_in_errors_py() -> None:
    found = {(rel, cls): base for rel, cls, base in exception_classes()
             if rel != "deploybus/errors.py"}
    stray = {k: v for k, v in found.items() if ALLOWED.get(k) != v}
    assert not stray, ("define error classes in deploybus/errors.py (and import them where "
                       f"they are raised): {stray}")


def test_the_tree_has_one_root_and_old_names_still_import() -> None:
    from deploybus.haproxy import HAProxyError
    from deploybus.store import StoreError as StoreErrorFromStore
    from deploybus.strategy import StrategyError
    from deploybus.windows import WindowError
    assert StoreErrorFromStore is StoreError
    for cls in (StoreError, StrategyError, WindowError, HAProxyError):
        assert cls.__module__ == "deploybus.errors" and issubclass(cls, DeployBusError)
    for name in TREE:
        assert issubclass(getattr(deploybus.errors, name), DeployBusError)


# -- the store --------------------------------------------------------------------------

#: One call of every public Store method: reads and writes.
CALLS: dict[str, Callable[[Store], Any]] = {
    "create_rollout": lambda s: s.create_rollout(id="r9", project="app", environment="prod",
                                                 ref="v1", user="u", hosts=["a"]),
    "set_rollout": lambda s: s.set_rollout("r1", state="failed", reason="x"),
    "set_step": lambda s: s.set_step("r1", "a", state="failed"),
    "set_steps": lambda s: s.set_steps("r1", ["a"], state="failed"),
    "steps": lambda s: s.steps("r1"),
    "active_rollouts": lambda s: s.active_rollouts(),
    "acquire_lock": lambda s: s.acquire_lock(project="app", environment="prod", owner="u",
                                             reason="x", ttl=60),
    "release_lock": lambda s: s.release_lock("app", "prod"),
    "lock": lambda s: s.lock("app", "prod"),
    "locks": lambda s: s.locks(),
    "audit": lambda s: s.audit(actor="u", action="deploy", secret="leaked-data"),
    "audit_trail": lambda s: s.audit_trail(),
    "last_release": lambda s: s.last_release("app", "a", before="r1"),
    "running_commit": lambda s: s.running_commit("app", "prod"),
    "add_log": lambda s: s.add_log("r1", "a", "fetch", "leaked-data"),
    "add_logs": lambda s: s.add_logs("r1", "a", [("fetch", "leaked-data")]),
    "record_presence": lambda s: s.record_presence("a", {"interval": 5}),
    "rollout": lambda s: s.rollout("r1"),
    "rollouts": lambda s: s.rollouts(),
    "hosts": lambda s: s.hosts(),
    "host": lambda s: s.host("a"),
}


def test_calls_cover_every_public_method() -> None:
    import inspect
    public = {n for n, m in vars(Store).items() if not n.startswith("_") and inspect.isfunction(m)}
    assert public == set(CALLS)


def seed(store: Store) -> None:
    store.create_rollout(id="r1", project="app", environment="prod", ref="v1", user="u",
                         hosts=["a"])
    store.record_presence("a", {"interval": 5})


#: Methods that are another one for a single item: its name is in the message.
SINGLE = {"set_step": "set_steps", "add_log": "add_logs"}


def assert_every_call_fails_as_store_error(store: Store, shown_url: str, secret: str = "") -> None:
    for name, call in CALLS.items():
        with pytest.raises(StoreError) as info:
            call(store)
        message = str(info.value)
        name = SINGLE.get(name, name)
        assert message.startswith(f"state database {shown_url}: {name} failed: "), message
        assert "\n" not in message and "LINE 1" not in message, message
        assert "leaked-data" not in message and "[SQL:" not in message, message
        assert not secret or secret not in message, message
        assert info.value.__cause__ is None and info.value.__suppress_context__


def test_a_file_that_is_not_a_database_any_more(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = Store(f"sqlite:///{path}")
    seed(store)
    store.engine.dispose()
    for extra in tmp_path.glob("state.db-*"):
        extra.unlink()
    path.write_bytes(b"this is not a database\n" * 512)
    assert_every_call_fails_as_store_error(store, f"sqlite:///{path}")
    with pytest.raises(StoreError, match="cannot open state database sqlite:///.*file is not a "
                                         "database"):
        Store(f"sqlite:///{path}")


def test_a_database_file_replaced_by_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = Store(f"sqlite:///{path}")
    seed(store)
    store.engine.dispose()
    for p in tmp_path.glob("state.db*"):
        p.unlink()
    path.mkdir()
    assert_every_call_fails_as_store_error(store, f"sqlite:///{path}")


def drop_tables(store: Store) -> None:
    cascade = "" if store.url.startswith("sqlite") else " CASCADE"
    with store.engine.begin() as conn:
        for table in ("rollout_logs", "host_steps", "rollouts", "locks", "audit", "hosts",
                      "host_daemons"):
            conn.execute(text(f"DROP TABLE {table}{cascade}"))


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A throwaway PostgreSQL database; its name."""
    require(PG, "PostgreSQL")
    import psycopg2
    name = f"deploybus_err_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(host=PG[0], port=PG[1], user="postgres", dbname="postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_dropped_tables(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if kind == "sqlite":
        url = shown = f"sqlite:///{tmp_path / 'state.db'}"
    else:
        db = request.getfixturevalue("pg_database")
        url = f"postgresql+psycopg2://postgres:pgS3cret@{PG[0]}:{PG[1]}/{db}"
        shown = f"postgresql+psycopg2://postgres:***@{PG[0]}:{PG[1]}/{db}"
    store = Store(url)
    try:
        seed(store)
        drop_tables(store)
        assert_every_call_fails_as_store_error(store, shown, "pgS3cret")
    finally:
        store.engine.dispose()


def test_postgresql_on_a_closed_port(pg_database: str) -> None:
    """Opened through a proxy that then goes away: the connections in the pool
    break, new ones are refused; and a store opened on the closed port."""
    proxy = FaultProxy(PG)
    url = f"postgresql+psycopg2://postgres:pgS3cret@127.0.0.1:{proxy.port}/{pg_database}"
    store = Store(url)
    try:
        seed(store)
        proxy.listener.shutdown(socket.SHUT_RDWR)  # wakes its accept(): the port is closed
        proxy.close()
        assert_every_call_fails_as_store_error(
            store, f"postgresql+psycopg2://postgres:***@127.0.0.1:{proxy.port}/{pg_database}",
            "pgS3cret")
        with pytest.raises(StoreError) as info:
            Store(url)
        assert str(info.value).startswith(
            f"cannot open state database postgresql+psycopg2://postgres:***@127.0.0.1:"
            f"{proxy.port}/{pg_database}: OperationalError: connection to server")
        assert "pgS3cret" not in str(info.value)
    finally:
        proxy.close()
        store.engine.dispose()


@pytest.mark.parametrize("url, says", [
    ("mysql+nosuchdriver://u:pw@h/db", "mysql+nosuchdriver://u:***@h/db: NoSuchModuleError"),
    ("postgresql+pg8000://u:pw@h/db", "postgresql+pg8000://u:***@h/db: ModuleNotFoundError: "
                                      "No module named 'pg8000'"),
    ("not a url", "not a url: ArgumentError"),
])
def test_a_url_that_cannot_be_opened_is_a_store_error(url: str, says: str) -> None:
    with pytest.raises(StoreError) as info:
        Store(url)
    assert str(info.value).startswith(f"cannot open state database {says}")

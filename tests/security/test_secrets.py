"""Credentials in URLs never leave: :mod:`deploybus.redact` on the URL shapes
people really write (git over https with a token, brokers, databases), inside
the messages git and the drivers really print, and the log set-up that runs
it over every line."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Callable, Iterator

import pytest
import structlog

from deploybus import log, redact
from deploybus.bus import redact as bus_redact

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("raw, shown", [
    # GitHub: a token as the user, or as the password of x-access-token / a name
    ("https://ghp_16C7e42F292c6912E7710c838347Ae178B4a@github.com/acme/app.git",
     "https://***@github.com/acme/app.git"),
    ("https://x-access-token:ghs_abcdefABCDEF0123456789@github.com/acme/app.git",
     "https://x-access-token:***@github.com/acme/app.git"),
    ("https://ci:github_pat_11AAAA_bbbb@github.com/acme/app.git/",
     "https://ci:***@github.com/acme/app.git/"),
    # GitLab deploy token with a port, a path and a query
    ("https://oauth2:glpat-xxxxxxxxxxxxxxxxxxxx@gitlab.example.com:8443/g/app.git?ref=main",
     "https://oauth2:***@gitlab.example.com:8443/g/app.git?ref=main"),
    # percent-encoded characters in the user and the password
    ("https://ann%40corp.example:p%40ss%3Aw%2Frd@git.example/app.git",
     "https://ann%40corp.example:***@git.example/app.git"),
    # an "@" left unencoded in the password: everything up to the last "@" is secret
    ("https://deploy:p@ss@git.example/app.git", "https://deploy:***@git.example/app.git"),
    # a colon inside the password
    ("https://deploy:a:b:c@git.example/app.git", "https://deploy:***@git.example/app.git"),
    ("HTTPS://TOKEN123@git.example/app.git", "HTTPS://***@git.example/app.git"),
    ("git+https://tok@git.example/app.git", "git+https://***@git.example/app.git"),
    # brokers and databases: the password, never the user name
    ("amqp://guest:guest@127.0.0.1:5672/deploybus?prefix=",
     "amqp://guest:***@127.0.0.1:5672/deploybus?prefix="),
    ("amqps://svc:s3cr3t@mq.example:5671/%2F", "amqps://svc:***@mq.example:5671/%2F"),
    ("stomp+ssl://admin:hunter2@activemq.example:61614/",
     "stomp+ssl://admin:***@activemq.example:61614/"),
    ("stomp://admin:hunter2@[::1]:61613", "stomp://admin:***@[::1]:61613"),
    ("postgresql+psycopg2://deploybus:pw@db.example:5432/deploybus",
     "postgresql+psycopg2://deploybus:***@db.example:5432/deploybus"),
])
def test_url_hides_the_secret_and_keeps_the_rest(raw: str, shown: str) -> None:
    assert redact.url(raw) == shown
    assert redact.text(raw) == shown
    assert redact.url(shown) == shown, "idempotent"


@pytest.mark.parametrize("raw", [
    "git@github.com:acme/app.git",               # scp-like: no scheme, no password
    "deploy@git.example:/srv/git/app.git",
    "ssh://git@github.com/acme/app.git",         # ssh: the user is a name
    "ssh://git@github.com:2222/acme/app.git",
    "amqp://guest@127.0.0.1//",                  # a user without password elsewhere: a name
    "postgresql+psycopg2://postgres@127.0.0.1:5432/test",
    "https://github.com/acme/app.git",
    "https://git.example/npm/@scope/pkg",        # an "@" in the path is not a user
    "https://user:@git.example/app.git",         # an empty password hides nothing
    "memory://",
    "/srv/git/app.git",
    "",
])
def test_url_leaves_what_holds_no_secret(raw: str) -> None:
    assert redact.url(raw) == raw
    assert redact.text(raw) == raw


def test_bus_redact_is_the_same_rule() -> None:
    assert bus_redact("amqp://guest:guest@127.0.0.1:5672/vhost?prefix=") == \
        "amqp://guest:***@127.0.0.1:5672/vhost?prefix="
    assert bus_redact("stomp+ssl://u:p@mq:61614/") == "stomp+ssl://u:***@mq:61614/"
    assert bus_redact("memory://x") == "memory://x"


@pytest.mark.parametrize("raw, shown", [
    ("fatal: unable to access 'https://ci:ghp_abc123@github.com/x.git/': The requested URL "
     "returned error: 403",
     "fatal: unable to access 'https://ci:***@github.com/x.git/': The requested URL "
     "returned error: 403"),
    ('Cmd(\'git\') failed due to: exit code(128)\n  cmdline: git fetch -- '
     'https://ghp_tok@github.com/a.git\n  stderr: \'fatal: repository '
     '"https://ghp_tok@github.com/a.git/" not found\'',
     'Cmd(\'git\') failed due to: exit code(128)\n  cmdline: git fetch -- '
     'https://***@github.com/a.git\n  stderr: \'fatal: repository '
     '"https://***@github.com/a.git/" not found\''),
    # several, of different kinds, and plain user@host next to them
    ("mirror https://a:1@h1/x and https://tok@h2/y from deploy@git:repo (amqp://g:pw@mq/)",
     "mirror https://a:***@h1/x and https://***@h2/y from deploy@git:repo (amqp://g:***@mq/)"),
    ("<a href=\"https://u:pw@h/\">", "<a href=\"https://u:***@h/\">"),
    ("url=https://u:pw@h/x,other", "url=https://u:***@h/x,other"),
])
def test_text_redacts_every_url_in_a_message(raw: str, shown: str) -> None:
    assert redact.text(raw) == shown


@pytest.mark.parametrize("raw", [
    "fatal: Could not read from remote repository: git@github.com:acme/app.git",
    "mail ann@example.com about https://github.com/acme/app",
    "deploy@web1 ran: ok",
    "see https://h/x then ann@example.com:secret",
    "a:b@c",
])
def test_text_has_no_false_positives(raw: str) -> None:
    assert redact.text(raw) == raw


def test_text_is_fast_on_long_lines() -> None:
    import time
    lines = ["x" * 200_000 + "://@", ("word " * 40_000) + "https://u:p@h/",
             "https://" + "a" * 200_000 + " @", "x://" * 50_000 + "@"]
    start = time.perf_counter()
    for line in lines:
        redact.text(line)
    assert time.perf_counter() - start < 0.5


def test_deep_redacts_inside_answers() -> None:
    value = {"git": "https://t@h/x", "n": 3, "hosts": [{"m": "amqp://g:pw@mq/"}], "ok": None,
             "pair": ("https://a:b@h/", 1)}
    assert redact.deep(value) == {"git": "https://***@h/x", "n": 3,
                                  "hosts": [{"m": "amqp://g:***@mq/"}], "ok": None,
                                  "pair": ["https://a:***@h/", 1]}


# -- logs ---------------------------------------------------------------------------------

@pytest.fixture
def setup_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], io.StringIO]]:
    """Runs log.setup() as a daemon does (stderr its own, no handlers on the
    root logger yet) and returns what it writes; logging and structlog are
    restored after. Called in the test: pytest swaps stderr and the root
    logger's handlers between a fixture and the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def setup() -> io.StringIO:
        buf = io.StringIO()
        monkeypatch.setattr(sys, "stderr", buf)
        root.handlers = []
        log.setup(json=True, level="debug")
        return buf

    yield setup
    root.handlers, root.level = handlers, level
    structlog.reset_defaults()


def test_no_log_line_carries_a_credential(setup_logs: Callable[[], io.StringIO]) -> None:
    stderr = setup_logs()
    logger = structlog.get_logger("test")
    try:
        raise RuntimeError("fatal: unable to access 'https://ci:ghp_SECRET1@github.com/x.git/'")
    except RuntimeError as exc:
        logger.exception("fetch failed https://SECRET2@github.com/y.git", error=str(exc),
                         url="amqp://guest:SECRET3@mq/", hosts=["https://u:SECRET4@h/"],
                         cause=exc, n=3)
    logging.getLogger("kombu").warning("cannot reach %s", "amqp://guest:SECRET5@mq//")
    try:
        raise ValueError("stomp+ssl://admin:SECRET6@mq:61614/")
    except ValueError:
        logging.getLogger("stomp.py").exception("connect failed")
    out = stderr.getvalue()
    assert "SECRET" not in out, out
    event = json.loads(out.splitlines()[0])
    assert event["event"] == "fetch failed https://***@github.com/y.git"
    assert event["url"] == "amqp://guest:***@mq/" and event["n"] == 3
    assert event["hosts"] == ["https://u:***@h/"]
    assert "https://ci:***@github.com/x.git/" in event["exception"]
    assert "cannot reach amqp://guest:***@mq//" in out
    assert "ValueError: stomp+ssl://admin:***@mq:61614/" in out


def test_redact_event_leaves_clean_events_alone() -> None:
    event = {"event": "deployed", "host": "web1", "n": 2, "ok": True, "path": None}
    assert log.redact_event(None, "info", dict(event)) == event

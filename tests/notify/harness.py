"""Real receivers for the notifier's tests: an HTTP server (http.server in a
thread) that answers as a script says and keeps every request, and an SMTP
server (aiosmtpd) that keeps every message."""

from __future__ import annotations

import email
import email.policy
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.conftest import free_port


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    at: float = field(default_factory=time.monotonic)

    def json(self) -> Any:
        return json.loads(self.body)

    def signed_by(self, secret: bytes) -> bool:
        """What a receiver does: HMAC-SHA256 of the raw body with the shared
        secret, compared in constant time with the header."""
        sent = self.headers.get("X-Deploybus-Signature", "")
        want = "sha256=" + hmac.new(secret, self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(sent, want)


class Receiver:
    """A webhook receiver on 127.0.0.1. ``script[path]`` is a list of
    statuses to answer, in order (then 200); ``delay`` seconds before each
    answer."""

    def __init__(self) -> None:
        self.hits: list[Hit] = []
        self.script: dict[str, list[int]] = {}
        self.delay = 0.0
        self.cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.cond:
                    queue = receiver.script.get(self.path)
                    status = queue.pop(0) if queue else 200
                if receiver.delay:
                    time.sleep(receiver.delay)
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
                with receiver.cond:
                    receiver.hits.append(Hit(self.path, dict(self.headers.items()), body,
                                             status))
                    receiver.cond.notify_all()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def got(self, path: str, status: int | None = 200) -> list[Hit]:
        with self.cond:
            return [h for h in self.hits if h.path == path
                    and (status is None or h.status == status)]

    def wait(self, path: str, n: int = 1, timeout: float = 10.0,
             status: int | None = 200) -> list[Hit]:
        with self.cond:
            self.cond.wait_for(lambda: len([h for h in self.hits if h.path == path and (
                status is None or h.status == status)]) >= n, timeout)
        return self.got(path, status)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Keep:
    def __init__(self, box: Mailbox) -> None:
        self.box = box

    async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:  # noqa: N802
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        with self.box.cond:
            self.box.messages.append((envelope.mail_from, list(envelope.rcpt_tos), msg))
            self.box.cond.notify_all()
        return "250 OK"


class Mailbox:
    """An SMTP server on 127.0.0.1 (aiosmtpd). With ``login`` it takes AUTH
    LOGIN/PLAIN with that (user, password) and records who logged in."""

    def __init__(self, login: tuple[str, str] | None = None) -> None:
        self.messages: list[tuple[str, list[str], EmailMessage]] = []
        self.logins: list[str] = []
        self.cond = threading.Condition()
        self.port = free_port()
        kwargs: dict[str, Any] = {}
        if login is not None:
            def authenticate(_server: Any, _session: Any, _envelope: Any, _mechanism: str,
                             data: Any) -> AuthResult:
                ok = isinstance(data, LoginPassword) and \
                    (data.login.decode(), data.password.decode()) == login
                if ok:
                    self.logins.append(data.login.decode())
                return AuthResult(success=ok)
            kwargs = {"authenticator": authenticate, "auth_require_tls": False,
                      "auth_required": True}
        self.controller = Controller(_Keep(self), hostname="127.0.0.1", port=self.port,
                                     **kwargs)
        self.controller.start()

    def wait(self, n: int = 1, timeout: float = 10.0) -> list[tuple[str, list[str], EmailMessage]]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.messages) >= n, timeout)
            return list(self.messages)

    def to(self, address: str) -> list[EmailMessage]:
        with self.cond:
            return [m for _f, rcpt, m in self.messages if address in rcpt]

    def close(self) -> None:
        self.controller.stop()

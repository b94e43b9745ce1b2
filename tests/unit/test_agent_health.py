"""deploy_agent.health: command and HTTP checks against real processes and a
real local HTTP server, with retries, interval and timeout."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploybus.config import HealthConfig
from deploybus.daemons.deploy_agent import health
from deploybus.errors import DeployError


def collect() -> tuple[list[str], object]:
    messages: list[str] = []
    return messages, lambda step, message, lines: messages.append(message)


def test_command_passes_on_a_later_attempt(tmp_path: Path) -> None:
    script = f"n=$(cat {tmp_path}/n 2>/dev/null || echo 0); echo $((n+1)) > {tmp_path}/n; " \
             f"[ $n -ge 2 ]"
    messages, progress = collect()
    sleeps: list[float] = []
    health.check(HealthConfig(command=script, retries=5, interval=0.5), cwd=tmp_path, env={},
                 progress=progress, sleep=sleeps.append)
    assert (tmp_path / "n").read_text() == "3\n"
    assert sleeps == [0.5, 0.5]
    assert "health check (attempt 3/5) ok" in " ".join(messages)


def test_command_that_never_passes_names_the_last_failure(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match=r"^health check failed after 2 attempt\(s\): health "
                                          r"check \(attempt 2/2\) failed with exit code 7: no$"):
        health.check(HealthConfig(command="echo no; exit 7", retries=2, interval=0),
                     cwd=tmp_path, env={}, progress=lambda *a: None)


def test_command_timeout_counts_as_a_failed_attempt(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(DeployError, match=r"timed out after 0.3s"):
        health.check(HealthConfig(command="sleep 30", retries=2, interval=0, timeout=0.3),
                     cwd=tmp_path, env={}, progress=lambda *a: None)
    assert time.monotonic() - started < 10


class _Handler(http.server.BaseHTTPRequestHandler):
    codes: list[int] = []

    def do_GET(self) -> None:  # noqa: N802
        code = self.codes.pop(0) if self.codes else 200
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("H", (_Handler,), {"codes": []})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/healthz", handler
    srv.shutdown()
    srv.server_close()


def test_url_retries_until_2xx(server, tmp_path: Path) -> None:
    url, handler = server
    handler.codes = [503, 500]
    messages, progress = collect()
    health.check(HealthConfig(url=url, retries=3, interval=0), cwd=tmp_path, env={},
                 progress=progress)
    assert messages == [f"health check (attempt 1/3): GET {url} answered 503 Service Unavailable",
                        f"health check (attempt 2/3): GET {url} answered 500 Internal Server Error",
                        f"health check (attempt 3/3): GET {url} answered 200"]


def test_url_that_never_answers_times_out(tmp_path: Path) -> None:
    with socket.socket() as s:  # listens, never accepts or answers
        s.bind(("127.0.0.1", 0))
        s.listen(5)
        url = f"http://127.0.0.1:{s.getsockname()[1]}/"
        started = time.monotonic()
        with pytest.raises(DeployError, match="timed out"):
            health.check(HealthConfig(url=url, retries=2, interval=0, timeout=0.3),
                         cwd=tmp_path, env={}, progress=lambda *a: None)
        assert time.monotonic() - started < 5


def test_url_ignores_proxy_settings(server, tmp_path: Path, monkeypatch) -> None:
    url, _ = server
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9/")
    health.check(HealthConfig(url=url, retries=1), cwd=tmp_path, env={},
                 progress=lambda *a: None)

"""Shared start and stop for every daemon.

A daemon is one or more :class:`Service` objects run by :class:`Runner`, which
owns the process: it installs signal handlers, starts the services in order,
tells systemd ``READY=1`` and pets its watchdog, and stops them in reverse
order. Shutdown order, for each service: stop taking messages (cancel
subscriptions), let in-flight work finish within the grace period (its
messages are acked when done, or go back to the broker), close connections.
The first SIGTERM or SIGINT is a warm stop; the second is cold: the process
exits at once with :data:`EXIT_COLD`, leaving unacked messages to the broker.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import structlog

from deploybus.config import Config
from deploybus.exits import (  # noqa: F401 - re-exported: deploybus.runner.EXIT_*
    EXIT_COLD,
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_SOFTWARE,
    EXIT_TEMPFAIL,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)

#: Seconds a warm stop waits for in-flight work.
STOP_GRACE = 30.0


class Stats:
    """Thread-safe counters a daemon keeps (received, rejected, dead-lettered...)."""

    def __init__(self) -> None:
        self._c: Counter[str] = Counter()
        self._lock = threading.Lock()

    def incr(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._c[key] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._c)

    def __getitem__(self, key: str) -> int:
        with self._lock:
            return self._c[key]


@dataclass
class Context:
    """What every service of one process shares."""

    config: Config
    bus: Any  # deploybus.bus.Transport
    host: str
    signing_key: Any = None  # deploybus.signing.SigningKey
    stats: Stats = field(default_factory=Stats)

    @property
    def sender(self) -> str:
        return f"{os.getpid()}@{self.host}"


class Service:
    """One daemon's logic. Override :meth:`start` and :meth:`stop`."""

    name = "service"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.log = structlog.get_logger(f"deploybus.{self.name}").bind(daemon=self.name,
                                                                      host=ctx.host)

    def start(self) -> None:
        """Subscribe and start threads; return once the service is live."""

    def stop(self, timeout: float = STOP_GRACE) -> None:
        """Warm stop: stop taking work, finish or hand back in-flight work."""

    def healthy(self) -> bool:
        return True


class _Systemd:
    """``sd_notify`` through systemd-python when importable; a no-op otherwise."""

    def __init__(self) -> None:
        try:
            from systemd import daemon  # type: ignore[import-not-found]
        except ImportError:
            daemon = None
        self.daemon = daemon

    def notify(self, state: str) -> bool:
        if self.daemon is None or not os.environ.get("NOTIFY_SOCKET"):
            return False
        return bool(self.daemon.notify(state))

    def watchdog_interval(self) -> float | None:
        usec = os.environ.get("WATCHDOG_USEC")
        return int(usec) / 2e6 if usec and usec.isdigit() else None


class Runner:
    """Runs services until a signal arrives; see the module docstring."""

    def __init__(self, services: list[Service], *, name: str, grace: float = STOP_GRACE) -> None:
        self.services, self.name, self.grace = services, name, grace
        self.stopping = threading.Event()
        self.signals = 0
        self.last_signal = 0
        self.systemd = _Systemd()
        self.log = structlog.get_logger("deploybus.runner").bind(daemon=name)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # Only async-signal-safe work here: the main thread may hold a lock
        # (a log line half written) that logging or Event.set() would wait on
        # forever. The wakeup fd wakes the main loop, which logs and stops.
        self.signals += 1
        self.last_signal = signum
        if self.signals > 1:
            os.write(2, f"deploybus {self.name}: second signal: cold stop\n".encode())
            os._exit(EXIT_COLD)

    def start(self) -> None:
        for service in self.services:
            service.start()
        self.systemd.notify("READY=1")
        self.log.info("ready", services=[s.name for s in self.services])

    def stop(self) -> None:
        self.systemd.notify("STOPPING=1")
        for service in reversed(self.services):
            try:
                service.stop(self.grace)
            except Exception:  # one service failing to stop must not keep the rest up
                self.log.exception("error while stopping", service=service.name)
        self.log.info("stopped")

    def run(self) -> int:
        """Start, wait for a signal, stop. Returns the exit code."""
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        if threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        self.start()
        interval = self.systemd.watchdog_interval()
        while not self.signals and not self.stopping.is_set():
            ready, _, _ = select.select([wake_r], [], [], interval or 3600)
            if ready:
                try:
                    wake_r.recv(64)
                except BlockingIOError:
                    pass
            elif interval and all(s.healthy() for s in self.services):
                self.systemd.notify("WATCHDOG=1")
        if self.signals:
            self.log.info("warm stop requested", signal=signal.Signals(self.last_signal).name)
        self.stopping.set()
        started = time.monotonic()
        self.stop()
        self.log.info("exit", seconds=round(time.monotonic() - started, 2))
        return EXIT_OK

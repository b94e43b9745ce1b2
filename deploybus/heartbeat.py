"""A daemon's own heartbeat: a ``presence`` message naming the daemon, every
``interval`` seconds, from a thread of its own.

The agent, the fetcher and the keepalive each send one, so that liveness
(:mod:`deploybus.liveness`) says which daemons of a host are alive, not only
that the host is. A heartbeat that cannot be sent is logged and the next
one tried on time: it is worth nothing late.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from deploybus import __version__, protocol, topics
from deploybus.errors import BusError

if TYPE_CHECKING:
    from deploybus.runner import Context

#: Seconds between heartbeats unless the config says otherwise.
INTERVAL = 10.0


class Heartbeat:
    """Sends ``presence`` for ``daemon`` on ``ctx.host``; ``extra`` adds to its body."""

    def __init__(self, ctx: Context, daemon: str, *, interval: float = INTERVAL,
                 extra: Callable[[], dict[str, Any]] | None = None, log: Any = None) -> None:
        self.ctx, self.daemon, self.interval = ctx, daemon, interval
        self.extra = extra
        self.log = log
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True,
                                       name=f"heartbeat-{daemon}")

    def body(self) -> protocol.Body:
        """The heartbeat's typed ``presence`` body."""
        return protocol.parse("presence", {
            "host": self.ctx.host, "daemon": self.daemon, "version": __version__,
            "interval": self.interval, **(self.extra() if self.extra else {})})

    def beat(self) -> None:
        """Send one heartbeat now, signed with the host's key (raises BusError);
        it expires after three intervals, the time after which it no longer
        counts anyway."""
        self.ctx.bus.publish(topics.PRESENCE, protocol.seal(
            self.body(), key=self.ctx.signing_key, sender=self.ctx.sender,
            ttl=self.interval * 3))

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self.beat()
            except BusError as exc:
                if self.log is not None:
                    self.log.warning("heartbeat not sent", error=str(exc))
            except Exception:  # the heartbeat never dies silently
                if self.log is not None:
                    self.log.exception("heartbeat failed")
            self.stopping.wait(self.interval)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def alive(self) -> bool:
        return self.thread.is_alive()

"""The keepalive daemon: a ``presence`` message every few seconds.

Each says which host is alive, the deploybus version, and for every project
the host serves which release ``current`` points at (with its commit and
ref), so the web can show who runs what without asking any host.
"""

from __future__ import annotations

import threading
from typing import Any

from deploybus import __version__, envelope, topics
from deploybus.errors import BusError
from deploybus.layout import Layout
from deploybus.runner import STOP_GRACE, Context, Service

#: Seconds between heartbeats.
INTERVAL = 10.0


class Keepalive(Service):
    name = "keepalive"

    def __init__(self, ctx: Context, *, interval: float = INTERVAL) -> None:
        super().__init__(ctx)
        self.interval = interval
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="keepalive")

    def snapshot(self) -> dict[str, Any]:
        root = self.ctx.config.host(self.ctx.host).root
        projects = {}
        for pc in self.ctx.config.projects_for_host(self.ctx.host):
            layout = Layout(root, pc.name)
            release = layout.current_release()
            info = layout.info(release) if release else {}
            projects[pc.name] = {"release": release, "commit": info.get("commit"),
                                 "ref": info.get("ref"), "rollout": info.get("rollout")}
        return {"host": self.ctx.host, "version": __version__, "interval": self.interval,
                "projects": projects}

    def beat(self) -> None:
        env = envelope.new("presence", self.snapshot(), sender=self.ctx.sender,
                           ttl=self.interval * 3)
        if self.ctx.signing_key is not None:
            env = self.ctx.signing_key.sign(env)
        self.ctx.bus.publish(topics.PRESENCE, env.encode())

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self.beat()
            except BusError as exc:
                self.log.warning("heartbeat not sent", error=str(exc))
            self.stopping.wait(self.interval)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = STOP_GRACE) -> None:
        self.stopping.set()
        self.thread.join(timeout)

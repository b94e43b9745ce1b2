"""The keepalive daemon: a ``presence`` message every few seconds.

Each says which host is alive, the deploybus version, and for every project
the host serves which release ``current`` points at (with its commit and
ref), so the web can show who runs what without asking any host. The agent
and the fetcher send heartbeats of their own (:mod:`deploybus.heartbeat`):
the keepalive alone says the host is up, not that it can deploy.
"""

from __future__ import annotations

from typing import Any

from deploybus.heartbeat import INTERVAL, Heartbeat
from deploybus.layout import Layout
from deploybus.runner import STOP_GRACE, Context, Service

__all__ = ["INTERVAL", "Keepalive"]


class Keepalive(Service):
    name = "keepalive"

    def __init__(self, ctx: Context, *, interval: float | None = None) -> None:
        super().__init__(ctx)
        self.interval = interval or ctx.config.host(ctx.host).heartbeat
        self.heartbeat = Heartbeat(ctx, "keepalive", interval=self.interval,
                                   extra=self.snapshot, log=self.log)

    def snapshot(self) -> dict[str, Any]:
        root = self.ctx.config.host(self.ctx.host).root
        projects = {}
        for pc in self.ctx.config.projects_for_host(self.ctx.host):
            layout = Layout(root, pc.name)
            release = layout.current_release()
            info = layout.info(release) if release else {}
            projects[pc.name] = {"release": release, "commit": info.get("commit"),
                                 "ref": info.get("ref"), "rollout": info.get("rollout")}
        return {"projects": projects}

    def beat(self) -> None:
        self.heartbeat.beat()

    def start(self) -> None:
        self.heartbeat.start()

    def stop(self, timeout: float = STOP_GRACE) -> None:
        self.heartbeat.stop(timeout)

    def healthy(self) -> bool:
        return self.heartbeat.alive()

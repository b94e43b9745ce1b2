"""Which daemons of a host are alive, and what that makes the host: one rule
for ``deploybus hosts``, the web and the orchestrator.

Every daemon on a host sends its own heartbeat (a ``presence`` message
naming the daemon: ``agent``, ``fetcher``, ``keepalive``) every
``interval`` seconds. A daemon is alive while its last heartbeat is at most
:data:`DOWN_AFTER_BEATS` intervals old. The host's verdict:

* ``up``: its agent is alive, and so is every other daemon heard from it;
* ``degraded``: its agent is alive (it can deploy) but another daemon that
  was heard from has gone silent (a fetcher: mirrors go stale; a
  keepalive: what runs there is no longer reported);
* ``agent down``: something on the host is alive but its agent is not (or
  was never heard from): a deploy there cannot happen;
* ``down``: nothing heard from it for too long;
* ``never seen``: no heartbeat ever.

The agent is what a deploy needs, so it decides between the first three.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

#: A daemon whose last heartbeat is older than this many intervals is down.
DOWN_AFTER_BEATS = 3

#: Seconds between heartbeats when a presence message does not say.
DEFAULT_INTERVAL = 10.0

#: The daemon that deploys: the host's verdict hangs on it.
AGENT = "agent"

#: Verdicts, best first.
VERDICTS = ("up", "degraded", "agent down", "down", "never seen")


@dataclass(frozen=True)
class DaemonBeat:
    """The last heartbeat of one daemon on one host."""

    name: str
    #: Seconds since its last heartbeat was recorded.
    age: float
    #: Seconds between its heartbeats.
    interval: float

    @property
    def limit(self) -> float:
        """Seconds of silence after which it counts as down."""
        return self.interval * DOWN_AFTER_BEATS

    @property
    def alive(self) -> bool:
        return self.age <= self.limit


@dataclass(frozen=True)
class HostLiveness:
    """The verdict on one host, with the daemons it rests on."""

    host: str
    verdict: str
    daemons: Mapping[str, DaemonBeat]
    #: One line for a person: "agent 2s, fetcher 4s, keepalive silent 2m".
    detail: str

    @property
    def can_deploy(self) -> bool:
        return self.verdict in ("up", "degraded")

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "detail": self.detail,
                "daemons": {n: {"age": round(d.age, 1), "interval": d.interval,
                                "alive": d.alive} for n, d in self.daemons.items()}}


def ago(seconds: float) -> str:
    """``42s``, ``5m``, ``3h``, ``2d``."""
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def beats(daemons: Mapping[str, Mapping[str, Any]]) -> dict[str, DaemonBeat]:
    """:class:`DaemonBeat` of each ``{name: {age, interval}}`` the store returns."""
    out = {}
    for name, d in daemons.items():
        interval = d.get("interval") or DEFAULT_INTERVAL
        try:
            interval = float(interval)
        except (TypeError, ValueError):
            interval = DEFAULT_INTERVAL
        out[name] = DaemonBeat(name=name, age=float(d.get("age", 0.0)),
                               interval=max(interval, 0.1))
    return out


def judge(host: str, daemons: Mapping[str, Mapping[str, Any]] | None) -> HostLiveness:
    """The verdict on ``host`` from its daemons' last heartbeats (the store's
    ``daemons`` of a host: ``{name: {age, interval}}``; None if never seen)."""
    found = beats(daemons or {})
    if not found:
        return HostLiveness(host, "never seen", found, "no heartbeat ever")
    parts = []
    for name in sorted(found, key=lambda n: (n != AGENT, n)):
        d = found[name]
        parts.append(f"{name} {ago(d.age)}" if d.alive else f"{name} silent {ago(d.age)}")
    agent = found.get(AGENT)
    if agent is None:
        parts.insert(0, "no agent heartbeat ever")
    detail = ", ".join(parts)
    if not any(d.alive for d in found.values()):
        verdict = "down"
    elif agent is None or not agent.alive:
        verdict = "agent down"
    elif all(d.alive for d in found.values()):
        verdict = "up"
    else:
        verdict = "degraded"
    return HostLiveness(host, verdict, found, detail)


def host_rows(environments: Mapping[str, Iterable[str]],
              seen: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per host for a person (``deploybus hosts``, the web, the API):
    the configured hosts (``environments``: environment -> its hosts) in
    config order, then hosts heard from that no environment names. Each row
    has the host's verdict and daemons (:func:`judge`), what its keepalive
    says runs there (``projects``) and the environments it is in."""
    records = {h["name"]: h for h in seen}
    envs_of: dict[str, list[str]] = {}
    for env, hosts in environments.items():
        for host in hosts:
            envs_of.setdefault(host, []).append(env)
    rows = []
    for name in [*envs_of, *sorted(set(records) - set(envs_of))]:
        h = records.get(name)
        live = judge(name, h["daemons"] if h else None)
        info = (h or {}).get("info") or {}
        rows.append({"name": name, "environments": envs_of.get(name, []),
                     "configured": name in envs_of, **live.to_dict(),
                     "last_seen": h["last_seen"] if h else None,
                     "projects": info.get("projects") or {}})
    return rows

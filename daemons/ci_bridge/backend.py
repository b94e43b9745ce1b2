"""The one small interface every CI server sits behind.

A backend triggers a build of one commit and follows it to its result. The
bridge (:mod:`.service`) records what :meth:`Backend.trigger` returns (a
*handle*: a small JSON-able dict, the backend's own reference to the queued
build) in the store before it acknowledges the push, and calls
:meth:`Backend.poll` with it until the build finishes, across restarts of
the bridge. So a backend keeps no state of its own between calls: everything
it needs to find the build again is in the handle, and ``poll`` returns the
handle updated as the build moves (a Jenkins queue item becomes a build
number once an executor takes it).

Errors: :class:`CiUnavailable` for what may pass (the server is down,
answers 5xx, times out): the bridge retries with capped, jittered backoff
and keeps the push; :class:`CiRefused` for what will not pass by itself
(wrong credentials, no such job, the build was cancelled in the queue): the
build is reported as an error. Both are in the one error tree
(:mod:`deploybus.errors`). Adding a CI server (GitLab CI, Gitea Actions) is
one module with a class that implements :class:`Backend`, registered in
:data:`BACKENDS`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

from deploybus.errors import CiRefused, CiUnavailable

__all__ = ["BACKENDS", "Backend", "BuildStatus", "CiRefused", "CiUnavailable", "Trigger",
           "backend_for"]

#: Results a finished build may have (Jenkins's words; Buildbot's are mapped
#: onto them).
RESULTS = ("SUCCESS", "FAILURE", "ABORTED", "UNSTABLE", "NOT_BUILT")


@dataclass(frozen=True)
class Trigger:
    """A build to start: ``job`` of ``project`` at ``commit`` (reached by
    ``ref``), with ``parameters`` (already filled in from the config's
    templates)."""

    project: str
    ref: str
    commit: str
    job: str
    parameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildStatus:
    """Where a build is. ``state``: ``queued`` (waiting for an executor),
    ``started`` (running), ``finished`` (``result`` says how), or
    ``cancelled`` (taken out of the queue before it ran). ``handle`` is the
    handle to poll with from now on (the bridge stores it)."""

    state: str
    handle: dict[str, Any]
    result: str | None = None
    number: int | None = None
    url: str | None = None
    duration: float | None = None
    why: str | None = None
    console_tail: list[str] = field(default_factory=list)


class Backend(abc.ABC):
    """A CI server. One instance per ``ci:`` entry of the config."""

    #: The config's ``type`` of this backend.
    type: str = ""

    def __init__(self, name: str, settings: dict[str, Any]) -> None:
        self.name, self.settings = name, settings

    @abc.abstractmethod
    def trigger(self, t: Trigger) -> dict[str, Any]:
        """Queue a build; return its handle. Raises CiUnavailable or CiRefused."""

    @abc.abstractmethod
    def poll(self, handle: dict[str, Any], *, tail: int = 50) -> BuildStatus:
        """Where the build of ``handle`` is now; a finished build comes with up
        to ``tail`` last lines of its console log. Raises CiUnavailable or
        CiRefused."""

    def close(self) -> None:  # noqa: B027 - optional: most backends hold nothing
        """Let go of connections (a backend may keep an HTTP session)."""


#: Backend class by config ``type``; filled in by the backend modules.
BACKENDS: dict[str, type[Backend]] = {}


def backend_for(name: str, settings: dict[str, Any]) -> Backend:
    """The backend ``settings["type"]`` names (its module imported on first use)."""
    kind = settings.get("type")
    if kind not in BACKENDS:
        import importlib
        try:
            importlib.import_module(f"deploybus.daemons.ci_bridge.{kind}")
        except ImportError:
            pass
    if kind not in BACKENDS:
        raise CiRefused(f"ci.{name}: unknown CI backend type {kind!r} "
                        f"(known: {', '.join(sorted(BACKENDS)) or 'none loaded'})")
    return BACKENDS[str(kind)](name, settings)

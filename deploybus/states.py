"""The states of a rollout and of each host in it, and what a finished
rollout is called.

Kept apart from :mod:`deploybus.store` so that readers of the bus (the CLI's
``--wait``) know them without importing SQLAlchemy.

A finished rollout is one of (see :func:`outcome`):

* ``succeeded``: every host it targeted succeeded;
* ``partial``: it went through (no more hosts failed than ``max_failures``
  allows) but some hosts failed; at least one succeeded;
* ``failed``: it halted (more hosts failed than allowed), or no host
  succeeded;
* ``aborted``: a person ended it;
* ``refused``: it never started (not allowed, locked, closed window, bad
  request).
"""

from __future__ import annotations

from collections.abc import Iterable

#: Rollout states; the last five are final.
ROLLOUT_STATES = ("queued", "running", "paused",
                  "succeeded", "partial", "failed", "refused", "aborted")
FINAL_STATES = frozenset({"succeeded", "partial", "failed", "refused", "aborted"})

#: Host step states that are settled (the host will not be asked again).
SETTLED_STEPS = frozenset({"succeeded", "failed", "refused", "skipped", "offline"})

#: Host step states that count as a failure of that host.
FAILED_STEPS = frozenset({"failed", "refused", "offline"})


def outcome(host_states: Iterable[str], *, halted: bool) -> str:
    """The final state of a rollout that ran to its end (not aborted):
    ``failed`` if it ``halted`` or no host succeeded, ``succeeded`` if every
    host did, ``partial`` otherwise. A rollout of no hosts did nothing and
    is ``failed`` (the orchestrator refuses one before it starts)."""
    states = list(host_states)
    ok = sum(1 for s in states if s == "succeeded")
    if halted or ok == 0:
        return "failed"
    return "succeeded" if ok == len(states) else "partial"

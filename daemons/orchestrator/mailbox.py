"""What hosts answer, kept for the rollout runs waiting on it.

The orchestrator's handler threads post here (:meth:`Mailbox.progress`,
:meth:`Mailbox.result`); each :class:`~.rollout.RolloutRun` thread asks
and takes (:meth:`Mailbox.has_result`, :meth:`Mailbox.take`). A request is
addressed by :class:`Key`: the rollout, the host, and whether it undoes the
rollout on that host (an automatic rollback). Only answers to a request id
this orchestrator sent to that host for that key are taken: a result that
answers nothing we asked (a forged one, or the twin of an earlier refusal)
is dropped and counted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import NamedTuple

from deploybus.protocol import Result, Status


class Key(NamedTuple):
    rollout: str
    host: str
    undo: bool = False


class Mailbox:
    """See the module docstring. ``cond`` is the orchestrator's condition,
    notified whenever something arrives."""

    def __init__(self, cond: threading.Condition) -> None:
        self.cond = cond
        self._expected: set[Key] = set()
        # every request id sent for a key (re-asks add one), and the latest
        self._sent: dict[Key, list[str]] = {}
        self._results: dict[Key, Result] = {}
        self._progress: dict[Key, float] = {}
        self._acked: set[Key] = set()

    # -- the run's side ---------------------------------------------------------------

    def expect(self, key: Key) -> None:
        """A request for ``key`` is about to go out: wait for its answer."""
        with self.cond:
            self._expected.add(key)
            self._acked.discard(key)
            self._progress[key] = time.monotonic()

    def sent(self, key: Key, request_id: str) -> None:
        """Request ``request_id`` went out for ``key``."""
        with self.cond:
            self._sent.setdefault(key, []).append(request_id)

    def has_result(self, key: Key) -> bool:
        return key in self._results

    def take(self, key: Key) -> Result | None:
        with self.cond:
            result = self._results.pop(key, None)
            if result is not None:
                self._expected.discard(key)
                self._progress.pop(key, None)
            return result

    def acked(self, key: Key) -> bool:
        """The agent said something of ``key`` since it was last asked."""
        return key in self._acked

    def last_progress(self, key: Key) -> float:
        return self._progress.get(key, time.monotonic())

    def postpone(self, keys: Iterable[Key], by: float) -> None:
        """Move the stuck clocks of ``keys`` back by ``by`` seconds (an outage)."""
        with self.cond:
            for key in keys:
                if key in self._progress:
                    self._progress[key] += by

    def forget(self, rollout: str) -> None:
        """The rollout ended: drop everything kept for it."""
        with self.cond:
            for store in (self._expected, self._acked):
                for key in [k for k in store if k.rollout == rollout]:
                    store.discard(key)
            for mapping in (self._sent, self._results, self._progress):
                for key in [k for k in mapping if k.rollout == rollout]:
                    del mapping[key]

    # -- the handlers' side -----------------------------------------------------------

    def _ours(self, key: Key, request_id: str) -> bool:
        return request_id in self._sent.get(key, ())

    def progress(self, key: Key, request_id: str) -> bool:
        """Progress (or an acknowledgement) of request ``request_id``; False
        if it answers nothing we sent."""
        with self.cond:
            if not self._ours(key, request_id):
                return False
            if key in self._expected:
                self._progress[key] = time.monotonic()
                self._acked.add(key)
                self.cond.notify_all()
            return True

    def result(self, key: Key, result: Result) -> bool:
        """The outcome of request ``result.request_id``; False if it answers
        nothing we sent. A refusal of a request since asked anew (not the
        latest) answers nothing: the new request's answer is coming."""
        with self.cond:
            sent = self._sent.get(key, [])
            if result.request_id not in sent:
                return False
            if result.status is Status.REFUSED and result.request_id != sent[-1]:
                return True  # ours, but stale
            if key in self._expected:
                self._results.setdefault(key, result)
                self.cond.notify_all()
            return True

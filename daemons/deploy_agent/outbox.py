"""The agent's outbox: progress, acknowledgements and results go out from a
thread of their own, so a slow or absent broker never stalls a deploy.

* Progress of one request that comes within :data:`PROGRESS_LINGER` of
  each other goes out as one message (up to :data:`PROGRESS_BATCH`
  entries), and the last entries ride on the request's result when it
  follows within that time: a quick deploy sends a message or two, not one
  per step. Progress the broker does not take is dropped (and counted);
  beyond :data:`OUTBOX_LIMIT` waiting messages new progress is dropped.
* Acknowledgements and results are kept until the broker takes them, and
  sent again every :data:`RETRY_INTERVAL` seconds (a result makes a waiting
  acknowledgement pointless: it goes instead).

Items are addressed by the request's journal key (:func:`.journal.key`);
the bodies are :mod:`deploybus.protocol` ``Progress``/``Result`` fields.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from deploybus.errors import BusError, EnvelopeError

#: Seconds between attempts to publish results the broker did not take.
RETRY_INTERVAL = 5.0

#: Progress messages waiting for the broker beyond this are dropped.
OUTBOX_LIMIT = 1000

#: Progress of one request within this many seconds goes out as one message...
PROGRESS_LINGER = 0.5
#: ...of at most this many entries.
PROGRESS_BATCH = 50

PROGRESS, ACK, RESULT = "deploy.progress", "deploy.ack", "deploy.result"

#: (kind, journal key, body)
Item = tuple[str, str, dict[str, Any]]


class Outbox:
    """See the module docstring. ``publish(type, body)`` sends one message now
    (raising BusError); ``sent(key)`` is called once a result is on the bus."""

    def __init__(self, publish: Callable[[str, dict[str, Any]], None], *,
                 sent: Callable[[str], None], log: Any, stats: Any) -> None:
        self._publish, self._sent, self.log, self.stats = publish, sent, log, stats
        self._queue: queue.Queue[Item | None] = queue.Queue()
        self._results: dict[str, dict[str, Any]] = {}
        self._acks: dict[str, dict[str, Any]] = {}
        self.thread = threading.Thread(target=self._loop, daemon=True, name="agent-outbox")

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float) -> None:
        """Send what is queued (results are tried once more), then stop."""
        self._queue.put(None)
        self.thread.join(timeout)

    def alive(self) -> bool:
        return self.thread.is_alive()

    # -- what the agent puts in -------------------------------------------------------

    def progress(self, key: str, body: dict[str, Any]) -> None:
        if self._queue.qsize() >= OUTBOX_LIMIT:
            self.stats.incr("progress_dropped")
            return
        self._queue.put((PROGRESS, key, body))

    def ack(self, key: str, body: dict[str, Any]) -> None:
        """An acknowledgement the bus refused when sent at once: kept and retried."""
        self._queue.put((ACK, key, body))

    def result(self, key: str, body: dict[str, Any]) -> None:
        self._queue.put((RESULT, key, body))

    # -- the thread -------------------------------------------------------------------

    def _loop(self) -> None:
        carried: deque[Item | None] = deque()  # taken while gathering progress
        while True:
            if carried:
                item = carried.popleft()
            else:
                try:
                    item = self._queue.get(timeout=RETRY_INTERVAL if self._results
                                           or self._acks else None)
                except queue.Empty:
                    item = ("retry", "", {})
            try:
                if item is not None and item[0] == PROGRESS:
                    item = self._gather(item, carried)
                if item is not None and item[0] == PROGRESS:
                    try:
                        self._publish(PROGRESS, item[2])
                    except BusError as exc:
                        self.stats.incr("progress_dropped")
                        self.log.warning("progress not sent", request=item[1], error=str(exc))
                    continue
                if item is not None and item[0] == ACK:
                    self._acks[item[1]] = item[2]
                if item is not None and item[0] == RESULT:
                    self._results[item[1]] = item[2]
                    self._acks.pop(item[1], None)  # a result says it all
                if self._results or self._acks:
                    self._flush()
            except Exception:  # the outbox never dies silently: log and go on
                self.log.exception("outbox error")
            if item is None:
                return

    def _gather(self, first: Item, carried: deque[Item | None]) -> Item:
        """``first`` merged with the progress of the same request that follows
        within PROGRESS_LINGER; if that request's result comes within the
        time, the result carrying the entries. The first other item taken
        (another request's progress or result, the stop sentinel) goes to
        ``carried``, to be handled next."""
        entries = list(first[2]["entries"])
        deadline = time.monotonic() + PROGRESS_LINGER
        while len(entries) < PROGRESS_BATCH:
            try:
                nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if nxt is not None and nxt[0] == RESULT and nxt[1] == first[1]:
                return RESULT, nxt[1], nxt[2] | {"entries": entries}
            if nxt is None or nxt[0] != PROGRESS or nxt[1] != first[1]:
                carried.append(nxt)
                break
            entries.extend(nxt[2]["entries"])
        return PROGRESS, first[1], first[2] | {"entries": entries}

    def _flush(self) -> None:
        for key, ack in list(self._acks.items()):
            try:
                self._publish(PROGRESS, ack)
            except BusError as exc:
                self.log.warning("acknowledgement not sent yet; will retry", request=key,
                                 error=str(exc), retry_in=RETRY_INTERVAL)
                return
            except EnvelopeError as exc:
                self.log.error("acknowledgement cannot be sent; dropped", request=key,
                               error=str(exc))
            del self._acks[key]
        for key, result in list(self._results.items()):
            try:
                self._publish(RESULT, result)
            except BusError as exc:
                self.log.warning("result not sent yet; will retry", request=key,
                                 error=str(exc), retry_in=RETRY_INTERVAL)
                return
            except EnvelopeError as exc:
                # not a valid result (a journal from an older agent, a bug):
                # sending it again would fail the same way for ever
                self.stats.incr("results_unsendable")
                self.log.error("result cannot be sent; dropped", request=key, error=str(exc))
            del self._results[key]
            self._sent(key)

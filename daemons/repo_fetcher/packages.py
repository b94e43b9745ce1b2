"""The fetcher's package lists: ``apt-get update`` on ``package.update``.

A host whose config watches Debian packages (``packages.watch``: names or
globs) has its fetcher take ``package.update`` from its own durable queue
on ``packages`` and run ``packages.command`` (default ``apt-get update
-q``): the configured command and nothing else, under ``/bin/sh -c``, in a
process group of its own that is killed whole after :data:`COMMAND_TIMEOUT`
seconds. Nothing is ever installed here; a deploy script or configuration
management installs, from lists that are now current.

**Bursts.** A repository hook announces every package of an upload at once
(a source package with ten binaries is ten messages). The first update of
a burst opens a window of ``packages.coalesce`` seconds; every update that
arrives in it joins, and the command runs once when the window closes.
Updates that arrive while the command runs are the next burst: exactly one
more run after this one (sooner if their window has closed by then). An
update already waiting or in the run going on (a redelivery, the same
version announced twice) adds nothing.

**What an ack means.** The handler acks a ``package.update`` once the
update is written to the journal (``<state_dir>/package-updates.json``,
replaced atomically and fsynced), not once the command ran: the command
runs on this class's own thread, so neither the git mirrors' fetches nor
the broker (AMQP settles a message only on the thread that consumes it)
wait for ``apt-get``. An update leaves the journal when the run that
covered it has ended and been reported. So a fetcher killed in the middle
of a burst (in the window, or while the command runs) loses nothing: the
next start finds the journal and runs the command once for all of it. A
journal that cannot be written is logged and counted
(``package_journal_failed``); the update is still run for, unless the
process dies first. Messages the fetcher had not acked when it died come
again from the broker, and join the same run.

**What it reports.** Every run is one structured log line (packages,
versions, command, exit status, seconds), the counters
``package_updates`` (watched updates received), ``apt_update_ok`` and
``apt_update_failed``, and a ``package.updated`` signed by the host's key
on ``packages.updated``: ``{host, packages: [{package, version,
distribution}], command, status, exit_code, seconds, output_tail}``. A
failed command is reported and counted; the fetcher goes on, and the next
update runs it again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from deploybus import protocol, topics
from deploybus.bus import Delivery
from deploybus.config import PackageWatch
from deploybus.dispatch import Message
from deploybus.errors import BusError
from deploybus.procgroup import kill_group
from deploybus.redact import text as redact_text
from deploybus.runner import STOP_GRACE, Context

#: Seconds the command may run; then its process group is killed.
COMMAND_TIMEOUT = 600.0
#: Seconds between SIGTERM and SIGKILL to a command's process group.
KILL_GRACE = 5.0
#: After the command exits, seconds to go on reading output its background
#: children may still write.
DRAIN_AFTER_EXIT = 1.0
#: Bytes of output kept while the command runs (the end of it).
OUTPUT_KEEP = 64 * 1024
#: Characters of output a report carries (``output_tail``).
OUTPUT_TAIL = 4000
#: Characters of output a log line of a failed run carries.
LOG_TAIL = 1000
#: Distinct updates one run lists; more are counted (``omitted``).
MAX_LISTED = 200
#: The journal of updates not yet run for, in the host's state_dir.
JOURNAL = "package-updates.json"


@dataclass(frozen=True)
class Update:
    """One package version announced, as a run lists it."""

    package: str
    version: str
    distribution: str | None = None


@dataclass(frozen=True)
class RunResult:
    status: protocol.PackageRun
    exit_code: int | None
    seconds: float
    output_tail: str
    reason: str | None = None


class _Tail:
    """The last ``keep`` bytes a pipe gave, read on a thread of its own."""

    def __init__(self, keep: int = OUTPUT_KEEP) -> None:
        self.keep = keep
        self._buf = bytearray()
        self._lock = threading.Lock()

    def read(self, pipe: IO[bytes]) -> None:
        with pipe:
            while chunk := os.read(pipe.fileno(), 65536):
                with self._lock:
                    self._buf += chunk
                    if len(self._buf) > 2 * self.keep:
                        del self._buf[:-self.keep]

    def text(self, chars: int) -> str:
        """The last ``chars`` characters, from a line start when the output was cut."""
        with self._lock:
            data = bytes(self._buf[-self.keep:])
        out = data.decode("utf-8", "replace")
        if len(out) > chars:
            out = out[-chars:]
            nl = out.find("\n")
            if 0 <= nl < len(out) - 1:
                out = out[nl + 1:]
            out = "...\n" + out[-(chars - 4):]
        return out


class PackageUpdates:
    """Takes ``package.update`` (:meth:`on_update`, the dispatcher's handler)
    and runs the command for each burst on its own thread; see the module
    docstring. The fetcher's :class:`~.service.RepoFetcher` owns it."""

    def __init__(self, ctx: Context, watch: PackageWatch, *, state_dir: Path, log: Any,
                 timeout: float = COMMAND_TIMEOUT) -> None:
        self.ctx, self.watch, self.log, self.timeout = ctx, watch, log, timeout
        self.journal = Path(state_dir) / JOURNAL
        self._cond = threading.Condition()
        #: Recorded, waiting for the next run (insertion order kept).
        self._pending: dict[Update, None] = {}
        self._pending_omitted = 0
        #: time.monotonic() of the first update of the burst being gathered.
        self._first: float | None = None
        #: Taken by the run going on; in the journal until it is reported.
        self._running: list[Update] = []
        self._running_omitted = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._stopped_it = False  # stop() killed the command: not a result
        self._thread = threading.Thread(target=self._loop, daemon=True, name="package-updates")

    # -- the handler (the consumer's thread) -----------------------------------------

    def on_update(self, msg: Message, _d: Delivery) -> None:
        """A ``package.update`` the dispatcher checked (signed by a repo, CI
        or git key, fresh): record it for the coming run if this host watches
        the package. The dispatcher acks when this returns."""
        body = msg.body
        if not isinstance(body, protocol.PackageUpdate):
            return
        if not self.watch.watches(body.package):
            self.ctx.stats.incr("package_updates_ignored")
            self.log.debug("package update not watched here", package=body.package,
                           version=body.version)
            return
        self.record(Update(body.package, body.version, body.distribution),
                    id=msg.env.id, signer=msg.signer.name)
        self.ctx.stats.incr("package_updates")  # once it is in the journal

    def record(self, update: Update, **why: Any) -> None:
        """Add ``update`` to the coming run and write the journal before
        returning."""
        with self._cond:
            if update in self._pending or update in self._running:
                self.log.info("package update already waiting for a run",
                              package=update.package, version=update.version, **why)
                return
            if len(self._pending) >= MAX_LISTED:
                self._pending_omitted += 1
            else:
                self._pending[update] = None
            if self._first is None:
                self._first = time.monotonic()
            self._save()
            self._cond.notify_all()
        self.log.info("package update recorded", package=update.package,
                      version=update.version, distribution=update.distribution,
                      coalesce=self.watch.coalesce, **why)

    # -- the journal -----------------------------------------------------------------

    def _save(self) -> None:
        """Write every update not yet reported (the run going on and the next
        one) to the journal, atomically; called with the lock held."""
        updates = [*self._running, *self._pending]
        omitted = self._running_omitted + self._pending_omitted
        try:
            if not updates and not omitted:
                self.journal.unlink(missing_ok=True)
                return
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.journal.with_name(self.journal.name + ".tmp")
            data = json.dumps({"updates": [[u.package, u.version, u.distribution]
                                           for u in updates], "omitted": omitted})
            with open(tmp, "w") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.journal)
            dfd = os.open(self.journal.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            self.ctx.stats.incr("package_journal_failed")
            self.log.error("package update journal not written; a restart before the run "
                           "would lose these updates", journal=str(self.journal),
                           error=str(exc))

    def _load(self) -> None:
        """Updates a previous run of the fetcher recorded and did not report:
        they are the first burst, run for after one coalesce window."""
        try:
            raw = self.journal.read_text()
        except FileNotFoundError:
            return
        except OSError as exc:
            self.log.error("package update journal unreadable", journal=str(self.journal),
                           error=str(exc))
            return
        try:
            data = json.loads(raw)
            updates = [Update(str(p), str(v), None if d is None else str(d))
                       for p, v, d in data["updates"]]
            omitted = int(data.get("omitted", 0))
        except (ValueError, TypeError, KeyError) as exc:
            self.log.error("package update journal corrupt; running the command once for "
                           "whatever it held", journal=str(self.journal), error=str(exc))
            updates, omitted = [], 1
        if not updates and not omitted:
            return
        with self._cond:
            for u in updates[:MAX_LISTED]:
                self._pending[u] = None
            self._pending_omitted = omitted + max(0, len(updates) - MAX_LISTED)
            self._first = time.monotonic()
        self.log.info("package updates left from before a restart; running for them",
                      packages=[u.package for u in updates], omitted=omitted)

    # -- the worker ------------------------------------------------------------------

    def start(self) -> None:
        self._load()
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = STOP_GRACE) -> None:
        """Run nothing new; let a command in progress finish within
        ``timeout`` and be reported, else kill it (its updates stay in the
        journal for the next start, like those still being gathered)."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cond:
                proc = self._proc
                self._stopped_it = proc is not None
            if proc is not None:
                self.log.warning("package command still running at stop; killed, will run "
                                 "again at the next start", pid=proc.pid)
                self._kill(proc)
            self._thread.join(KILL_GRACE + DRAIN_AFTER_EXIT + 1)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                if not self._one_run():
                    return
            except Exception:  # the worker never dies silently, nor of one bad run
                self.log.exception("package update run failed")
                self._stopping.wait(1.0)

    def _one_run(self) -> bool:
        """Wait for a burst, let its window close, run the command, report.
        False once stopping."""
        with self._cond:
            while self._first is None and not self._stopping.is_set():
                self._cond.wait()
            if self._stopping.is_set() or self._first is None:
                return False
            due = self._first + self.watch.coalesce
        if self._stopping.wait(max(0.0, due - time.monotonic())):
            return False
        with self._cond:
            batch, omitted = list(self._pending), self._pending_omitted
            self._pending, self._pending_omitted, self._first = {}, 0, None
            self._running, self._running_omitted = batch, omitted
        result = None
        try:
            result = self._run()
            if result is None:  # killed by stop(): the journal keeps the batch
                return False
            self._report(batch, omitted, result)
        finally:
            if result is not None or not self._stopped_it:
                with self._cond:
                    self._running, self._running_omitted = [], 0
                    self._save()
        return True

    def _run(self) -> RunResult | None:
        """Run the command: its result, or None when stop() killed it."""
        command = self.watch.command
        started = time.monotonic()
        try:
            proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True)
        except OSError as exc:
            return RunResult(protocol.PackageRun.FAILED, None, time.monotonic() - started, "",
                             f"could not start /bin/sh: {exc}")
        with self._cond:
            self._proc = proc
        tail = _Tail()
        assert proc.stdout is not None
        reader = threading.Thread(target=tail.read, args=(proc.stdout,), daemon=True,
                                  name="package-command-output")
        reader.start()
        reason = None
        try:
            code: int | None = proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            self._kill(proc)
            code, reason = None, f"timed out after {self.timeout:g} s; process group killed"
        seconds = time.monotonic() - started
        reader.join(DRAIN_AFTER_EXIT)
        with self._cond:
            self._proc = None
            if self._stopped_it:
                return None
        if code is not None and code < 0:
            reason = f"killed by signal {signal.Signals(-code).name}"
            code = None
        status = protocol.PackageRun.OK if code == 0 else protocol.PackageRun.FAILED
        return RunResult(status, code, seconds, redact_text(tail.text(OUTPUT_TAIL)), reason)

    def _kill(self, proc: subprocess.Popen[bytes]) -> None:
        """The command's process group: SIGTERM, then SIGKILL (after
        KILL_GRACE, or at once if the shell went and left children)."""
        if not kill_group(proc, grace=KILL_GRACE, reap=KILL_GRACE):
            self.log.error("package command did not die of SIGKILL", pid=proc.pid)

    def _report(self, batch: list[Update], omitted: int, r: RunResult) -> None:
        """The log line, the counters and the signed ``package.updated``."""
        ok = r.status is protocol.PackageRun.OK
        self.ctx.stats.incr("apt_update_ok" if ok else "apt_update_failed")
        command = redact_text(self.watch.command)
        line = dict(packages=[u.package for u in batch], versions=[u.version for u in batch],
                    distributions=sorted({u.distribution for u in batch if u.distribution}),
                    omitted=omitted, command=command, status=str(r.status),
                    exit_status=r.exit_code, seconds=round(r.seconds, 3))
        if ok:
            self.log.info("package lists updated", **line)
        else:
            self.log.warning("package list update failed", reason=r.reason,
                             output_tail=r.output_tail[-LOG_TAIL:], **line)
        body = protocol.PackageUpdated(
            host=self.ctx.host,
            packages=[protocol.UpdatedPackage(package=u.package, version=u.version,
                                              distribution=u.distribution) for u in batch],
            omitted=omitted, command=command[:2000], status=r.status, exit_code=r.exit_code,
            seconds=round(r.seconds, 3), output_tail=r.output_tail, reason=r.reason)
        try:
            self.ctx.bus.publish(topics.PACKAGES_UPDATED, protocol.seal(
                body, key=self.ctx.signing_key, sender=self.ctx.sender))
        except BusError as exc:
            self.ctx.stats.incr("package_report_failed")
            self.log.warning("package.updated not published", error=str(exc))

"""What a bus message means for people: which notification event, with what
facts, and the text a person reads.

Rollouts (``deploy.rollout.status`` from the orchestrator on
``deploy.status``; see docs/notifications.md for the evidence):

* A rollout's first status names its ``phases`` (``RolloutRun._run``):
  ``started``. The orchestrator says it again when it resumes a rollout
  after a restart; the notification's id is made from the rollout, so that
  is no second notification.
* A final state (``succeeded``, ``partial``, ``failed``, ``aborted``) ends
  it. ``refused`` is no notification event, nor are the statuses of one
  host settling (``host``), of a pause or resume, or the answers to control
  messages (``control_id``; their ``state`` is the rollout's, even a final
  one).
* ``halted`` is a ``failed`` rollout in which more hosts failed than the
  strategy's ``max_failures`` allows: the orchestrator's own rule
  (``RolloutRun._finish``: ``halted = failures > max_failures``), from the
  status's ``failed`` count and the strategy in the state database. With
  the default ``max_failures: 0`` one failed host halts a rollout.
* ``rolled_back``: hosts this rollout switched were switched back (the
  state database's host steps say ``rolled_back: ok``, the final status's
  ``rolled_back`` names them), or the rollout was a rollback
  (``action: rollback``) that went through.

One rollout end is one notification per target: its event is the first of
these its project listens to, most specific first: ``rolled_back``, then
``halted``, then the state (``failed``, ``partial``, ``succeeded``,
``aborted``). A project that listens to ``failed`` only hears of a halted
rollout as ``failed``; one that listens to both hears ``halted``, once.

CI (``ci.build`` on ``ci.events``): ``finished`` with a result other than
``SUCCESS`` is ``ci_failed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deploybus import redact
from deploybus.protocol import BuildState, CiBuild, RolloutState, RolloutStatus
from deploybus.refs import short_ref_name
from deploybus.states import FAILED_STEPS
from deploybus.strategy import DEFAULTS as STRATEGY_DEFAULTS

STARTED, FINISHED = "started", "finished"
#: Rollout states that end a rollout and are notification events (refused is not).
ENDINGS = frozenset({RolloutState.SUCCEEDED, RolloutState.PARTIAL, RolloutState.FAILED,
                     RolloutState.ABORTED})
#: Host names a one-line text names before "+N more".
NAMED_HOSTS = 5
#: Characters of a reason the one-line text carries.
REASON_CHARS = 160


@dataclass(frozen=True)
class Occurrence:
    """Something people may be told about: ``candidates`` are the events it
    is, most specific first; ``facts`` the JSON body without ``event`` and
    ``text`` (filled in per project by :func:`for_project`)."""

    source: str
    project: str
    candidates: tuple[str, ...]
    facts: dict[str, Any]

    def for_project(self, events: list[str]) -> dict[str, Any] | None:
        """The facts for a project listening to ``events``, with the event
        chosen and the text; None if it listens to none of the candidates."""
        event = next((e for e in self.candidates if e in events), None)
        if event is None:
            return None
        facts = dict(self.facts, event=event)
        facts["text"] = headline(facts)
        return facts


def status_kind(s: RolloutStatus) -> str | None:
    """``started``, ``finished`` or None (not a notification: a host settled,
    a pause or resume, a control answer, a refusal)."""
    if s.control is not None or s.control_id is not None or s.host is not None:
        return None
    if s.state in ENDINGS:
        return FINISHED
    if s.state in (RolloutState.RUNNING, RolloutState.PAUSED) and s.phases is not None:
        return STARTED
    return None


def _max_failures(record: dict[str, Any]) -> int | None:
    value = (record.get("strategy") or {}).get("max_failures",
                                                STRATEGY_DEFAULTS["max_failures"])
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def from_status(s: RolloutStatus, kind: str, record: dict[str, Any], at: str) -> Occurrence:
    """The occurrence of a rollout status of ``kind`` (:func:`status_kind`),
    with the rollout's ``record`` from the state database."""
    steps: list[dict[str, Any]] = record.get("hosts") or []
    failed_steps = [st for st in steps if st.get("state") in FAILED_STEPS]
    total = s.total if s.total is not None else len(s.hosts or steps)
    succeeded = s.succeeded if s.succeeded is not None else \
        sum(1 for st in steps if st.get("state") == "succeeded")
    failed = s.failed if s.failed is not None else len(failed_steps)
    action = record.get("action") or "deploy"
    state = s.state.value if s.state is not None else record.get("state")
    rolled_back: dict[str, str] = dict(s.rolled_back or {})
    for st in steps:
        mark = st.get("rolled_back")
        if mark and st["host"] not in rolled_back:
            rolled_back[st["host"]] = {"ok": "rolled back", "failed": "rollback failed",
                                       "none": "nothing to roll back to"}.get(mark, mark)
    max_failures = _max_failures(record)
    halted = state == RolloutState.FAILED and (
        failed > max_failures if s.failed is not None and max_failures is not None
        else (s.reason or "").startswith("halted:"))
    candidates: tuple[str, ...]
    if kind == STARTED:
        candidates = (STARTED,)
    else:
        back = any(v == "rolled back" for v in rolled_back.values()) or (
            action == "rollback" and state in (RolloutState.SUCCEEDED, RolloutState.PARTIAL))
        candidates = (("rolled_back",) if back else ()) + (("halted",) if halted else ()) \
            + (str(state),)
    facts: dict[str, Any] = {
        "project": record["project"], "environment": record["environment"],
        "rollout": s.rollout, "action": action, "ref": s.ref or record.get("ref"),
        "commit": s.commit or record.get("commit"), "state": state,
        "reason": s.reason, "user": record.get("user"),
        "hosts": {"total": total, "succeeded": succeeded, "failed": failed},
        "failed_hosts": [{"host": st["host"], "state": st["state"],
                          "message": st.get("message")} for st in failed_steps],
        "halted": halted, "rolled_back": rolled_back, "at": at,
    }
    return Occurrence(source=f"rollout:{s.rollout}:{kind}", project=record["project"],
                      candidates=candidates, facts=redact.deep(facts))


def from_build(b: CiBuild, at: str) -> Occurrence | None:
    """``ci_failed`` for a build that finished without success; else None."""
    if b.state is not BuildState.FINISHED or (b.result or "").upper() == "SUCCESS":
        return None
    facts: dict[str, Any] = {
        "project": b.project, "environment": None, "rollout": None, "action": None,
        "ref": b.ref, "commit": b.commit, "state": b.state.value, "result": b.result,
        "reason": b.reason, "user": None, "hosts": None, "build": b.build,
        "backend": b.backend, "job": b.job, "number": b.number, "at": at,
    }
    if b.url:
        facts["url"] = b.url
    return Occurrence(source=f"ci:{b.build}:failed", project=b.project,
                      candidates=("ci_failed",), facts=redact.deep(facts))


# -- the text a person reads ---------------------------------------------------------------


def _names(hosts: list[str]) -> str:
    shown = ", ".join(hosts[:NAMED_HOSTS])
    return shown + (f", +{len(hosts) - NAMED_HOSTS} more" if len(hosts) > NAMED_HOSTS else "")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _what(f: dict[str, Any]) -> str:
    """``app v1.4 to production``, ``app rollback to the previous release in production``."""
    ref = f.get("ref") or ""
    if f.get("action") == "rollback":
        target = ref.partition(":")[2] if ref.startswith("rollback:") else ""
        to = "the previous release" if target in ("", "previous") else target
        return f"{f['project']} rollback to {to} in {f['environment']}"
    return f"{f['project']} {short_ref_name(ref) or '?'} to {f['environment']}"


def headline(f: dict[str, Any]) -> str:
    """One line a person can read: ``app v1.4 to production: failed on 2 of 5
    hosts (h3, h4) (rollout r-123)``."""
    if f["event"] == "ci_failed":
        number = f" #{f['number']}" if f.get("number") is not None else ""
        url = f" {f['url']}" if f.get("url") else ""
        return (f"{f['project']} {short_ref_name(f['ref'])} @ {f['commit'][:8]}: CI build "
                f"failed ({f.get('result') or 'no result'}): {f['backend']} {f['job']}"
                f"{number}{url}")
    hosts = f.get("hosts") or {}
    total, ok, failed = hosts.get("total", 0), hosts.get("succeeded", 0), hosts.get("failed", 0)
    failed_names = [h["host"] for h in f.get("failed_hosts") or []]
    state = f.get("state")
    if f["event"] == "started":
        outcome = f"started on {_plural(total, 'host')}"
        if f.get("user"):
            outcome += f" by {f['user']}"
    elif state == "succeeded":
        outcome = f"succeeded on {ok} of {_plural(total, 'host')}"
    elif state == "partial":
        outcome = f"partial: failed on {failed} of {_plural(total, 'host')}"
        if failed_names:
            outcome += f" ({_names(failed_names)})"
    elif state == "aborted":
        outcome = f"{f.get('reason') or 'aborted'}; {ok} of {_plural(total, 'host')} succeeded"
    elif failed or failed_names:
        outcome = f"{'halted, ' if f.get('halted') else ''}failed on {failed} of " \
                  f"{_plural(total, 'host')}"
        if failed_names:
            outcome += f" ({_names(failed_names)})"
    else:  # failed before any host (the orchestrator's own error)
        reason = (f.get("reason") or "").strip()
        outcome = f"failed: {reason[:REASON_CHARS]}" if reason else "failed"
    back = [h for h, v in (f.get("rolled_back") or {}).items() if v == "rolled back"]
    not_back = [h for h, v in (f.get("rolled_back") or {}).items()
                if v != "rolled back" and not v.startswith("nothing to roll back to")]
    if back and f.get("action") != "rollback":
        outcome += f"; rolled back on {_names(back)}"
    if not_back:
        outcome += f"; rollback failed on {_names(not_back)}"
    return f"{_what(f)}: {outcome} (rollout {f['rollout']})"


def email_text(f: dict[str, Any]) -> tuple[str, str]:
    """The subject and plain-text body of an email about ``f``."""
    subject = f"[deploybus] {f['text']}"
    if len(subject) > 200:
        subject = subject[:199] + "…"
    lines = [f["text"], ""]

    def add(label: str, value: Any) -> None:
        if value not in (None, "", [], {}):
            lines.append(f"{label + ':':<14}{value}")

    add("Event", f["event"])
    add("Project", f["project"])
    add("Environment", f.get("environment"))
    add("Rollout", f.get("rollout"))
    if f.get("action") == "rollback":
        add("Action", "rollback")
    add("Ref", f.get("ref"))
    add("Commit", f.get("commit"))
    add("Requested by", f.get("user"))
    state = f.get("state")
    if f.get("halted"):
        state = f"{state} (halted)"
    add("State", state)
    add("Result", f.get("result"))
    hosts = f.get("hosts")
    if hosts:
        add("Hosts", f"{hosts.get('succeeded', 0)} of {hosts.get('total', 0)} succeeded, "
                     f"{hosts.get('failed', 0)} failed")
    add("Build", f.get("build"))
    add("Build URL", f.get("url"))
    add("Reason", f.get("reason"))
    add("At", f.get("at"))
    if f.get("failed_hosts"):
        lines += ["", "Failed hosts:"]
        lines += [f"  {h['host']}: {h['state']}" + (f": {h['message']}" if h.get("message")
                                                    else "") for h in f["failed_hosts"]]
    if f.get("rolled_back"):
        lines += ["", "Rollback:"]
        lines += [f"  {h}: {v}" for h, v in f["rolled_back"].items()]
    lines += ["", "-- ", "deploybus notifier"]
    return subject, "\n".join(lines) + "\n"


def slack_text(text: str) -> str:
    """``text`` with the three characters Slack's message format reserves escaped."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

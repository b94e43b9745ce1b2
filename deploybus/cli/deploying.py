"""Deploying and steering: deploy, rollback, pause/resume/promote/abort,
history, hosts, locks and the audit trail."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import click

from deploybus import envelope, protocol, topics
from deploybus.bus import redact
from deploybus.cli.base import State, cli, pass_state
from deploybus.config import Config
from deploybus.errors import DeployBusError
from deploybus.exits import (
    EXIT_ABORTED,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_REFUSED,
    EXIT_TEMPFAIL,
)
from deploybus.states import FINAL_STATES


def _login() -> str:
    import getpass  # not at import: every daemon loads this module with the CLI
    return getpass.getuser()


#: Seconds ``--wait`` waits for the orchestrator's first word before saying so.
SILENCE_HINT_AFTER = 10.0

#: Seconds a command keeps trying to publish while the broker is away
#: before it says so (a daemon keeps trying for 30).
CLI_PUBLISH_TIMEOUT = 10.0

#: Seconds pause/resume/promote/abort wait for the orchestrator's answer.
CONTROL_TIMEOUT = 30.0

#: Final rollout states and the exit code ``--wait`` gives for each.
EXIT_FOR_STATE = {"succeeded": EXIT_OK, "partial": EXIT_PARTIAL, "failed": EXIT_FAILURE,
                  "aborted": EXIT_ABORTED, "refused": EXIT_REFUSED}


def print_event(env: envelope.Envelope) -> None:
    b = env.body
    host = b.get("host")
    if env.type == "deploy.progress" or (env.type == "deploy.result" and "entries" in b):
        # a result's own outcome is on the host's status line; only its entries here
        for e in envelope.progress_entries(b):
            click.echo(f"[{host}] {e.get('step')}: {e.get('message')}")
            for line in e.get("lines") or []:
                click.echo(f"[{host}]   | {line}")
    elif env.type == "deploy.rollout.status":
        if host and b.get("host_state"):
            state = b.get("host_state")
            tail = f" release {b.get('release')}" if state == "succeeded" and b.get("release") \
                else f": {b.get('reason')}" if b.get("reason") else ""
            click.echo(f"[{host}] {state}{tail} ({b.get('done')}/{b.get('total')} done)")
        elif b.get("control_id"):
            pass  # the answer to a pause/resume/promote/abort: its command prints it
        elif b.get("state") != "running" or b.get("phases"):
            reason = f": {b.get('reason')}" if b.get("reason") else ""
            phases = b.get("phases")
            plan = (" (" + " | ".join(",".join(p) for p in phases) + ")") if phases else ""
            counts = ""
            if b.get("state") in FINAL_STATES and isinstance(b.get("total"), int) \
                    and b.get("total"):
                counts = f" [{b.get('succeeded', 0)}/{b.get('total')} hosts succeeded]"
            click.echo(f"rollout {b.get('rollout')} {b.get('state')}{reason}{plan}{counts}")


def follow(bus: Any, cfg: Config, rollout: str, handle: Callable[[envelope.Envelope], None],
           *, events: bool = False) -> None:
    """Call ``handle`` with every message about ``rollout`` on ``deploy.status``
    (and ``deploy.events`` with ``events``). A message counts only if it is
    well formed and signed by a key whose role may send it: a status only
    by an orchestrator key (it is what the command's words and exit code
    rest on), progress only by the host it names."""
    verifier = cfg.verifier()

    def on_message(d: Any) -> None:
        try:
            env = envelope.decode(d.body)
            if env.correlation != rollout:
                return
            body = protocol.parse(env.type, env.body)
            try:
                verifier.identify(env, body)
            except DeployBusError as exc:
                click.echo(f"ignoring untrusted {env.type} message: {exc}", err=True)
                return
            handle(env)
        except DeployBusError as exc:
            click.echo(f"ignoring malformed message: {exc}", err=True)
        finally:
            d.ack()

    bus.subscribe(topics.STATUS, on_message)
    if events:
        bus.subscribe(topics.EVENTS, on_message)


def submit(state: State, body: dict[str, Any], *, wait: bool, timeout: float,
           summary: str, verbose: bool = False) -> None:
    """Publish a signed ``deploy.rollout``; with ``wait`` follow it and exit with its outcome.

    Following reads the orchestrator's ``deploy.status`` (a line per host as
    it settles, and the rollout's states); ``verbose`` adds every host's
    progress lines from ``deploy.events``.
    """
    from deploybus.bus import connect

    cfg = state.config
    key = state.signing_key()
    typed = protocol.parse("deploy.rollout", {k: v for k, v in body.items() if v is not None})
    rollout = body["rollout"]
    finished = threading.Event()
    heard = threading.Event()  # the orchestrator said anything of this rollout
    final: dict[str, Any] = {}

    def handle(env: envelope.Envelope) -> None:
        if env.type == "deploy.rollout.status":
            heard.set()
        print_event(env)
        # Only once its line is out: the main thread exits when it sees this.
        if env.type == "deploy.rollout.status" and env.body.get("state") in FINAL_STATES \
                and not env.body.get("control_id"):
            final.update(env.body)
            finished.set()

    bus = connect(cfg.bus_url, client_name=f"cli-{rollout}", publish_timeout=CLI_PUBLISH_TIMEOUT)
    try:
        if wait:
            follow(bus, cfg, rollout, handle, events=verbose)
        # Into the orchestrator's queue even if none has run on this broker
        # yet: the rollout waits there for the first one.
        bus.publish_for(topics.ROLLOUTS, topics.ORCHESTRATOR_ROLLOUTS, protocol.seal(
            typed, key=key, sender=f"cli@{socket.gethostname()}", correlation=rollout))
        click.echo(f"rollout {rollout}: {summary}")
        if not wait:
            return
        deadline = time.monotonic() + timeout
        if not heard.wait(min(timeout, SILENCE_HINT_AFTER)) and timeout > SILENCE_HINT_AFTER:
            # Nothing is lost (the rollout waits in the orchestrator's queue),
            # but somebody should start an orchestrator.
            click.echo(f"rollout {rollout}: no word from the orchestrator after "
                       f"{SILENCE_HINT_AFTER:.0f}s; is `deploybus orchestrator` running on "
                       f"{redact(cfg.bus_url)}? (still waiting)", err=True)
        if not finished.wait(max(0.0, deadline - time.monotonic())):
            click.echo(f"rollout {rollout}: still not finished after {timeout:.0f}s", err=True)
            sys.exit(EXIT_TEMPFAIL)
    finally:
        # About to exit: do not wait for the consumer to notice (up to its
        # drain timeout); the broker drops its exclusive queue with the
        # connection.
        bus.close(timeout=0)
    sys.exit(EXIT_FOR_STATE.get(final.get("state", ""), EXIT_FAILURE))


#: The command line's name for each field a rollout plan can fail on.
OPTION_OF = {"project": "PROJECT", "environment": "--env", "hosts": "--hosts"}

#: Strategy settings and the options that set them, to name the culprit.
STRATEGY_OPTIONS = {"canary": "--canary", "batch": "--batch", "window": "--window",
                    "pause": "--pause", "max_failures": "--max-failures",
                    "auto_rollback": "--auto-rollback", "stuck": "--stuck"}


def planned(cfg: Config, project: str, environment: str, hosts: list[str] | None = None,
            strategy: dict[str, Any] | None = None) -> Any:
    """:func:`deploybus.plan.plan`, its errors as click's, naming the option:
    refused here, before anything is sent."""
    from deploybus.errors import RolloutError
    from deploybus.plan import plan
    try:
        return plan(cfg, project=project, environment=environment, hosts=hosts,
                    strategy=strategy)
    except RolloutError as exc:
        if exc.field.startswith("strategy."):
            hint = STRATEGY_OPTIONS.get(exc.field.removeprefix("strategy."), "strategy")
        elif exc.field in OPTION_OF:
            hint = OPTION_OF[exc.field]
        else:
            raise click.UsageError(f"strategy of this rollout: {exc}") from None
        raise click.BadParameter(str(exc), param_hint=hint) from None


def check_target(cfg: Config, project: str, environment: str) -> None:
    planned(cfg, project, environment)


def host_list(hosts: str | None) -> list[str] | None:
    return [h.strip() for h in hosts.split(",") if h.strip()] if hosts else None


def count_or_text(value: str | None) -> int | str | None:
    """``"3"`` -> 3; ``"25%"`` or a host name stays text (the strategy checks it)."""
    if value is None:
        return None
    return int(value) if value.isdigit() else value


def pause_value(value: str | None) -> float | str | None:
    if value is None or value == "promote":
        return value
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter("seconds or 'promote'", param_hint="--pause") from None


common = [
    click.option("--env", "environment", required=True, help="Environment."),
    click.option("--hosts", default=None, help="Comma-separated subset of the environment."),
    click.option("--user", default=None, help="Who asks (default: your login name)."),
    click.option("--wait/--no-wait", default=False, help="Follow progress until the end."),
    click.option("--verbose", "-v", is_flag=True,
                 help="With --wait, also print every host's progress and script output."),
    click.option("--timeout", default=3600.0, show_default=True, help="Seconds --wait waits."),
    click.option("--override", default=None, metavar="REASON",
                 help="Deploy outside the environment's windows; the reason is audited."),
    click.option("--canary", default=None, help="Canary: number of hosts or a host name."),
    click.option("--batch", default=None, help="Hosts per batch after the canary: N or N%."),
    click.option("--window", type=click.IntRange(min=0), default=None,
                 help="At most this many hosts in flight (0: whole batch)."),
    click.option("--pause", default=None, help="Seconds between batches, or 'promote'."),
    click.option("--max-failures", type=click.IntRange(min=0), default=None,
                 help="Halt once more hosts than this have failed."),
    click.option("--auto-rollback/--no-auto-rollback", default=None,
                 help="On halt, switch the hosts this rollout moved back."),
    click.option("--stuck", type=click.FloatRange(min=1), default=None,
                 help="Seconds without progress after which a host counts as failed."),
]


def with_common(f: Any) -> Any:
    for option in reversed(common):
        f = option(f)
    return f


def rollout_body(state: State, project: str, environment: str, o: dict[str, Any]) -> dict:
    cfg = state.config
    hosts = host_list(o["hosts"])
    strategy = {"canary": count_or_text(o["canary"]), "batch": count_or_text(o["batch"]),
                "window": o["window"], "pause": pause_value(o["pause"]),
                "max_failures": o["max_failures"], "auto_rollback": o["auto_rollback"],
                "stuck": o["stuck"]}
    strategy = {k: v for k, v in strategy.items() if v is not None}
    planned(cfg, project, environment, hosts, strategy)
    return {"rollout": uuid.uuid4().hex[:16], "project": project, "environment": environment,
            "hosts": hosts, "user": o["user"] or _login(), "strategy": strategy,
            "override": o["override"]}


@cli.command()
@click.argument("project")
@click.argument("ref")
@with_common
@pass_state
def deploy(state: State, project: str, ref: str, environment: str, **o: Any) -> None:
    """Roll REF of PROJECT out to ENV.

    The environment's strategy applies; the options override it for this
    rollout (e.g. --canary 1 --batch 25% --auto-rollback). With --wait,
    prints a line per host as it settles and exits 0 only when every host
    succeeded; 3 when it went through with some hosts failed (partial,
    within --max-failures), 1 when it failed, 4 when it was aborted, 77 when
    it was refused, 75 when --timeout passed first.
    """
    from deploybus.refs import check_ref
    try:
        check_ref(ref)
    except DeployBusError as exc:
        raise click.BadParameter(str(exc), param_hint="REF") from None
    body = rollout_body(state, project, environment, o) | {"ref": ref, "action": "deploy"}
    hosts = f" ({', '.join(body['hosts'])})" if body["hosts"] else ""
    submit(state, body, wait=o["wait"], timeout=o["timeout"], verbose=o["verbose"],
           summary=f"{project} {ref} -> {environment}{hosts}")


@cli.command()
@click.argument("project")
@click.option("--to", "release", default=None,
              help="Release id to switch to (default: each host's previous good release).")
@with_common
@pass_state
def rollback(state: State, project: str, environment: str, release: str | None,
             **o: Any) -> None:
    """Switch PROJECT on ENV back to the previous good release (or --to RELEASE)."""
    body = rollout_body(state, project, environment, o) | {"action": "rollback",
                                                           "release": release}
    submit(state, body, wait=o["wait"], timeout=o["timeout"], verbose=o["verbose"],
           summary=f"rollback {project} on {environment} to {release or 'previous release'}")


def control(state: State, rollout: str, action: str, user: str | None,
            timeout: float) -> None:
    """Send a signed ``deploy.control`` and wait for the orchestrator's signed
    answer: exit 0 with what it did, 77 with why it refused, 75 if it did
    not answer within ``timeout`` (the message expires then, unread: it will
    not be applied later)."""
    from deploybus.bus import connect
    from deploybus.refs import check_name
    try:
        check_name(rollout, "rollout id")
    except DeployBusError as exc:
        raise click.BadParameter(str(exc), param_hint="ROLLOUT") from None
    cfg = state.config
    key = state.signing_key()
    env = protocol.sign(protocol.Control(rollout=rollout, action=protocol.ControlAction(action),
                                         user=user or _login()),
                        key=key, sender=f"cli@{socket.gethostname()}", correlation=rollout,
                        ttl=timeout)
    answer: dict[str, Any] = {}
    answered = threading.Event()

    def handle(e: envelope.Envelope) -> None:
        if e.type == "deploy.rollout.status" and e.body.get("control_id") == env.id:
            answer.update(e.body)
            answered.set()

    bus = connect(cfg.bus_url, client_name=f"cli-{action}", publish_timeout=CLI_PUBLISH_TIMEOUT)
    try:
        follow(bus, cfg, rollout, handle)
        # Into the orchestrator's queue even if none has run yet; it expires
        # when we stop waiting.
        bus.publish_for(topics.CONTROL, topics.ORCHESTRATOR_CONTROL, env.encode())
        if not answered.wait(timeout):
            click.echo(f"rollout {rollout}: no answer to {action} from the orchestrator within "
                       f"{timeout:.0f}s; is `deploybus orchestrator` running on "
                       f"{redact(cfg.bus_url)}? The {action} expires unread and will not be "
                       f"applied.", err=True)
            sys.exit(EXIT_TEMPFAIL)
    finally:
        bus.close(timeout=0)
    if answer.get("control_refused"):
        click.echo(f"rollout {rollout}: {action} refused: {answer['control_refused']}", err=True)
        sys.exit(EXIT_REFUSED)
    click.echo(f"rollout {rollout}: {answer.get('control_done') or action}")


for _action, _doc in (("pause", "Stop starting hosts once those in flight are done."),
                      ("resume", "Go on with a paused rollout."),
                      ("promote", "Go on after the canary (strategy pause: promote)."),
                      ("abort", "Start no more hosts; end the rollout as aborted.")):
    def _make(action: str, doc: str) -> None:
        @cli.command(action, help=f"{doc} ROLLOUT is the id deploy printed. Waits for the "
                                  f"orchestrator's answer: exit 0 when it did it, 77 when it "
                                  f"refused (the reason is printed), 75 without an answer.")
        @click.argument("rollout")
        @click.option("--user", default=None, help="Who asks (default: your login name).")
        @click.option("--timeout", type=click.FloatRange(min=1, max=3600),
                      default=CONTROL_TIMEOUT, show_default=True,
                      help="Seconds to wait for the orchestrator's answer.")
        @pass_state
        def _cmd(state: State, rollout: str, user: str | None, timeout: float) -> None:
            control(state, rollout, action, user, timeout)
    _make(_action, _doc)


@cli.command()
@click.option("--limit", default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_state
def history(state: State, limit: int, as_json: bool) -> None:
    """Recent rollouts, read from the state database (state.url)."""
    from deploybus.store import Store
    rows = Store(state.config.state_url).rollouts(limit)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        hosts = ", ".join(f"{h['host']}:{h['state']}" for h in r["hosts"])
        ok = sum(1 for h in r["hosts"] if h["state"] == "succeeded")
        counts = f" ({ok}/{len(r['hosts'])} ok)" if r["hosts"] else ""
        click.echo(f"{r['created_at'][:19]}  {r['id']}  {r['project']} {r['ref']} -> "
                   f"{r['environment']}  {r['state'].upper()}{counts}  by {r['user']}  [{hosts}]"
                   + (f"\n    {r['reason']}" if r["reason"] else ""))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_state
def hosts(state: State, as_json: bool) -> None:
    """Every host: whether it can deploy (its agent's heartbeat), which of its
    daemons are alive, and what runs there. Read from the state database
    (state.url), where the orchestrator records heartbeats; the web shows
    the same verdicts."""
    from deploybus.liveness import host_rows
    from deploybus.store import Store
    cfg = state.config
    rows = host_rows({e.name: e.hosts for e in cfg.environments.values()},
                     Store(cfg.state_url).hosts())
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    table = [("HOST", "STATUS", "DAEMONS", "RUNNING")]
    for h in rows:
        running = ", ".join(f"{p}={v.get('ref')}@{(v.get('commit') or '')[:8]}"
                            for p, v in h["projects"].items() if v.get("release")) or "-"
        name = h["name"] if h["configured"] else f"{h['name']} (not in config)"
        table.append((name, h["verdict"], h["detail"], running))
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    for row in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True))
                   + "  " + row[3])


@cli.command()
@click.argument("project")
@click.option("--env", "environment", required=True)
@click.option("--reason", required=True, help="Shown to whoever is refused.")
@click.option("--ttl", default="4h", show_default=True, help="Expiry: 30m, 4h, 2d.")
@click.option("--user", default=None)
@pass_state
def lock(state: State, project: str, environment: str, reason: str, ttl: str,
         user: str | None) -> None:
    """Hold PROJECT on ENV: rollouts are refused until unlock or expiry."""
    from deploybus.store import Store
    check_target(state.config, project, environment)
    seconds = parse_duration(ttl)
    who = user or _login()
    store = Store(state.config.state_url)
    held = store.acquire_lock(project=project, environment=environment, owner=who,
                              reason=reason, ttl=seconds)
    if held is not None:
        click.echo(f"already locked by {held['rollout'] or 'hand'} ({held['owner']}: "
                   f"{held['reason']}, expires {held['expires_at'][:19]}Z)", err=True)
        sys.exit(EXIT_REFUSED)
    store.audit(actor=who, action="lock", project=project, environment=environment,
                reason=reason, ttl=seconds)
    click.echo(f"locked {project}/{environment} for {timedelta(seconds=seconds)}: {reason}")


@cli.command()
@click.argument("project")
@click.option("--env", "environment", required=True)
@click.option("--user", default=None)
@pass_state
def unlock(state: State, project: str, environment: str, user: str | None) -> None:
    """Release a lock held by hand (a rollout's lock ends with the rollout)."""
    from deploybus.store import Store
    store = Store(state.config.state_url)
    held = store.lock(project, environment)
    if held is None:
        click.echo(f"{project}/{environment} is not locked")
        return
    if held["rollout"]:
        click.echo(f"locked by running rollout {held['rollout']}: abort it instead", err=True)
        sys.exit(EXIT_REFUSED)
    store.release_lock(project, environment)
    store.audit(actor=user or _login(), action="unlock", project=project,
                environment=environment, was=held)
    click.echo(f"unlocked {project}/{environment}")


@cli.command()
@pass_state
def locks(state: State) -> None:
    """Locks held now."""
    from deploybus.store import Store
    for held in Store(state.config.state_url).locks():
        click.echo(f"{held['project']}/{held['environment']}  "
                   f"{held['rollout'] or 'by hand'}  {held['owner']}: {held['reason']}  "
                   f"(expires {held['expires_at'][:19]}Z)")


@cli.command()
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_state
def audit(state: State, limit: int, as_json: bool) -> None:
    """The append-only audit trail, newest first."""
    from deploybus.store import Store
    rows = Store(state.config.state_url).audit_trail(limit)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for a in rows:
        click.echo(f"{a['at'][:19]}  {a['actor']:12} {a['action']:16} "
                   f"{a['project'] or '-'}/{a['environment'] or '-'} {a['rollout'] or ''} "
                   f"{json.dumps(a['detail'], sort_keys=True)}")


def parse_duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except (ValueError, IndexError):
        raise click.BadParameter("use 90s, 30m, 4h or 2d", param_hint="--ttl") from None

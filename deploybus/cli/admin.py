"""Keys, config check, git hooks, notify."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import click

from deploybus import config as configmod
from deploybus.cli.base import EXIT_CONFIG, State, cli, pass_state
from deploybus.errors import ConfigError, DeployBusError
from deploybus.exits import EXIT_FAILURE

#: Seconds the post-receive hook tries to publish before giving up (never
#: hold a push hostage to the bus).
HOOK_PUBLISH_TIMEOUT = 5.0

@cli.group()
def keys() -> None:
    """Signing keys."""


@keys.command("generate")
@click.argument("name")
@click.option("--dir", "directory", default=".", show_default=True, type=click.Path())
@click.option("--role", type=click.Choice(["person", "web", "ci", "orchestrator", "host", "git",
                                          "repo"]),
              default=None, help="What the key is for; prints the keys.trusted entry to add.")
def keys_generate(name: str, directory: str, role: str | None) -> None:
    """Create NAME.key (private, 0600) and NAME.pub in DIR.

    Every message on the bus is signed, and a key's role says what it may
    sign: person (deploybus deploy, rollback and the control commands), web,
    ci, orchestrator, host (one per host: its daemons' heartbeats and
    results; name it after the host), git (the post-receive hook) and repo
    (a Debian repository's hook: package-notify, nothing else).
    """
    from deploybus.refs import NAME_RE
    from deploybus.signing import SigningKey
    if not NAME_RE.fullmatch(name):
        raise click.BadParameter("letters, digits, '.', '_' and '-' only", param_hint="NAME")
    try:
        priv, pub = SigningKey.generate(name).save(directory)
    except FileExistsError as exc:
        click.echo(f"deploybus: {exc}", err=True)
        sys.exit(EXIT_FAILURE)
    click.echo(f"private key: {priv}\npublic key:  {pub}\n{pub.read_text().strip()}")
    if role:
        click.echo(f"add to keys.trusted where it must be believed:\n"
                   f"    {name}: {{key: {Path(pub).resolve()}, role: {role}}}")


@keys.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
def keys_check(file: str) -> None:
    """Check that FILE is a private key deploybus can sign with (PEM ed25519,
    as `keys generate` writes it); print its key id. Exits 78 if it is not
    (configuration management checks a key before it writes it)."""
    from deploybus.signing import SigningKey
    try:
        key = SigningKey.load(file)
    except ConfigError as exc:
        click.echo(f"deploybus: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    click.echo(f"{file}: ok: ed25519 private key {key.id}")


@cli.group("config")
def config_group() -> None:
    """Configuration file."""


@config_group.command("check")
@click.argument("file", required=False)
@click.option("--include-candidate", "candidate", nargs=2, default=None,
              metavar="INCLUDED CANDIDATE",
              help="Check FILE as if its included file INCLUDED (which need not exist yet, "
                   "but must match an include: pattern) held CANDIDATE's content: a conf.d "
                   "file checked before it is written (Puppet's validate_cmd). When FILE "
                   "does not exist yet, CANDIDATE is checked on its own.")
@click.option("--as", "as_path", default=None, metavar="PATH",
              help="Check FILE as though it were PATH: relative paths and include: patterns "
                   "from PATH's directory, errors naming PATH (FILE is a candidate for PATH, "
                   "as Puppet's validate_cmd checks one before it replaces PATH).")
@pass_state
def config_check(state: State, file: str | None, candidate: tuple[str, str] | None,
                 as_path: str | None) -> None:
    """Check FILE (default: --config), the files it includes and the key files
    it names; say what it defines.

    Exits 78 with the file, line and key of the first error: a key that
    cannot be read is found here, not by the first deploy.
    """
    path = file or state.config_path
    if as_path is not None and candidate is not None:
        raise click.UsageError("give --as or --include-candidate, not both")
    try:
        if as_path is not None:
            try:
                text = Path(path).read_text()
            except OSError as exc:
                raise ConfigError(f"cannot read config: {exc.strerror}", path=path) from None
            path = as_path
            cfg = configmod.parse(text, Path(as_path))
        elif candidate is not None:
            included, source = candidate
            try:
                text = Path(source).read_text()
            except OSError as exc:
                raise ConfigError(f"cannot read {source}: {exc.strerror}") from None
            if not Path(path).exists():
                cfg = configmod.check_included(Path(included), text)
                click.echo(f"{included}: ok on its own ({path} does not exist yet): "
                           f"{len(cfg.projects)} project(s), {len(cfg.environments)} "
                           f"environment(s)")
                return
            cfg = configmod.load(path, overrides={Path(included): text})
        else:
            cfg = configmod.load(path)
        key = cfg.load_signing_key() if cfg.signing_key is not None else None
    except ConfigError as exc:
        click.echo(f"{exc}", err=True)
        sys.exit(EXIT_CONFIG)
    from deploybus.bus import redact
    from deploybus.signing import key_id
    roles = {key_id(k.public): k for k in cfg.trusted.values()}
    if key is not None and key.id not in roles:
        click.echo(f"{path}: warning: the public key of keys.signing ({cfg.signing_key}) is "
                   f"not in keys.trusted here; whoever must believe what it signs needs its "
                   f".pub in their keys.trusted, with its role", err=True)
    elif key is not None:
        tk = roles[key.id]
        click.echo(f"{path}: keys.signing is {tk.name!r} ({tk.role}"
                   f"{f' for host {tk.host}' if tk.host else ''})")
    click.echo(f"{path}: ok: bus {redact(cfg.bus_url)}, {len(cfg.projects)} project(s), "
               f"{len(cfg.environments)} environment(s), "
               f"{len({h for e in cfg.environments.values() for h in e.hosts})} host(s), "
               f"{len(cfg.trusted)} trusted key(s)"
               f"{f', {len(cfg.included)} included file(s)' if cfg.included else ''}")


@cli.group()
def hook() -> None:
    """Git hooks."""


@hook.command("install")
@click.argument("repo", type=click.Path(exists=True, file_okay=False))
@click.option("--project", required=True, help="Project the repository belongs to.")
@click.option("--outbox", default=None, type=click.Path(dir_okay=False),
              help="Where pushes wait for the bus (default: the config's outbox, "
                   "state.dir/outbox.db). The git user must be able to write it and its "
                   "directory.")
@click.option("--force", is_flag=True, help="Replace a post-receive hook not written by us.")
@pass_state
def hook_install(state: State, repo: str, project: str, outbox: str | None,
                 force: bool) -> None:
    """Install the post-receive hook into bare repository REPO. Each push is
    queued in the outbox and published by a drainer signed with --key if
    given (a git key, see `keys generate`), else with keys.signing."""
    from deploybus.daemons.git_listener.hook import install
    cfg = state.config
    try:
        path = install(Path(repo), project=project, config=cfg.path, force=force,
                       outbox=Path(outbox) if outbox else cfg.outbox_path(),
                       key=Path(state.key_path) if state.key_path else None)
    except DeployBusError as exc:
        click.echo(f"deploybus: {exc}", err=True)
        sys.exit(EXIT_FAILURE)
    click.echo(f"installed {path}")


@hook.command("install-svn")
@click.argument("repo", type=click.Path(exists=True, file_okay=False))
@click.option("--project", required=True, help="Project the repository belongs to (its "
                                               "projects.<name>.svn).")
@click.option("--key", "svn_key", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Private key (role git) the hook signs with; default: the global --key, "
                   "else keys.signing.")
@click.option("--force", is_flag=True, help="Replace a post-commit hook not written by us.")
@pass_state
def hook_install_svn(state: State, repo: str, project: str, svn_key: str | None,
                     force: bool) -> None:
    """Install the post-commit hook into Subversion repository REPO (the
    directory `svnadmin create` made, on the svn server). Each committed
    revision is published as a signed svn.commit on git.commits; hosts'
    fetchers then export it. The hook never fails or holds up a commit."""
    from deploybus.daemons.git_listener.svn import install
    cfg = state.config
    key = svn_key or state.key_path
    try:
        path = install(Path(repo), project=project, config=cfg.path, force=force,
                       key=Path(key) if key else None)
    except DeployBusError as exc:
        click.echo(f"deploybus: {exc}", err=True)
        sys.exit(EXIT_FAILURE)
    pc = cfg.projects.get(project)
    if pc is None or pc.vcs != "svn":
        click.echo(f"deploybus: warning: {cfg.path} has no svn project {project!r} "
                   f"({'it is a git project' if pc else 'no such project'}): fetchers will "
                   "not export its commits", err=True)
    click.echo(f"installed {path} (svn post-commit hook for {project})")


@cli.group()
def outbox() -> None:
    """Events waiting for the bus (from the git hook and the listener)."""


@outbox.command("drain")
@click.option("--outbox", "path", default=None, type=click.Path(dir_okay=False),
              help="The outbox file (default: the config's outbox).")
@click.option("--wait", is_flag=True, help="Wait for another drainer instead of leaving "
                                           "the work to it.")
@click.option("--quiet", is_flag=True, help="Say nothing unless something failed.")
@pass_state
def outbox_drain(state: State, path: str | None, wait: bool, quiet: bool) -> None:
    """Publish what waits in the outbox, in order, signed with --key (or
    keys.signing); each event is deleted once the broker confirmed it. Exits
    1 if the broker did not take everything (it stays queued)."""
    from deploybus.bus import connect
    from deploybus.outbox import Outbox, drain, drain_lock
    cfg = state.config
    file = Path(path) if path else cfg.outbox_path()
    key = state.signing_key()
    with Outbox(file) as box, drain_lock(file, wait=wait) as held:
        if not held:
            if not quiet:
                click.echo("deploybus: another drainer is at work on this outbox", err=True)
            return
        bus = connect(cfg.bus_url, client_name="outbox-drain",
                      publish_timeout=HOOK_PUBLISH_TIMEOUT)
        try:
            n = drain(box, bus, key=key, sender=f"outbox@{socket.gethostname()}")
        except DeployBusError as exc:
            left = box.status()["pending"]
            click.echo(f"deploybus: {left} event(s) stay queued in {file}: {exc}", err=True)
            sys.exit(EXIT_FAILURE)
        finally:
            bus.close()
    if not quiet:
        click.echo(f"published {n} event(s)")


@outbox.command("status")
@click.option("--outbox", "path", default=None, type=click.Path(dir_okay=False),
              help="The outbox file (default: the config's outbox).")
@pass_state
def outbox_status(state: State, path: str | None) -> None:
    """How many events wait for the bus, since when, and the last error.
    Exits 1 when events have waited more than a minute."""
    import time

    from deploybus.outbox import Outbox
    file = Path(path) if path else state.config.outbox_path()
    if not file.exists():
        click.echo(f"{file}: no outbox (nothing was ever queued here)")
        return
    with Outbox(file) as box:
        st = box.status()
    click.echo(f"{file}: {st['pending']} event(s) waiting")
    if st["oldest"] is not None:
        age = time.time() - st["oldest"]
        click.echo(f"  oldest: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(st['oldest']))}"
                   f" ({age:.0f} s ago)")
    if st["error"]:
        click.echo(f"  last error: {st['error']}")
    if st["rejected"]:
        click.echo(f"  set aside (cannot be published): {st['rejected']}")
    if st["oldest"] is not None and time.time() - st["oldest"] > 60:
        sys.exit(EXIT_FAILURE)


@cli.group()
def notify() -> None:
    """Publish events from scripts and hooks."""


@notify.command("push")
@click.option("--project", required=True)
@click.option("--key", "push_key", default=None, help="Key to sign with (as the global --key).")
@pass_state
def notify_push(state: State, project: str, push_key: str | None) -> None:
    """Read 'old new ref' lines (post-receive input) and publish git.push events."""
    from deploybus.bus import connect
    from deploybus.daemons.git_listener.hook import publish_pushes, pushes
    bodies = pushes(sys.stdin, project=project)
    try:
        cfg = state.config
        if push_key:
            state.key_path = push_key
        key = state.signing_key()
        bus = connect(cfg.bus_url, client_name=f"hook-{project}",
                      publish_timeout=HOOK_PUBLISH_TIMEOUT)
        try:
            n = publish_pushes(bus, bodies, sender=f"hook@{socket.gethostname()}", signing_key=key)
        finally:
            bus.close()
        click.echo(f"deploybus: published {n} push event(s) for {project}", err=True)
    except (Exception, SystemExit) as exc:  # noqa: BLE001
        # Never fail the push: the mirrors catch up on the next fetch.
        click.echo(f"deploybus: warning: push event not published: {exc}", err=True)




@notify.command("svn-commit")
@click.option("--project", required=True)
@click.option("--key", "commit_key", default=None, help="Key to sign with (as the global --key).")
@click.option("--svnlook", default="svnlook", show_default=True,
              help="The svnlook program (the hook gives its absolute path: svn runs hooks "
                   "without PATH).")
@click.argument("repos")
@click.argument("rev")
@pass_state
def notify_svn_commit(state: State, project: str, commit_key: str | None, svnlook: str,
                      repos: str, rev: str) -> None:
    """Publish a signed svn.commit for revision REV of the Subversion
    repository at REPOS (the post-commit hook of `hook install-svn` runs
    this). It never fails: whatever goes wrong, including no answer within
    10 s, is one warning line on stderr and exit 0."""
    import os
    import threading

    from deploybus import redact
    from deploybus.daemons.git_listener import svn

    def warn(why: object) -> None:
        line = " ".join(redact.text(str(why)).split())[:500]
        sys.stderr.write(f"deploybus: warning: svn.commit r{rev} of {project} not "
                         f"published: {line}\n")
        sys.stderr.flush()

    def give_up() -> None:
        warn(f"no answer within {svn.HOOK_DEADLINE:.0f}s")
        os._exit(0)  # the commit is done; never hold the committer

    timer = threading.Timer(svn.HOOK_DEADLINE, give_up)
    timer.daemon = True
    timer.start()
    try:
        body = svn.commit_body(Path(repos), int(rev), project, svnlook=svnlook)
        cfg = configmod.load(state.config_path)
        path = commit_key or state.key_path
        key = cfg.load_signing_key(path=Path(path).resolve() if path else None)
        from deploybus import topics
        from deploybus.bus import connect
        from deploybus.outbox import Event, Outbox, drain, drain_lock
        # the outbox first: a commit made while the broker is down is queued,
        # and goes out with the next commit's hook (or a listener's drainer)
        with Outbox(cfg.outbox_path()) as box:
            box.add([Event(topics.GIT_COMMITS, "svn.commit", body)], source="svn-hook",
                    delivery=f"svn:{project}:{int(rev)}")
            with drain_lock(box.path) as held:
                if held:
                    bus = connect(cfg.bus_url, client_name=f"svn-hook-{project}",
                                  publish_timeout=HOOK_PUBLISH_TIMEOUT)
                    try:
                        drain(box, bus, key=key, sender=f"svn-hook@{socket.gethostname()}")
                    except DeployBusError as exc:
                        sys.stderr.write(f"deploybus: svn.commit r{rev} of {project} queued "
                                         f"for the bus ({exc})\n")
                        return
                    finally:
                        bus.close()
        click.echo(f"deploybus: published svn.commit r{rev} for {project}", err=True)
    except (Exception, SystemExit) as exc:  # noqa: BLE001
        # Never fail the commit (it is made): the fetchers export the
        # youngest revision on their next start.
        warn(exc)
    finally:
        timer.cancel()


@notify.command("build")
@click.option("--project", required=True)
@click.option("--job", required=True, help="The CI job's name.")
@click.option("--number", type=click.IntRange(min=0), required=True, help="The build's number.")
@click.option("--commit", required=True, help="The full commit id that was built.")
@click.option("--ref", required=True, help="The ref built: refs/heads/main, refs/tags/v1 (or "
                                           "a branch name).")
@click.option("--state", "build_state", type=click.Choice(["queued", "started", "finished"]),
              default="finished", show_default=True)
@click.option("--result", type=click.Choice(["SUCCESS", "FAILURE", "ABORTED", "UNSTABLE",
                                             "NOT_BUILT"]), default=None,
              help="How it finished (with --state finished).")
@click.option("--url", default=None, help="The build's page.")
@click.option("--duration", type=float, default=None, help="Seconds the build took.")
@click.option("--backend", default="ci", show_default=True,
              help="Who built it (a name; the build is <backend>/<job>#<number>).")
@pass_state
def notify_build(state: State, project: str, job: str, number: int, commit: str, ref: str,
                 build_state: str, result: str | None, url: str | None,
                 duration: float | None, backend: str) -> None:
    """Publish a signed ci.build for a build a CI job reports itself (a
    Jenkins job step, any CI script): what the CI bridge publishes for the
    builds it starts. Signs with a CI key (--key, or keys.signing)."""
    from deploybus import protocol, topics
    from deploybus.bus import connect
    from deploybus.daemons.ci_bridge.notify import build_event
    if build_state == "finished" and result is None:
        raise click.BadParameter("a finished build needs its --result", param_hint="--result")
    cfg = state.config
    if project not in cfg.projects:
        raise click.BadParameter(f"there is no project {project!r}", param_hint="--project")
    try:
        event = build_event(project=project, ref=ref, commit=commit, job=job, number=number,
                            state=build_state, backend=backend, result=result, url=url,
                            duration=duration)
    except DeployBusError as exc:
        raise click.UsageError(str(exc)) from None
    key = state.signing_key()
    with connect(cfg.bus_url, client_name=f"notify-{job}", publish_timeout=10) as bus:
        bus.publish(topics.CI_EVENTS, protocol.seal(event, key=key,
                                                    sender=f"notify@{socket.gethostname()}",
                                                    correlation=event.build))
    click.echo(f"ci.build {event.build} {build_state}"
               + (f" {result}" if result else "") + f" published for {project} {commit[:12]}")


@cli.command("package-notify")
@click.argument("package")
@click.argument("version")
@click.option("--distribution", default=None, metavar="D",
              help="The repository's distribution (codename or suite) it went into.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds to get the message onto the bus before giving up.")
@pass_state
def package_notify(state: State, package: str, version: str, distribution: str | None,
                   timeout: float) -> None:
    """Publish a signed package.update: PACKAGE is now at VERSION in this
    Debian repository. For the repository's update hook (reprepro Log:
    notifier, aptly publish script; docs/architecture.md "Package
    updates"): the fetchers of the hosts that watch PACKAGE refresh their
    package lists (apt-get update; nothing is installed).

    Signs with --key (or keys.signing): a repo key (`keys generate NAME
    --role repo`), which may send package updates and nothing else. Exits
    69 when the bus cannot be reached (nothing was sent), 2 when PACKAGE,
    VERSION or D is not a valid Debian name or version.
    """
    from deploybus import protocol, topics
    from deploybus.bus import connect
    from deploybus.errors import BusAuthError, BusError, EnvelopeError
    from deploybus.exits import EXIT_UNAVAILABLE
    fields = {"package": package, "version": version}
    if distribution is not None:
        fields["distribution"] = distribution
    try:
        body = protocol.parse("package.update", fields)
    except EnvelopeError as exc:
        raise click.UsageError(f"not a valid Debian package update: {exc}") from None
    cfg = state.config
    key = state.signing_key()
    what = f"package.update {package} {version}" + (f" ({distribution})" if distribution else "")
    try:
        with connect(cfg.bus_url, client_name=f"package-notify-{package}",
                     publish_timeout=timeout) as bus:
            bus.publish(topics.PACKAGES, protocol.seal(
                body, key=key, sender=f"package-notify@{socket.gethostname()}"))
    except BusAuthError:
        raise  # the CLI's answer to refused credentials: exit 78, naming the config
    except BusError as exc:
        from deploybus.bus import redact
        click.echo(f"deploybus: {what} NOT sent: bus unavailable ({redact(cfg.bus_url)}): "
                   f"{exc}", err=True)
        sys.exit(EXIT_UNAVAILABLE)
    click.echo(f"{what} published")

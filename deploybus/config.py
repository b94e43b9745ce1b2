"""The one YAML configuration file, checked with errors that name file, line and key.

Layout (every key is documented in docs/configuration.md)::

    bus:          {url, prefetch}
    keys:         {signing, trusted: {name: {key: path-or-line, role, host}},
                   policy: [{signer | role, projects, environments}]}
    state:        {url, dir}                 # SQLAlchemy URL of the rollout store
    outbox:       path                       # durable outbox of the hook and the listener
    listener:     {bind, max_body}           # deploybus listener (forge webhooks)
    smtp:         {host, port, from, starttls, credentials, timeout}   # notifications
    web:          {allowed_hosts: [..]}      # Host names the web front end answers to
    defaults:     {root, state_dir, heartbeat, packages}         # per-host defaults
    hosts:        {name: {root, state_dir, heartbeat, signing, packages: {watch: [..],
                          command, coalesce}}}                 # optional per-host overrides
    projects:     {name: {git | svn, scripts: {pre, post, post_switch}, script_timeout, keep,
                          shared: [..], health: {command|url, retries, interval, timeout},
                          user, group, output: {interval, lines, line_chars, max_bytes},
                          ci: {..}, webhook: {secret, repository},
                          notify: {events, webhooks: [{url, format, secret}], email: [..]}}}
    environments: {name: {hosts: [..], projects: [..], request_timeout, ack_timeout,
                          strategy: {..},
                          windows: {timezone, allow, deny},
                          haproxy: {socket, backend, servers, drain_timeout}}}
    include:      [glob, ..]                 # files that add projects: and environments:

Relative paths are taken relative to the directory of the file they are in
(the config file, or the included file).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deploybus.errors import ConfigError, DeployBusError
from deploybus.haproxy import HAProxy
from deploybus.refs import NAME_RE
from deploybus.strategy import DEFAULTS as STRATEGY_DEFAULTS
from deploybus.strategy import Strategy
from deploybus.windows import Windows

STRATEGY_KEYS = tuple(STRATEGY_DEFAULTS)

#: Hook scripts a project may define, in the order the agent runs them.
SCRIPT_STEPS = ("pre", "post", "post_switch")

#: User and group names (POSIX portable, as useradd takes them).
_ACCOUNT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")

#: Keys of a project's ``health`` mapping.
HEALTH_KEYS = ("command", "url", "retries", "interval", "timeout")

#: Keys of a project's ``output`` mapping.
OUTPUT_KEYS = ("interval", "lines", "line_chars", "max_bytes")

#: Top-level keys an included file (``include:``) may have: each of its
#: entries is added to the including file's, and a name defined twice is
#: refused.
INCLUDE_KEYS = ("projects", "environments")


@dataclass
class HealthConfig:
    """A check of the new release before the switch: a command or an HTTP URL."""

    command: str | None = None
    url: str | None = None
    #: Attempts in all; the check fails when every one of them failed.
    retries: int = 3
    interval: float = 2.0
    timeout: float = 10.0


@dataclass
class OutputConfig:
    """How script output is streamed back as ``deploy.progress`` lines."""

    #: Seconds a line may wait before its batch is sent.
    interval: float = 0.5
    #: Lines that make a batch full (sent at once).
    lines: int = 50
    #: Characters kept of one line.
    line_chars: int = 2000
    #: Bytes of output reported per step; the rest is counted, not sent.
    max_bytes: int = 1024 * 1024


#: Placeholders a CI job's parameters may use.
CI_PLACEHOLDERS = ("commit", "ref", "short_ref", "project")

#: CI server kinds the bridge knows (daemons/ci_bridge/<type>.py).
CI_TYPES = ("jenkins", "buildbot")

#: What triggers an environment's auto-deploy.
AUTO_DEPLOY_ON = ("ci_success", "push")


@dataclass
class CiServer:
    """A CI server the bridge talks to (``ci.<name>``)."""

    name: str
    type: str
    url: str
    #: File holding ``user:token`` (Jenkins) or ``user:password``; read when used.
    credentials: Path | None = None
    #: Seconds one HTTP call may take.
    timeout: float = 10.0
    #: Seconds between polls of a queued or running build.
    poll: float = 2.0
    #: File holding the secret the CI server sends with its own build
    #: notifications (Jenkins's Notification plugin); None: not accepted.
    notify_secret: Path | None = None


@dataclass
class ProjectCi:
    """How a project is built (``projects.<p>.ci``): which server's job, for
    which refs (globs over full refnames), with which parameters
    (``{commit}``, ``{ref}``, ``{short_ref}``, ``{project}`` are filled in)."""

    server: str
    job: str
    refs: list[str] = field(default_factory=lambda: ["refs/heads/*"])
    parameters: dict[str, str] = field(default_factory=dict)
    #: Seconds a push waits for newer pushes of the same ref before it is
    #: built (a burst builds only the newest commit).
    settle: float = 2.0

    def builds(self, ref: str) -> bool:
        import fnmatch
        return any(fnmatch.fnmatchcase(ref, p) for p in self.refs)


@dataclass
class AutoDeploy:
    """An environment's auto-deploy (``environments.<e>.auto_deploy``): the
    refs it follows and what triggers it."""

    refs: list[str]
    on: str = "ci_success"

    def follows(self, ref: str) -> bool:
        import fnmatch
        return any(fnmatch.fnmatchcase(ref, p) for p in self.refs)


#: Forges whose webhooks the listener takes.
FORGES = ("github", "gitlab", "gitea", "bitbucket")


@dataclass
class Webhook:
    """A project's forge webhook (``projects.<p>.webhook``)."""

    #: File holding the shared secret the forge signs (or sends) with; read
    #: when a delivery arrives, never logged.
    secret: Path
    #: The repository's full name on the forge (``team/app``) or one of its
    #: URLs; None: matched against the project's ``git`` URL.
    repository: str | None = None

    def read_secret(self) -> bytes:
        return self.secret.read_bytes().strip()


#: Events a project's notifications may be sent for.
NOTIFY_EVENTS = ("started", "succeeded", "partial", "failed", "halted", "rolled_back",
                 "aborted", "ci_failed")
#: Bodies an outgoing notification webhook may have.
NOTIFY_FORMATS = ("slack", "json")


@dataclass
class NotifyWebhook:
    url: str
    #: ``slack`` (a Slack-compatible ``{"text": ...}``) or ``json`` (the
    #: event, signed with an HMAC-SHA256 header when ``secret`` is given).
    format: str = "json"
    secret: Path | None = None


@dataclass
class Notify:
    """Where a project's notifications go (``projects.<p>.notify``)."""

    events: list[str] = field(default_factory=lambda: list(NOTIFY_EVENTS))
    webhooks: list[NotifyWebhook] = field(default_factory=list)
    email: list[str] = field(default_factory=list)


@dataclass
class Smtp:
    """The mail server notifications are sent through (``smtp``)."""

    host: str = "127.0.0.1"
    port: int = 25
    sender: str = "deploybus@localhost"
    starttls: bool = False
    #: File holding ``user:password``; None: no login.
    credentials: Path | None = None
    timeout: float = 10.0


@dataclass
class PackageWatch:
    """Debian packages a host watches (``defaults.packages`` or
    ``hosts.<h>.packages``): on a ``package.update`` of one of them its
    fetcher runs ``command`` (never an install), once per burst."""

    watch: list[str] = field(default_factory=list)   # names or globs
    command: str = "apt-get update -q"
    #: Seconds to gather a burst of updates into one run of the command.
    coalesce: float = 5.0

    def watches(self, package: str) -> bool:
        import fnmatch
        return any(fnmatch.fnmatchcase(package, p) for p in self.watch)


@dataclass
class Listener:
    """``deploybus listener``: where it listens and what it accepts."""

    bind: str = "127.0.0.1:8090"
    #: Bytes a webhook body may have; a larger one is a 413.
    max_body: int = 1024 * 1024


#: Version control systems a project may be in.
VCS = ("git", "svn")


@dataclass
class ProjectConfig:
    name: str
    git: str
    scripts: dict[str, str] = field(default_factory=dict)
    script_timeout: float = 600.0
    keep: int = 5
    #: Paths (relative to a release) linked to ``<root>/<project>/shared/``.
    shared: list[str] = field(default_factory=list)
    health: HealthConfig | None = None
    #: OS user (and group) the scripts and health command run as; None: the agent's.
    user: str | None = None
    group: str | None = None
    output: OutputConfig = field(default_factory=OutputConfig)
    ci: ProjectCi | None = None
    webhook: Webhook | None = None
    notify: Notify | None = None
    #: ``git`` or ``svn``; for svn, ``git`` holds the repository's URL.
    vcs: str = "git"


@dataclass
class EnvironmentConfig:
    name: str
    hosts: list[str]
    projects: list[str] | None = None
    request_timeout: float = 900.0
    #: Seconds an agent has to acknowledge a request (and take it before it
    #: expires unread); a silent agent fails its host after this long.
    ack_timeout: float = 30.0
    strategy: dict[str, Any] = field(default_factory=dict)   # see deploybus.strategy
    windows: Any = None                                      # deploybus.windows.Windows
    haproxy: Any = None                                      # deploybus.haproxy.HAProxy
    auto_deploy: AutoDeploy | None = None


#: Seconds between a daemon's heartbeats unless the config says otherwise.
HEARTBEAT = 10.0


@dataclass
class HostConfig:
    name: str
    root: Path
    state_dir: Path
    #: Seconds between the heartbeats of this host's daemons.
    heartbeat: float = HEARTBEAT
    #: The private key this host's daemons sign with (its role: host); None:
    #: keys.signing. Lets one config serve several hosts on one machine.
    signing: Path | None = None
    signing_line: int | None = None
    packages: PackageWatch | None = None


#: Host names the web answers to unless ``web.allowed_hosts`` says otherwise:
#: the loopback names a browser on the same machine uses.
WEB_ALLOWED_HOSTS = ("127.0.0.1", "localhost")

#: A DNS host name (RFC 1123 labels, ASCII; IDNs in their ``xn--`` form).
_HOST_NAME_RE = re.compile(
    r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")


@dataclass
class Config:
    path: Path
    bus_url: str = "memory://"
    prefetch: int = 10
    signing_key: Path | None = None
    #: Line of keys.signing in the file, for errors about the key.
    signing_key_line: int | None = None
    trusted: dict[str, Any] = field(default_factory=dict)  # name -> signing.TrustedKey
    policy: list[Any] = field(default_factory=list)        # PolicyRule
    state_url: str = "sqlite:///deploybus.db"
    #: The orchestrator's and the CI bridge's own files (git mirrors to compare
    #: commits); beside a SQLite state database unless ``state.dir`` says.
    state_dir: Path = Path("/var/lib/deploybus/server")
    #: Host names (or IPv4 addresses) the web answers to; any other Host header is a 400.
    web_allowed_hosts: list[str] = field(default_factory=lambda: list(WEB_ALLOWED_HOSTS))
    default_root: Path = Path("/srv/deploy")
    default_state_dir: Path = Path("/var/lib/deploybus")
    default_heartbeat: float = HEARTBEAT
    hosts: dict[str, HostConfig] = field(default_factory=dict)
    projects: dict[str, ProjectConfig] = field(default_factory=dict)
    environments: dict[str, EnvironmentConfig] = field(default_factory=dict)
    ci_servers: dict[str, CiServer] = field(default_factory=dict)
    default_packages: PackageWatch | None = None
    #: The durable outbox (SQLite) the post-receive hook and the listener
    #: write events to before they are published; default: state.dir/outbox.db.
    outbox: Path | None = None
    listener: Listener = field(default_factory=Listener)
    smtp: Smtp | None = None
    #: Files ``include:`` added projects and environments from, in the order read.
    included: list[Path] = field(default_factory=list)

    def host(self, name: str) -> HostConfig:
        """Settings of host ``name``, defaults filled in."""
        return self.hosts.get(name) or HostConfig(name, self.default_root,
                                                  self.default_state_dir,
                                                  self.default_heartbeat,
                                                  packages=self.default_packages)

    def outbox_path(self) -> Path:
        return self.outbox or self.state_dir / "outbox.db"

    def projects_for_host(self, host: str) -> list[ProjectConfig]:
        """Projects some environment deploys to ``host``."""
        names: set[str] = set()
        for env in self.environments.values():
            if host in env.hosts:
                names.update(env.projects if env.projects is not None else self.projects)
        return [self.projects[n] for n in sorted(names)]

    def signing_path(self, host: str | None = None) -> tuple[Path | None, str, int | None]:
        """The private key a process signs with (host ``host``'s own key if the
        config gives it one, else keys.signing), the config key naming it and
        that key's line."""
        hc = self.hosts.get(host) if host else None
        if hc is not None and hc.signing is not None:
            return hc.signing, f"hosts.{host}.signing", hc.signing_line
        return self.signing_key, "keys.signing", self.signing_key_line

    def load_signing_key(self, host: str | None = None, path: Path | None = None) -> Any:
        """The private key to sign with (:meth:`signing_path`, or ``path``); a
        ConfigError that names the config file, line and key, the key file
        and what to do if it cannot be read."""
        from deploybus.signing import SigningKey
        where, line = "--key", None
        if path is None:
            path, where, line = self.signing_path(host)
        if path is None:
            raise ConfigError("no signing key configured: add keys.signing (a private key "
                              "made with `deploybus keys generate NAME --role ROLE --dir DIR`)",
                              path=str(self.path), key="keys.signing")
        try:
            return SigningKey.load(path)
        except ConfigError as exc:
            raise ConfigError(f"{exc}; {_key_hint(path)}", path=str(self.path), line=line,
                              key=where) from None

    def verifier(self, replay_path: Path | None = None) -> Any:
        from deploybus.signing import ReplayCache, Verifier
        return Verifier(self.trusted, self.policy, replay=ReplayCache(replay_path))


class _Checker:
    """Walks the parsed YAML with the line of every key at hand."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines: dict[tuple[str, ...], int] = {}
        #: Entries that came from an included file: their key -> that file
        #: (errors name it, relative paths are taken from its directory).
        self.files: dict[tuple[str, ...], Path] = {}
        #: The files include: named, in the order they were read.
        self.included: list[Path] = []
        # One parse gives both the nodes (with their lines) and the data;
        # libyaml's loader when PyYAML has it.
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
        try:
            node = loader.get_single_node()
            self.data = loader.construct_document(node) if node is not None else None
        except yaml.YAMLError as exc:
            raise _yaml_error(exc, path, text) from None
        finally:
            loader.dispose()
        if node is not None:
            self._index(node, ())

    def _index(self, node: yaml.Node, at: tuple[str, ...]) -> None:
        self.lines.setdefault(at, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for k, v in node.value:
                key = str(k.value)
                if key in seen:
                    raise ConfigError("duplicate key", path=str(self.path),
                                      line=k.start_mark.line + 1, key=".".join(at + (key,)))
                seen.add(key)
                self.lines[at + (key,)] = k.start_mark.line + 1
                self._index(v, at + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                self.lines[at + (str(i),)] = v.start_mark.line + 1
                self._index(v, at + (str(i),))

    def file_of(self, at: tuple[str, ...]) -> Path:
        """The file the key ``at`` is written in: an included file's entries
        (and everything under them) are in that file, the rest in this one."""
        for n in range(len(at), 0, -1):
            f = self.files.get(at[:n])
            if f is not None:
                return f
        return self.path

    def fail(self, at: tuple[str, ...], message: str) -> ConfigError:
        line = None
        probe = at
        while probe and line is None:
            line = self.lines.get(probe)
            probe = probe[:-1]
        return ConfigError(message, path=str(self.file_of(at)),
                           line=line or self.lines.get(()), key=".".join(at) or None)

    def mapping(self, value: Any, at: tuple[str, ...], allowed: tuple[str, ...] | None) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(at, f"expected a mapping, got {type(value).__name__}")
        if allowed is not None:
            for key in value:
                if key not in allowed:
                    import difflib  # only for the error message
                    close = difflib.get_close_matches(str(key), allowed, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else \
                        f" (known: {', '.join(allowed)})"
                    raise self.fail(at + (str(key),), f"unknown key{hint}")
        return value

    def string(self, value: Any, at: tuple[str, ...]) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(at, f"expected a non-empty string, got {value!r:.40}")
        return value

    def number(self, value: Any, at: tuple[str, ...], *, minimum: float = 0) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
            raise self.fail(at, f"expected a number >= {minimum}, got {value!r:.40}")
        return value

    def strings(self, value: Any, at: tuple[str, ...]) -> list[str]:
        if not isinstance(value, list):
            raise self.fail(at, f"expected a list, got {type(value).__name__}")
        return [self.string(v, at + (str(i),)) for i, v in enumerate(value)]

    def name(self, value: Any, at: tuple[str, ...]) -> str:
        s = self.string(value, at)
        if not NAME_RE.fullmatch(s):
            raise self.fail(at, f"{s!r} is not a valid name (letters, digits, '.', '_', '-')")
        return s

    def path_value(self, value: Any, at: tuple[str, ...]) -> Path:
        p = Path(os.path.expanduser(self.string(value, at)))
        return p if p.is_absolute() else (self.file_of(at).parent / p).resolve()

    def include(self, overrides: Mapping[Path, str]) -> None:
        """Add the ``projects`` and ``environments`` of the files ``include:``
        names (globs, in name order) to this file's, remembering which file
        and line each entry came from. ``overrides``: included files to read
        from the given text instead of the disk (a file that is about to be
        written: ``deploybus config check --include-candidate``)."""
        import fnmatch
        import glob
        data = self.data
        overrides = {Path(k).resolve(): v for k, v in overrides.items()}
        if not isinstance(data, dict) or data.get("include") is None:
            if overrides:
                raise ConfigError(f"{', '.join(map(str, overrides))} is not included: the "
                                  f"file has no include: key", path=str(self.path))
            return
        at: tuple[str, ...] = ("include",)
        raw = data["include"]
        patterns = [(at, raw)] if isinstance(raw, str) else \
            [(at + (str(i),), v) for i, v in enumerate(self.strings(raw, at))]
        me = self.path.resolve()
        files: dict[Path, tuple[str, ...]] = {}
        unused = set(overrides)
        for where, pattern in patterns:
            full = self.path_value(pattern, where).resolve()
            if glob.has_magic(str(full)):
                found = [Path(m).resolve() for m in glob.glob(str(full)) if os.path.isfile(m)]
                # a file about to be written is included if the pattern would find it
                found += [p for p in overrides if p not in found
                          and fnmatch.fnmatchcase(str(p), str(full))
                          and (not p.name.startswith(".") or full.name.startswith("."))]
            elif full in overrides or full.is_file():
                found = [full]
            else:
                raise self.fail(where, f"cannot read {full}: no such file (a pattern such as "
                                       f"conf.d/*.yaml may match nothing; a file name must "
                                       f"exist)")
            for f in sorted(found):
                if f == me:
                    raise self.fail(where, f"{f} is this file itself; include other files "
                                           f"(e.g. conf.d/*.yaml)")
                files.setdefault(f, where)
                unused.discard(f)
        if unused:
            raise self.fail(at, f"{', '.join(map(str, sorted(unused)))} is not matched by "
                                f"any include: pattern, so it would not be read")
        for f, where in files.items():
            if f in overrides:
                text = overrides[f]
            else:
                try:
                    text = f.read_text()
                except OSError as exc:
                    raise self.fail(where, f"cannot read {f}: {exc.strerror}") from None
            self._merge(_Checker(f, text))
            self.included.append(f)

    def _merge(self, sub: _Checker) -> None:
        data = self.data
        assert isinstance(data, dict)
        top = sub.mapping(sub.data, (), INCLUDE_KEYS)
        for section in INCLUDE_KEYS:
            entries = sub.mapping(top.get(section), (section,), None)
            if not entries:
                continue
            target = data.get(section)
            if target is None:
                target = data[section] = {}
            elif not isinstance(target, dict):
                raise self.fail((section,), f"expected a mapping, got {type(target).__name__}")
            for name, value in entries.items():
                key = (section, str(name))
                if name in target:
                    first = self.lines.get(key)
                    raise sub.fail(key, f"already defined in {self.file_of(key)}"
                                        f"{f':{first}' if first else ''}; a name may be "
                                        f"defined once")
                target[name] = value
                self.files[key] = sub.path
                for k, line in sub.lines.items():
                    if k[:2] == key:
                        self.lines[k] = line


def _key_hint(path: Path) -> str:
    """What to do about a private key that cannot be loaded."""
    if not path.exists():
        return (f"create it with `deploybus keys generate {path.stem} --dir {path.parent}` "
                f"and trust its .pub where it must be believed, or point keys.signing at "
                f"an existing key")
    if not os.access(path, os.R_OK):
        return ("run as a user that may read it (keys are 0600: the daemon's user), or "
                "make it readable by this user")
    return "it must be a PEM ed25519 private key as `deploybus keys generate` writes"


def _yaml_error(exc: yaml.YAMLError, path: Path, text: str) -> ConfigError:
    """A YAML syntax error at the line a person should look at. The parser
    notices an unclosed quote or bracket only at the end of the file (a line
    past the last one) or on a later line: name the line where that
    construct began as well, and at the end of the file, that line alone."""
    problem = getattr(exc, "problem", None) or str(exc)
    mark, context = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
    line = mark.line + 1 if mark else None
    last = len(text.splitlines()) or 1
    what = getattr(exc, "context", None)
    if context is not None and what:
        began = context.line + 1
        if line is None or line > last:
            line = began
        problem += f" ({what} that begins on line {began})" if began != line else f" ({what})"
    elif line is not None and line > last:
        line = last
    return ConfigError(f"not valid YAML: {problem}", path=str(path), line=line)


def load(path: str | os.PathLike[str], *,
         overrides: Mapping[Path, str] | None = None) -> Config:
    """Read and check the config file at ``path`` and the files it includes
    (``overrides``: included files to take from the given text instead)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror}", path=str(p)) from None
    return parse(text, p, overrides=overrides)


def check_included(path: Path, text: str) -> Config:
    """Check ``text``, to be written to ``path``, as an included file on its
    own (the file that will include it does not exist yet)."""
    import json
    path = Path(path).resolve()
    return parse(f"include: [{json.dumps(str(path))}]\n", path.parent / "(included alone)",
                 overrides={path: text})


def parse(text: str, path: Path, *, overrides: Mapping[Path, str] | None = None) -> Config:
    from deploybus.protocol import Role
    from deploybus.signing import REQUESTERS, PolicyRule, TrustedKey, key_id, parse_public

    c = _Checker(path, text)
    c.include(overrides or {})
    top = c.mapping(c.data, (), ("bus", "keys", "state", "outbox", "listener", "smtp", "web",
                                 "ci", "defaults", "hosts", "projects", "environments",
                                 "include"))
    cfg = Config(path=path, included=c.included)

    bus = c.mapping(top.get("bus"), ("bus",), ("url", "prefetch"))
    if "url" in bus:
        cfg.bus_url = c.string(bus["url"], ("bus", "url"))
        from deploybus.bus import SCHEMES
        scheme = cfg.bus_url.split("://", 1)[0]
        if "://" not in cfg.bus_url or scheme not in SCHEMES:
            raise c.fail(("bus", "url"), f"unsupported bus URL; use one of "
                                         f"{', '.join(s + '://' for s in SCHEMES)}")
    if "prefetch" in bus:
        cfg.prefetch = int(c.number(bus["prefetch"], ("bus", "prefetch"), minimum=1))

    keys = c.mapping(top.get("keys"), ("keys",), ("signing", "trusted", "policy"))
    if keys.get("signing") is not None:
        cfg.signing_key = c.path_value(keys["signing"], ("keys", "signing"))
        cfg.signing_key_line = c.lines.get(("keys", "signing"))
    roles = ", ".join(r.value for r in Role)
    for name, value in c.mapping(keys.get("trusted"), ("keys", "trusted"), None).items():
        at: tuple[str, ...] = ("keys", "trusted", str(name))
        c.name(name, at)
        if not isinstance(value, dict):
            raise c.fail(at, f"give the key and its role: {{key: <file or 'ed25519 ...' "
                             f"line>, role: <{roles}>}}")
        entry = c.mapping(value, at, ("key", "role", "host"))
        for k in ("key", "role"):
            if k not in entry:
                raise c.fail(at, f"missing key {k!r}")
        role_text = c.string(entry["role"], at + ("role",))
        try:
            role = Role(role_text)
        except ValueError:
            raise c.fail(at + ("role",), f"unknown role {role_text!r:.40}; one of "
                                         f"{roles}") from None
        text_value = c.string(entry["key"], at + ("key",))
        if not text_value.startswith("ed25519 "):
            kp = c.path_value(text_value, at + ("key",))
            try:
                text_value = kp.read_text()
            except OSError as exc:
                raise c.fail(at + ("key",), f"cannot read public key {kp}: "
                                            f"{exc.strerror}") from None
        try:
            public = parse_public(text_value, where=f"key {name}")
        except ConfigError as exc:
            raise c.fail(at + ("key",), str(exc)) from None
        host = None
        if role is Role.HOST:
            host = c.name(entry["host"], at + ("host",)) if "host" in entry else str(name)
        elif "host" in entry:
            raise c.fail(at + ("host",), "only a host key speaks for a host")
        cfg.trusted[name] = TrustedKey(name=str(name), role=role, public=public, host=host)
    seen_ids: dict[str, str] = {}
    for name, tk in cfg.trusted.items():
        kid = key_id(tk.public)
        if kid in seen_ids:
            raise c.fail(("keys", "trusted", name), f"the same key as {seen_ids[kid]!r}: one "
                                                    f"key, one role")
        seen_ids[kid] = name
    policy = keys.get("policy") or []
    if not isinstance(policy, list):
        raise c.fail(("keys", "policy"), "expected a list of rules")
    requesters = ", ".join(r.value for r in REQUESTERS)
    for i, rule in enumerate(policy):
        at = ("keys", "policy", str(i))
        r = c.mapping(rule, at, ("signer", "role", "projects", "environments"))
        if ("signer" in r) == ("role" in r):
            raise c.fail(at, "give exactly one of 'signer' (a key's name) or 'role'")
        signer, rule_role = None, None
        if "signer" in r:
            signer = c.name(r["signer"], at + ("signer",))
            if signer not in cfg.trusted:
                raise c.fail(at + ("signer",), f"signer {signer!r} is not in keys.trusted")
            if cfg.trusted[signer].role not in REQUESTERS:
                raise c.fail(at + ("signer",), f"{signer!r} is a {cfg.trusted[signer].role} "
                                               f"key; the policy is for keys that ask for "
                                               f"rollouts ({requesters})")
        else:
            role_text = c.string(r["role"], at + ("role",))
            if role_text not in {x.value for x in REQUESTERS}:
                raise c.fail(at + ("role",), f"the policy is for roles that ask for rollouts: "
                                             f"{requesters}")
            rule_role = Role(role_text)
        cfg.policy.append(PolicyRule(
            signer=signer, role=rule_role,
            projects=c.strings(r.get("projects", ["*"]), at + ("projects",)),
            environments=c.strings(r.get("environments", ["*"]), at + ("environments",))))

    state = c.mapping(top.get("state"), ("state",), ("url", "dir"))
    if "url" in state:
        url = c.string(state["url"], ("state", "url"))
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            url = "sqlite:///" + str((path.parent / url[len("sqlite:///"):]).resolve())
        cfg.state_url = url
    if "dir" in state:
        cfg.state_dir = c.path_value(state["dir"], ("state", "dir"))
    elif cfg.state_url.startswith("sqlite:////"):
        cfg.state_dir = Path(cfg.state_url[len("sqlite:///"):]).parent / "server"

    if top.get("outbox") is not None:
        cfg.outbox = c.path_value(top["outbox"], ("outbox",))
    lis = c.mapping(top.get("listener"), ("listener",), ("bind", "max_body"))
    if "bind" in lis:
        cfg.listener.bind = _bind(c, lis["bind"], ("listener", "bind"))
    if "max_body" in lis:
        cfg.listener.max_body = int(c.number(lis["max_body"], ("listener", "max_body"),
                                             minimum=1024))
    if top.get("smtp") is not None:
        cfg.smtp = _smtp(c, top["smtp"])

    web = c.mapping(top.get("web"), ("web",), ("allowed_hosts",))
    if "allowed_hosts" in web:
        web_at = ("web", "allowed_hosts")
        cfg.web_allowed_hosts = [_web_host(c, h, web_at + (str(i),)) for i, h in
                                 enumerate(c.strings(web["allowed_hosts"], web_at))]
        if not cfg.web_allowed_hosts:
            raise c.fail(web_at, "expected at least one host name")

    defaults = c.mapping(top.get("defaults"), ("defaults",), ("root", "state_dir", "heartbeat",
                                                               "packages"))
    cfg.default_packages = _packages(c, defaults.get("packages"), ("defaults", "packages"))
    if "heartbeat" in defaults:
        cfg.default_heartbeat = c.number(defaults["heartbeat"], ("defaults", "heartbeat"),
                                         minimum=0.1)
    if "root" in defaults:
        cfg.default_root = c.path_value(defaults["root"], ("defaults", "root"))
    if "state_dir" in defaults:
        cfg.default_state_dir = c.path_value(defaults["state_dir"], ("defaults", "state_dir"))

    for name, h in c.mapping(top.get("hosts"), ("hosts",), None).items():
        at = ("hosts", str(name))
        c.name(name, at)
        h = c.mapping(h, at, ("root", "state_dir", "heartbeat", "signing", "packages"))
        cfg.hosts[name] = HostConfig(
            name,
            c.path_value(h["root"], at + ("root",)) if "root" in h else cfg.default_root,
            c.path_value(h["state_dir"], at + ("state_dir",)) if "state_dir" in h
            else cfg.default_state_dir,
            c.number(h["heartbeat"], at + ("heartbeat",), minimum=0.1) if "heartbeat" in h
            else cfg.default_heartbeat,
            c.path_value(h["signing"], at + ("signing",)) if "signing" in h else None,
            c.lines.get(at + ("signing",)),
            _packages(c, h["packages"], at + ("packages",)) if "packages" in h
            else cfg.default_packages)

    for name, server in c.mapping(top.get("ci"), ("ci",), None).items():
        cfg.ci_servers[str(name)] = _ci_server(c, str(name), server)

    for name, pr in c.mapping(top.get("projects"), ("projects",), None).items():
        at = ("projects", str(name))
        c.name(name, at)
        pr = c.mapping(pr, at, ("git", "svn", "scripts", "script_timeout", "keep", "shared",
                                "health", "user", "group", "output", "ci", "webhook",
                                "notify"))
        if "git" not in pr and "svn" not in pr:
            raise c.fail(at, "missing key 'git' (the repository URL or path to deploy from; "
                             "svn: for a Subversion project)")
        if "git" in pr and "svn" in pr:
            raise c.fail(at + ("svn",), "give one of 'git' or 'svn', not both")
        vcs = "git" if "git" in pr else "svn"
        git = c.string(pr[vcs], at + (vcs,))
        if vcs == "svn":
            if not git.startswith(("file://", "svn://", "svn+ssh://", "http://", "https://")):
                git = "file://" + str(c.path_value(git, at + ("svn",)))
        elif "://" not in git and not git.startswith(("git@", "/")) and ":" not in git:
            git = str(c.path_value(git, at + ("git",)))
        scripts = {k: c.string(v, at + ("scripts", k)) for k, v in
                   c.mapping(pr.get("scripts"), at + ("scripts",), SCRIPT_STEPS).items()}
        cfg.projects[name] = ProjectConfig(
            name=name, git=git, scripts=scripts,
            script_timeout=c.number(pr.get("script_timeout", 600), at + ("script_timeout",),
                                    minimum=1),
            keep=int(c.number(pr.get("keep", 5), at + ("keep",), minimum=1)),
            shared=_shared(c, pr.get("shared"), at + ("shared",)),
            health=_health(c, pr.get("health"), at + ("health",)),
            user=_account(c, pr.get("user"), at + ("user",)),
            group=_account(c, pr.get("group"), at + ("group",)),
            output=_output(c, pr.get("output"), at + ("output",)),
            ci=_project_ci(c, cfg, pr.get("ci"), at + ("ci",)),
            webhook=_webhook(c, pr.get("webhook"), at + ("webhook",)),
            notify=_notify(c, cfg, pr.get("notify"), at + ("notify",)),
            vcs=vcs)

    for name, ev in c.mapping(top.get("environments"), ("environments",), None).items():
        at = ("environments", str(name))
        c.name(name, at)
        ev = c.mapping(ev, at, ("hosts", "projects", "request_timeout", "ack_timeout",
                                "strategy", "windows", "haproxy", "auto_deploy"))
        if "hosts" not in ev:
            raise c.fail(at, "missing key 'hosts'")
        hosts = [c.name(h, at + ("hosts", str(i))) for i, h in
                 enumerate(c.strings(ev["hosts"], at + ("hosts",)))]
        projects = None
        if "projects" in ev:
            projects = c.strings(ev["projects"], at + ("projects",))
            for i, pn in enumerate(projects):
                if pn not in cfg.projects:
                    raise c.fail(at + ("projects", str(i)), f"unknown project {pn!r}")
        strategy = c.mapping(ev.get("strategy"), at + ("strategy",), STRATEGY_KEYS)
        try:
            Strategy.parse(strategy).phases(hosts)
        except DeployBusError as exc:
            raise c.fail(at + ("strategy",), str(exc)) from None
        wspec = c.mapping(ev.get("windows"), at + ("windows",), ("timezone", "allow", "deny"))
        for k in ("allow", "deny"):
            if k in wspec:
                c.strings(wspec[k], at + ("windows", k))
        try:
            windows = Windows.parse(wspec)
        except DeployBusError as exc:
            raise c.fail(at + ("windows",), str(exc)) from None
        haproxy = None
        if ev.get("haproxy") is not None:
            hat = at + ("haproxy",)
            hp = c.mapping(ev["haproxy"], hat, ("socket", "backend", "servers", "drain_timeout"))
            for k in ("socket", "backend"):
                if k not in hp:
                    raise c.fail(hat, f"missing key {k!r}")
            servers = {str(h): c.string(v, hat + ("servers", str(h))) for h, v in
                       c.mapping(hp.get("servers"), hat + ("servers",), None).items()}
            for h in servers:
                if h not in hosts:
                    raise c.fail(hat + ("servers", h), f"{h!r} is not a host of {name}")
            sock = c.string(hp["socket"], hat + ("socket",))
            haproxy = HAProxy(
                socket=str(c.path_value(sock, hat + ("socket",))) if "/" in sock else sock,
                backend=c.string(hp["backend"], hat + ("backend",)), servers=servers,
                drain_timeout=c.number(hp.get("drain_timeout", 30), hat + ("drain_timeout",)))
        cfg.environments[name] = EnvironmentConfig(
            name=name, hosts=hosts, projects=projects,
            request_timeout=c.number(ev.get("request_timeout", 900),
                                     at + ("request_timeout",), minimum=1),
            ack_timeout=c.number(ev.get("ack_timeout", 30), at + ("ack_timeout",), minimum=1),
            strategy=strategy, windows=windows, haproxy=haproxy,
            auto_deploy=_auto_deploy(c, ev.get("auto_deploy"), at + ("auto_deploy",)))
    # A host has one `current` per project: two environments deploying the
    # same project to the same host would move each other's, and a key
    # allowed only one of them could move the other's. (An environment
    # without `projects:` deploys every project.)
    deployed_by: dict[tuple[str, str], str] = {}
    for ename, ec in cfg.environments.items():
        for i, host in enumerate(ec.hosts):
            for pn in ec.projects if ec.projects is not None else cfg.projects:
                first = deployed_by.setdefault((pn, host), ename)
                if first != ename:
                    raise c.fail(("environments", ename, "hosts", str(i)),
                                 f"host {host!r} gets project {pn!r} from both {first!r} and "
                                 f"{ename!r}: each would move the other's current; deploy a "
                                 f"project to a host from one environment only (list "
                                 f"'projects:'), or give this environment hosts of its own "
                                 f"(with their own root)")
    return cfg


def _ci_server(c: _Checker, name: str, value: Any) -> CiServer:
    at = ("ci", name)
    c.name(name, at)
    v = c.mapping(value, at, ("type", "url", "credentials", "timeout", "poll", "notify_secret"))
    for k in ("type", "url"):
        if k not in v:
            raise c.fail(at, f"missing key {k!r}")
    kind = c.string(v["type"], at + ("type",))
    if kind not in CI_TYPES:
        raise c.fail(at + ("type",), f"unknown CI server type {kind!r:.40} (known: "
                                     f"{', '.join(CI_TYPES)})")
    url = c.string(v["url"], at + ("url",)).rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise c.fail(at + ("url",), f"{url!r:.60} is not an http:// or https:// URL")
    if "@" in url.split("//", 1)[1].split("/", 1)[0]:
        raise c.fail(at + ("url",), "put credentials in a file named by 'credentials', not "
                                    "in the URL (it is logged and shown)")
    files: dict[str, Path | None] = {}
    for k in ("credentials", "notify_secret"):
        files[k] = None
        if k in v:
            files[k] = c.path_value(v[k], at + (k,))
            if not files[k].is_file():  # type: ignore[union-attr]
                raise c.fail(at + (k,), f"cannot read {files[k]}: no such file")
    creds = files["credentials"]
    return CiServer(name=name, type=kind, url=url, credentials=creds,
                    notify_secret=files["notify_secret"],
                    timeout=c.number(v.get("timeout", 10), at + ("timeout",), minimum=0.1),
                    poll=c.number(v.get("poll", 2), at + ("poll",), minimum=0.05))


def _bind(c: _Checker, value: Any, at: tuple[str, ...]) -> str:
    text = c.string(value, at)
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise c.fail(at, f"{text!r:.60}: give HOST:PORT, e.g. 127.0.0.1:8090")
    return text


def _secret_file(c: _Checker, value: Any, at: tuple[str, ...]) -> Path:
    p = c.path_value(value, at)
    if not p.is_file():
        raise c.fail(at, f"cannot read {p}: no such file (give the path of a file that "
                         f"holds the secret, not the secret itself)")
    return p


def _webhook(c: _Checker, value: Any, at: tuple[str, ...]) -> Webhook | None:
    if value is None:
        return None
    v = c.mapping(value, at, ("secret", "repository"))
    if "secret" not in v:
        raise c.fail(at, "missing key 'secret' (a file holding the webhook's shared secret)")
    return Webhook(secret=_secret_file(c, v["secret"], at + ("secret",)),
                   repository=c.string(v["repository"], at + ("repository",))
                   if "repository" in v else None)


def _notify(c: _Checker, cfg: Config, value: Any, at: tuple[str, ...]) -> Notify | None:
    if value is None:
        return None
    v = c.mapping(value, at, ("events", "webhooks", "email"))
    n = Notify()
    if "events" in v:
        n.events = c.strings(v["events"], at + ("events",))
        for i, e in enumerate(n.events):
            if e not in NOTIFY_EVENTS:
                raise c.fail(at + ("events", str(i)), f"unknown event {e!r:.40} (known: "
                                                      f"{', '.join(NOTIFY_EVENTS)})")
    hooks = v.get("webhooks") or []
    if not isinstance(hooks, list):
        raise c.fail(at + ("webhooks",), "expected a list of {url, format, secret}")
    for i, h in enumerate(hooks):
        hat = at + ("webhooks", str(i))
        hv = c.mapping(h, hat, ("url", "format", "secret"))
        if "url" not in hv:
            raise c.fail(hat, "missing key 'url'")
        url = c.string(hv["url"], hat + ("url",))
        if not url.startswith(("http://", "https://")):
            raise c.fail(hat + ("url",), f"{url!r:.60} is not an http:// or https:// URL")
        fmt = c.string(hv.get("format", "json"), hat + ("format",))
        if fmt not in NOTIFY_FORMATS:
            raise c.fail(hat + ("format",), f"{fmt!r:.40}: one of {', '.join(NOTIFY_FORMATS)}")
        n.webhooks.append(NotifyWebhook(
            url=url, format=fmt,
            secret=_secret_file(c, hv["secret"], hat + ("secret",)) if "secret" in hv
            else None))
    if "email" in v:
        n.email = c.strings(v["email"], at + ("email",))
        for i, addr in enumerate(n.email):
            if not re.fullmatch(r"[^@\s]+@[^@\s]+", addr):
                raise c.fail(at + ("email", str(i)), f"{addr!r:.60} is not an email address")
        if cfg.smtp is None:
            raise c.fail(at + ("email",), "email needs a mail server: add smtp: {host, port, "
                                          "from}")
    return n


def _smtp(c: _Checker, value: Any) -> Smtp:
    at = ("smtp",)
    v = c.mapping(value, at, ("host", "port", "from", "starttls", "credentials", "timeout"))
    s = Smtp()
    if "host" in v:
        s.host = c.string(v["host"], at + ("host",))
    if "port" in v:
        s.port = int(c.number(v["port"], at + ("port",), minimum=1))
    if "from" in v:
        s.sender = c.string(v["from"], at + ("from",))
    if "starttls" in v:
        if not isinstance(v["starttls"], bool):
            raise c.fail(at + ("starttls",), "expected true or false")
        s.starttls = v["starttls"]
    if "credentials" in v:
        s.credentials = _secret_file(c, v["credentials"], at + ("credentials",))
    if "timeout" in v:
        s.timeout = c.number(v["timeout"], at + ("timeout",), minimum=0.1)
    return s


def _packages(c: _Checker, value: Any, at: tuple[str, ...]) -> PackageWatch | None:
    if value is None:
        return None
    v = c.mapping(value, at, ("watch", "command", "coalesce"))
    if "watch" not in v:
        raise c.fail(at, "missing key 'watch' (the Debian packages, or globs, to watch)")
    pw = PackageWatch(watch=c.strings(v["watch"], at + ("watch",)))
    if "command" in v:
        pw.command = c.string(v["command"], at + ("command",))
    if "coalesce" in v:
        pw.coalesce = c.number(v["coalesce"], at + ("coalesce",), minimum=0)
    return pw


def _ref_patterns(c: _Checker, value: Any, at: tuple[str, ...]) -> list[str]:
    patterns = c.strings(value, at)
    for i, p in enumerate(patterns):
        if not p.startswith("refs/"):
            raise c.fail(at + (str(i),), f"{p!r:.60} is not a full refname pattern; say "
                                         f"refs/heads/{p} or refs/tags/{p}")
    return patterns


def _project_ci(c: _Checker, cfg: Config, value: Any, at: tuple[str, ...]) -> ProjectCi | None:
    if value is None:
        return None
    v = c.mapping(value, at, ("server", "job", "refs", "parameters", "settle"))
    for k in ("server", "job"):
        if k not in v:
            raise c.fail(at, f"missing key {k!r}")
    server = c.string(v["server"], at + ("server",))
    if server not in cfg.ci_servers:
        raise c.fail(at + ("server",), f"no CI server {server!r:.40} under ci: (known: "
                                       f"{', '.join(cfg.ci_servers) or 'none'})")
    params: dict[str, str] = {}
    for k, template in c.mapping(v.get("parameters"), at + ("parameters",), None).items():
        where = at + ("parameters", str(k))
        text = template if isinstance(template, str) else str(template)
        try:
            text.format(**{p: "" for p in CI_PLACEHOLDERS})
        except (KeyError, IndexError, ValueError) as exc:
            raise c.fail(where, f"{text!r:.60}: unknown placeholder {exc}; use "
                                f"{', '.join('{' + p + '}' for p in CI_PLACEHOLDERS)}") from None
        params[str(k)] = text
    return ProjectCi(server=server, job=c.string(v["job"], at + ("job",)),
                     refs=_ref_patterns(c, v["refs"], at + ("refs",)) if "refs" in v
                     else ["refs/heads/*"], parameters=params,
                     settle=c.number(v.get("settle", 2.0), at + ("settle",), minimum=0))


def _auto_deploy(c: _Checker, value: Any, at: tuple[str, ...]) -> AutoDeploy | None:
    if value is None:
        return None
    if isinstance(value, dict) and True in value:
        # YAML 1.1 reads a bare `on:` as the boolean true: that is the key `on`
        value = {("on" if k is True else k): v for k, v in value.items()}
    v = c.mapping(value, at, ("refs", "on"))
    if "refs" not in v:
        raise c.fail(at, "missing key 'refs' (the refs this environment follows)")
    on = c.string(v.get("on", "ci_success"), at + ("on",))
    if on not in AUTO_DEPLOY_ON:
        raise c.fail(at + ("on",), f"{on!r:.40}: one of {', '.join(AUTO_DEPLOY_ON)}")
    return AutoDeploy(refs=_ref_patterns(c, v["refs"], at + ("refs",)), on=on)


def _shared(c: _Checker, value: Any, at: tuple[str, ...]) -> list[str]:
    """Paths inside a release, relative and without ``..``: they become symlinks
    into ``shared/``, so one that climbed out would link outside the project."""
    if value is None:
        return []
    entries: list[str] = []
    for i, raw in enumerate(c.strings(value, at)):
        where = at + (str(i),)
        if raw.startswith("/"):
            raise c.fail(where, f"{raw!r} is absolute; shared paths are relative to the release")
        parts = raw.rstrip("/").split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise c.fail(where, f"{raw!r} must not contain '..', '.' or empty parts")
        if any(ch < " " or ch == "\x7f" for ch in raw):
            raise c.fail(where, f"{raw!r} contains control characters")
        if parts[0] == ".deploybus":
            raise c.fail(where, f"{raw!r} is reserved")
        path = "/".join(parts)
        for other in entries:
            if path == other or path.startswith(other + "/") or other.startswith(path + "/"):
                raise c.fail(where, f"{raw!r} overlaps the shared entry {other!r}")
        entries.append(path)
    return entries


def _web_host(c: _Checker, value: str, at: tuple[str, ...]) -> str:
    """A name the web answers to, as a browser sends it in ``Host`` (lower
    case, no port): a host name or an IPv4 address. IPv6 literals are refused:
    Werkzeug's trusted-host check cannot match ``[::1]``."""
    import ipaddress
    host = value.strip().lower()
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        ip = None
    if isinstance(ip, ipaddress.IPv6Address):
        raise c.fail(at, f"{value!r:.60}: IPv6 addresses cannot be matched against the Host "
                         "header; give a host name that resolves to it")
    if ip is not None:
        if ip.is_unspecified:
            raise c.fail(at, f"{value!r:.60} is the wildcard bind address, not a name a "
                             "browser asks for; list the names people open the web with")
        return str(ip)
    if not _HOST_NAME_RE.fullmatch(host) or host.rsplit(".", 1)[-1].isdigit():
        raise c.fail(at, f"{value!r:.60} is not a host name (letters, digits, '-' and '.', "
                         "no port, no scheme, no wildcard) or an IPv4 address")
    return host


def _account(c: _Checker, value: Any, at: tuple[str, ...]) -> str | None:
    """A user or group name (checked against the host's accounts when a deploy runs)."""
    if value is None:
        return None
    s = c.string(value, at)
    if not _ACCOUNT_RE.fullmatch(s):
        raise c.fail(at, f"{s!r:.40} is not a valid user or group name")
    return s


def _health(c: _Checker, value: Any, at: tuple[str, ...]) -> HealthConfig | None:
    if value is None:
        return None
    h = c.mapping(value, at, HEALTH_KEYS)
    if ("command" in h) == ("url" in h):
        raise c.fail(at, "give exactly one of 'command' or 'url'")
    hc = HealthConfig()
    if "command" in h:
        hc.command = c.string(h["command"], at + ("command",))
    else:
        url = c.string(h["url"], at + ("url",))
        if not url.startswith(("http://", "https://")):
            raise c.fail(at + ("url",), f"{url!r:.60} is not an http:// or https:// URL")
        hc.url = url
    if "retries" in h:
        hc.retries = int(c.number(h["retries"], at + ("retries",), minimum=1))
    if "interval" in h:
        hc.interval = c.number(h["interval"], at + ("interval",), minimum=0)
    if "timeout" in h:
        hc.timeout = c.number(h["timeout"], at + ("timeout",), minimum=0.1)
    return hc


def _output(c: _Checker, value: Any, at: tuple[str, ...]) -> OutputConfig:
    o = c.mapping(value, at, OUTPUT_KEYS)
    oc = OutputConfig()
    if "interval" in o:
        oc.interval = c.number(o["interval"], at + ("interval",), minimum=0.05)
    if "lines" in o:
        oc.lines = int(c.number(o["lines"], at + ("lines",), minimum=1))
    if "line_chars" in o:
        oc.line_chars = int(c.number(o["line_chars"], at + ("line_chars",), minimum=80))
    if "max_bytes" in o:
        oc.max_bytes = int(c.number(o["max_bytes"], at + ("max_bytes",), minimum=1024))
    return oc

"""Every message deploybus sends: its typed body, who may send it, how long
it lives, and the one helper that builds, signs and encodes it.

The envelope (:mod:`deploybus.envelope`) carries any body; this module says
what each ``type``'s body is. Bodies are msgspec ``Struct`` classes:
msgspec validates a decoded JSON object against the class in one pass in
C (types, enums, string patterns and lengths, unknown fields refused), and
is small and quick to import, which matters for the CLI's start-up; the
classes double as the documentation of the wire format. Every receiver
checks a body with :func:`parse`; every sender builds one with the class
and sends it with :func:`seal`, so both ends hold the same rules.

Who may send what is :data:`SENDERS` (by the role of the signing key, see
:mod:`deploybus.signing`); what must be true of the sender beyond its role
(a host's messages name that host; a person's rollouts are allowed by the
policy) is checked by :class:`deploybus.signing.Verifier`.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from msgspec import Meta, Struct

from deploybus.errors import EnvelopeError

if TYPE_CHECKING:
    from deploybus.envelope import Envelope


class Role(enum.StrEnum):
    """What a key is for. Each trusted key has exactly one."""

    #: A person at the CLI: asks for rollouts and steers them.
    PERSON = "person"
    #: The web front end: asks for rollouts on behalf of its users.
    WEB = "web"
    #: The CI bridge: build events; rollouts of green builds.
    CI = "ci"
    #: The orchestrator: the only sender of deploy requests and rollout status.
    ORCHESTRATOR = "orchestrator"
    #: One host's daemons (agent, fetcher, keepalive): its presence, its results.
    HOST = "host"
    #: The git server's hook and the webhook listener: pushes.
    GIT = "git"
    #: A Debian package repository's update hook (``deploybus package-notify``):
    #: package updates, nothing else.
    REPO = "repo"


class Action(enum.StrEnum):
    DEPLOY = "deploy"
    ROLLBACK = "rollback"


class ControlAction(enum.StrEnum):
    PAUSE = "pause"
    RESUME = "resume"
    PROMOTE = "promote"
    ABORT = "abort"


class RolloutState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    FAILED = "failed"
    REFUSED = "refused"
    ABORTED = "aborted"


class StepState(enum.StrEnum):
    """A host's state in a rollout."""

    PENDING = "pending"
    REQUESTED = "requested"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REFUSED = "refused"
    SKIPPED = "skipped"
    OFFLINE = "offline"


class Status(enum.StrEnum):
    """The outcome an agent reports for one request."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REFUSED = "refused"


class Failure(enum.StrEnum):
    """Why a host failed, as a field: what to do next depends on it (a host
    that answered goes back into load-balancer rotation; one that did not,
    does not), never on the wording of a reason."""

    #: The agent would not take the request (policy, names, host, project).
    REFUSED = "refused"
    #: The request arrived after its expiry; it was never applied.
    LAPSED = "lapsed"
    #: The commit could not be fetched or found.
    FETCH = "fetch"
    #: A pre, post or post_switch script failed.
    SCRIPT = "script"
    #: Writing the release (checkout, shared links) failed.
    CHECKOUT = "checkout"
    #: The health check of the new release failed.
    HEALTH = "health"
    #: Switching ``current`` failed.
    SWITCH = "switch"
    #: The agent restarted during the deploy.
    INTERRUPTED = "interrupted"
    #: The agent itself failed (a bug); ``current`` is where it was.
    AGENT_ERROR = "agent-error"
    # Decided by the orchestrator, not reported by an agent:
    #: The agent did not acknowledge the request within ack_timeout.
    NOT_ANSWERING = "not-answering"
    #: The agent acknowledged but did not finish within request_timeout.
    NO_ANSWER = "no-answer"
    #: No progress for ``stuck`` seconds.
    STUCK = "stuck"
    #: Its agent's heartbeats stopped before it was asked.
    OFFLINE = "offline"
    #: It could not be taken out of load-balancer rotation.
    DRAIN = "drain"

    @property
    def answered(self) -> bool:
        """The agent answered: ``current`` is a complete release that passed
        its checks (or the old one, untouched)."""
        return self not in (Failure.NOT_ANSWERING, Failure.NO_ANSWER, Failure.STUCK,
                            Failure.OFFLINE, Failure.DRAIN)


class Daemon(enum.StrEnum):
    """The daemons of a host that send heartbeats."""

    AGENT = "agent"
    FETCHER = "fetcher"
    KEEPALIVE = "keepalive"


# -- field types ------------------------------------------------------------------------

#: Project, environment, host, release and rollout names (deploybus.refs.NAME_RE).
Name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
#: Release ids are names too, a little longer.
Release = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
#: A git ref as deploybus.refs.check_ref takes it (the pattern is the first
#: line; check_ref's finer rules run where a ref reaches git).
Ref = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/+-]{0,199}$")]
#: A full commit id (SHA-1 or SHA-256).
Commit = Annotated[str, Meta(pattern=r"^([0-9a-f]{40}|[0-9a-f]{64})$")]
#: Who a rollout is for: printable, no control characters.
User = Annotated[str, Meta(pattern=r"^[^\x00-\x1f\x7f]{1,128}$")]
#: Free text a person reads (a reason, a message).
Text = Annotated[str, Meta(max_length=8000)]
#: One line of script output.
Line = Annotated[str, Meta(max_length=8000)]
#: An ISO 8601 time, as deploybus.envelope writes them.
Time = Annotated[str, Meta(max_length=40)]
#: Message ids (deploybus.envelope: 8-64 ASCII characters).
MessageId = Annotated[str, Meta(pattern=r"^[\x21-\x7e]{8,64}$")]
Count = Annotated[int, Meta(ge=0)]


class Body(Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """Base of every message body."""


class StrategySpec(Body):
    """Strategy settings of one rollout, over its environment's
    (deploybus.strategy checks the values together)."""

    canary: Annotated[int, Meta(ge=0)] | Name | None = None
    batch: Annotated[int, Meta(ge=1)] | Annotated[str, Meta(max_length=16)] | None = None
    window: Count | None = None
    pause: Annotated[float, Meta(ge=0)] | Annotated[str, Meta(pattern="^promote$")] | None = None
    max_failures: Count | None = None
    auto_rollback: bool | None = None
    stuck: Annotated[float, Meta(gt=0)] | None = None


# -- bodies, by message type -------------------------------------------------------------

class PushedCommit(Body):
    id: Commit
    author: Text | None = None
    subject: Text | None = None


class GitPush(Body):
    """``git.push``: a ref of a project moved (or was created or deleted)."""

    project: Name
    ref: Annotated[str, Meta(max_length=250)]
    old: Annotated[str, Meta(pattern=r"^[0-9a-f]{40,64}$")] | None = None
    new: Annotated[str, Meta(pattern=r"^[0-9a-f]{40,64}$")] | None = None
    pusher: Text | None = None
    created: bool = False
    deleted: bool = False
    commits: list[PushedCommit] = []


class BuildState(enum.StrEnum):
    QUEUED = "queued"
    STARTED = "started"
    FINISHED = "finished"
    SUPERSEDED = "superseded"
    ERROR = "error"


class CiBuild(Body):
    """``ci.build``: a CI build of a commit was queued, started or finished
    (or superseded by a newer push before it was built, or could not be
    had: ``error``, with ``retrying`` when the CI server is only away and
    the push is kept)."""

    project: Name
    ref: Ref
    commit: Commit
    state: BuildState
    #: The CI server's name in the config (``ci.<name>``), or who reported it.
    backend: Name
    job: Annotated[str, Meta(max_length=200)]
    #: A stable name of this build for its whole life ("<backend>/<id>"): an
    #: auto-deploy is made once per build, whatever repeats.
    build: Annotated[str, Meta(min_length=1, max_length=250)]
    result: Annotated[str, Meta(max_length=32)] | None = None
    number: Count | None = None
    url: Annotated[str, Meta(max_length=2000)] | None = None
    duration: Annotated[float, Meta(ge=0)] | None = None
    console_tail: Annotated[list[Line], Meta(max_length=200)] = []
    reason: Text | None = None
    retrying: bool = False


#: Characters of an svn log message's first line an ``svn.commit`` carries.
SVN_SUBJECT_CAP = 200


class SvnCommit(Body):
    """``svn.commit``: a revision was committed to a project's Subversion
    repository (the post-commit hook, ``deploybus notify svn-commit``)."""

    project: Name
    revision: Annotated[int, Meta(ge=1)]
    author: Annotated[str, Meta(max_length=200)] | None = None
    #: When svn recorded the commit (ISO 8601), if svnlook said.
    date: Time | None = None
    #: The log message's first line, at most SVN_SUBJECT_CAP characters.
    subject: Annotated[str, Meta(max_length=SVN_SUBJECT_CAP)] | None = None
    #: Best effort: the repository path of the first trunk, branches/X or
    #: tags/X a changed path is under (``trunk``, ``branches/x``,
    #: ``proj/tags/v1``); None when no changed path is under one.
    branch: Annotated[str, Meta(min_length=1, max_length=250)] | None = None
    #: How many paths the revision changed (``svnlook changed``).
    paths_changed: Count = 0


#: A Debian package name (Debian policy 5.6.1, at most 100 characters).
PackageName = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9+.-]{0,99}$")]
#: A Debian version: ``[epoch:]upstream[-revision]`` (policy 5.6.12).
PackageVersion = Annotated[str, Meta(pattern=r"^[0-9][A-Za-z0-9.+~:-]{0,99}$")]
#: A distribution (suite or codename) of a repository: ``bookworm``,
#: ``stable``, ``bookworm-backports``, ``bookworm/updates``.
Distribution = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/+-]{0,99}$")]


class PackageUpdate(Body):
    """``package.update``: a Debian package the hosts care about changed in a
    repository (``deploybus package-notify`` from the repository's update
    hook). The fetchers of the hosts that watch it refresh their package
    lists; nothing is installed."""

    package: PackageName
    version: PackageVersion
    distribution: Distribution | None = None


class PackageRun(enum.StrEnum):
    """How a fetcher's package-list command ended."""

    OK = "ok"
    FAILED = "failed"


class UpdatedPackage(Body):
    package: PackageName
    version: PackageVersion
    distribution: Distribution | None = None


class PackageUpdated(Body):
    """``package.updated``: a host's fetcher ran its package-list command
    (``apt-get update``) once for a burst of ``package.update``; what it
    ran for and how it ended."""

    host: Name
    packages: Annotated[list[UpdatedPackage], Meta(max_length=200)]
    command: Annotated[str, Meta(max_length=2000)]
    status: PackageRun
    seconds: Annotated[float, Meta(ge=0)]
    #: Updates in the burst beyond the ``packages`` listed.
    omitted: Count = 0
    #: None when there is none: the command timed out or could not start.
    exit_code: int | None = None
    #: The end of the command's output (stdout and stderr together).
    output_tail: Text = ""
    #: Why it failed without an exit code (timed out, could not start).
    reason: Text | None = None


class RolloutRequest(Body):
    """``deploy.rollout``: a person, the web or CI asks for a rollout."""

    rollout: Name
    project: Name
    environment: Name
    user: User
    action: Action = Action.DEPLOY
    #: What to deploy (action deploy): a tag, a branch, refs/tags/X,
    #: refs/heads/X or a full commit id; the orchestrator resolves it once.
    ref: Ref | None = None
    #: Where to roll back to (action rollback); None: each host's previous release.
    release: Release | None = None
    hosts: list[Name] | None = None
    strategy: StrategySpec | None = None
    #: Deploy outside the environment's windows, for this reason (audited).
    override: Annotated[str, Meta(min_length=1, max_length=500)] | None = None


class Control(Body):
    """``deploy.control``: pause, resume, promote or abort a rollout."""

    rollout: Name
    action: ControlAction
    user: User


class DeployRequest(Body):
    """``deploy.request``: the orchestrator asks one host's agent to act."""

    rollout: Name
    project: Name
    environment: Name
    host: Name
    user: User
    action: Action = Action.DEPLOY
    #: The full refname the rollout resolved (refs/tags/v1.2) and the commit
    #: it resolved to: the agent deploys exactly that commit.
    ref: Ref | None = None
    commit: Commit | None = None
    #: Rollback target (action rollback); None: the previous good release.
    release: Release | None = None
    #: A rollback the orchestrator sends on its own to undo this rollout on
    #: a host it moved (auto_rollback), not one a person asked for.
    undo: bool = False
    position: Count = 0


class ProgressEntry(Body, omit_defaults=False):
    step: Annotated[str, Meta(max_length=32)]
    message: Text
    lines: list[Line] = []
    at: Time | None = None


class Progress(Body):
    """``deploy.progress``: what one host's deploy is doing (a batch of entries)."""

    rollout: Name
    host: Name
    request_id: MessageId
    action: Action = Action.DEPLOY
    undo: bool = False
    project: Name | None = None
    environment: Name | None = None
    ref: Ref | None = None
    entries: Annotated[list[ProgressEntry], Meta(max_length=500)] = []


class Result(Body):
    """``deploy.result``: how one host's request ended."""

    rollout: Name
    host: Name
    request_id: MessageId
    status: Status
    action: Action = Action.DEPLOY
    undo: bool = False
    failure: Failure | None = None
    reason: Text | None = None
    project: Name | None = None
    environment: Name | None = None
    ref: Ref | None = None
    commit: Commit | None = None
    release: Release | None = None
    previous_release: Release | None = None
    previous_commit: Commit | None = None
    duration: Annotated[float, Meta(ge=0)] | None = None
    #: An answer from the agent's journal to a request it had already handled.
    duplicate: bool = False
    #: Refused only because it arrived after its expiry (never applied).
    lapsed: bool = False
    #: The deploy's last progress entries, when they came with the result.
    entries: Annotated[list[ProgressEntry], Meta(max_length=500)] = []


class RolloutStatus(Body):
    """``deploy.rollout.status``: the orchestrator on one rollout: a state
    change, a host settled, or the answer to a control message."""

    rollout: Name
    #: None only in the answer to a control message about an unknown rollout.
    state: RolloutState | None = None
    reason: Text | None = None
    commit: Commit | None = None
    ref: Ref | None = None
    # a host settled
    host: Name | None = None
    host_state: StepState | None = None
    failure: Failure | None = None
    release: Release | None = None
    phase: Count | None = None
    done: Count | None = None
    total: Count | None = None
    # the rollout started or ended
    hosts: list[Name] | None = None
    phases: list[list[Name]] | None = None
    strategy: dict[str, Any] | None = None
    succeeded: Count | None = None
    failed: Count | None = None
    failed_host: Name | None = None
    rolled_back: dict[str, Text] | None = None
    lock: dict[str, Any] | None = None
    # the answer to a control message
    control: ControlAction | None = None
    control_id: MessageId | None = None
    control_done: Text | None = None
    control_refused: Text | None = None


class ProjectRelease(Body):
    release: Release | None = None
    commit: Commit | None = None
    ref: Annotated[str, Meta(max_length=250)] | None = None
    rollout: Name | None = None


class Presence(Body):
    """``presence``: a heartbeat of one daemon of one host."""

    host: Name
    daemon: Daemon
    interval: Annotated[float, Meta(ge=0.1, le=3600)]
    version: Annotated[str, Meta(max_length=32)] | None = None
    #: keepalive: the release ``current`` points at, per project served.
    projects: dict[Name, ProjectRelease] | None = None
    #: agent: the rollout each project is deploying now.
    deploying: dict[Name, Name] | None = None


#: The body class of each message type.
BODIES: dict[str, type[Body]] = {
    "git.push": GitPush,
    "svn.commit": SvnCommit,
    "ci.build": CiBuild,
    "package.update": PackageUpdate,
    "package.updated": PackageUpdated,
    "deploy.rollout": RolloutRequest,
    "deploy.control": Control,
    "deploy.request": DeployRequest,
    "deploy.progress": Progress,
    "deploy.result": Result,
    "deploy.rollout.status": RolloutStatus,
    "presence": Presence,
}

#: The roles whose keys may sign each message type. Everything else is
#: refused, whatever the policy says.
SENDERS: dict[str, frozenset[Role]] = {
    "git.push": frozenset({Role.GIT, Role.CI}),
    "svn.commit": frozenset({Role.GIT, Role.CI}),
    "ci.build": frozenset({Role.CI}),
    "package.update": frozenset({Role.REPO, Role.CI, Role.GIT}),
    "package.updated": frozenset({Role.HOST}),
    "deploy.rollout": frozenset({Role.PERSON, Role.WEB, Role.CI}),
    "deploy.control": frozenset({Role.PERSON, Role.WEB, Role.CI}),
    "deploy.request": frozenset({Role.ORCHESTRATOR}),
    "deploy.progress": frozenset({Role.HOST}),
    "deploy.result": frozenset({Role.HOST}),
    "deploy.rollout.status": frozenset({Role.ORCHESTRATOR}),
    "presence": frozenset({Role.HOST}),
}

#: Types whose body names the host that sent it: signed by that host's key.
HOST_BOUND = frozenset({"deploy.progress", "deploy.result", "presence", "package.updated"})

#: Types that make something happen: their ids are remembered until they
#: expire, and a repeat is refused as a replay.
ACTIONS = frozenset({"deploy.rollout", "deploy.control", "deploy.request"})

#: Seconds each message type lives by default (``expires``). A deploy
#: request lives as long as its environment's ack_timeout and a control
#: message as long as its sender waits for the answer: they set their own.
TTL: dict[str, float] = {
    "git.push": 24 * 3600,
    "svn.commit": 24 * 3600,
    "ci.build": 24 * 3600,
    "package.update": 24 * 3600,
    "package.updated": 24 * 3600,
    "deploy.rollout": 3600,
    "deploy.control": 60,
    "deploy.request": 30,
    "deploy.progress": 24 * 3600,
    "deploy.result": 24 * 3600,
    "deploy.rollout.status": 24 * 3600,
    "presence": 30,
}


def parse(type: str, body: dict[str, Any]) -> Body:
    """The typed body of a message of ``type``; EnvelopeError saying which
    field is wrong if it does not fit."""
    cls = BODIES.get(type)
    if cls is None:
        raise EnvelopeError(f"unknown message type {type!r:.60}")
    try:
        return msgspec.convert(body, cls, strict=True)
    except msgspec.ValidationError as exc:
        raise EnvelopeError(f"{type}: {exc}") from None


def to_dict(body: Body) -> dict[str, Any]:
    """The body as JSON-ready builtins (defaults left out)."""
    out = msgspec.to_builtins(body)
    assert isinstance(out, dict)
    return out


def type_of(body: Body) -> str:
    for name, cls in BODIES.items():
        if isinstance(body, cls):
            return name
    raise TypeError(f"{type(body).__name__} is not a message body")


def sign(body: Body, *, key: Any, sender: str, correlation: str | None = None,
         ttl: float | None = None) -> Envelope:
    """A signed envelope carrying ``body``: built and signed in one place.
    ``key`` is the sender's :class:`deploybus.signing.SigningKey` (every
    message on the bus is signed); ``ttl`` defaults to the type's."""
    from deploybus import envelope
    mtype = type_of(body)
    env = envelope.new(mtype, to_dict(body), sender=sender, correlation=correlation,
                       ttl=TTL[mtype] if ttl is None else ttl)
    signed: Envelope = key.sign(env)
    return signed


def seal(body: Body, *, key: Any, sender: str, correlation: str | None = None,
         ttl: float | None = None) -> bytes:
    """:func:`sign`, encoded for the bus: the one way deploybus sends a message."""
    return sign(body, key=key, sender=sender, correlation=correlation, ttl=ttl).encode()

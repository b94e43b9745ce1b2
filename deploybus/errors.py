"""One error tree for deploybus.

Driver errors (stomp.py, kombu, git, SQLAlchemy) are translated into these
where they enter, so daemon loops catch only :class:`DeployBusError`.

Every error class of the core and the daemons is defined here; the modules
that raise one re-export it (``deploybus.store.StoreError``) so imports of
the old names keep working. One subclass lives elsewhere on purpose: the
front end's ``FieldError`` (``frontend/app.py``), raised and caught inside
the web app only, whose message is written in the deploy form's labels.
``tests/security/test_errors.py`` keeps it that way.
"""

from __future__ import annotations


class DeployBusError(Exception):
    """Base of every error deploybus raises on purpose."""


class ConfigError(DeployBusError):
    """The configuration file is invalid; the message names file, line and key."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 key: str | None = None) -> None:
        self.path, self.line, self.key = path, line, key
        where = ""
        if path:
            where = f"{path}:{line}: " if line else f"{path}: "
        if key:
            where += f"{key}: "
        super().__init__(where + message)


class BusError(DeployBusError):
    """Something went wrong talking to the message bus."""


class BusConnectionError(BusError):
    """The broker could not be reached or the connection dropped."""


class BusAuthError(BusConnectionError):
    """The broker refused our credentials, vhost or permissions: not transient;
    retrying will not help. The message names the broker URL (password
    redacted) and the vhost."""


class UnsupportedURL(BusError):
    """The bus URL names a scheme deploybus has no transport for."""


class EnvelopeError(DeployBusError):
    """A message is not a valid deploybus envelope."""


class SignatureError(EnvelopeError):
    """A message is unsigned, tampered with, signed by an unknown key, or not allowed."""


class ReplayError(EnvelopeError):
    """A message id was already seen within its time to live."""


class ExpiredError(EnvelopeError):
    """A message is past its expiry or dated in the future."""


class LapsedError(ExpiredError):
    """A well-formed message arrived after its expiry (it waited too long)."""


class RefError(DeployBusError):
    """A git ref from a message is unsafe or malformed."""


class DeployError(DeployBusError):
    """A deploy step failed; the old release keeps serving."""


class StoreError(DeployBusError):
    """The state database could not be read or written. The message names the
    database (credentials redacted), the operation and the driver's reason;
    every SQLAlchemy error is translated into this (deploybus/store.py)."""


class StrategyError(DeployBusError):
    """A rollout strategy setting is invalid (deploybus/strategy.py)."""


class WindowError(DeployBusError):
    """A deploy window rule or its timezone is malformed (deploybus/windows.py)."""


class HAProxyError(DeployBusError):
    """The HAProxy runtime API refused a command or could not be reached."""


class RolloutError(DeployBusError):
    """A rollout cannot be planned: ``field`` names what is wrong (``project``,
    ``environment``, ``hosts``, ``strategy.<setting>``), so the CLI can name
    the option and the web the form field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


class WebhookError(DeployBusError):
    """A forge's webhook delivery that cannot be taken. ``status`` is the HTTP
    status the listener answers: 400 malformed (not JSON, not the payload its
    headers announce), 401 signature or token missing or wrong."""

    def __init__(self, message: str, *, status: int) -> None:
        self.status = status
        super().__init__(message)


class DeliveryError(DeployBusError):
    """One try to deliver a notification (a webhook, an email) failed; the
    notifier retries. The text is safe to log (no URL path, no secret)."""


class CiError(DeployBusError):
    """A CI server could not build what the bridge asked for."""


class CiUnavailable(CiError):
    """The CI server is down, answers 5xx or times out: it may pass; the
    bridge retries and keeps the push."""


class CiRefused(CiError):
    """The CI server will not build it as asked (credentials, no such job, a
    queue item cancelled): retrying will not help; reported as an error."""

"""One error tree for deploybus.

Driver errors (stomp.py, kombu, git, SQLAlchemy) are translated into these
where they enter, so daemon loops catch only :class:`DeployBusError`.
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

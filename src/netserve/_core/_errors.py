"""The one small hierarchy of netserve's own exceptions.

Code paths compatible with the stdlib raise what the stdlib raises; these are for
what the stdlib never had.
"""

from __future__ import annotations

__all__ = [
    "AddressError",
    "ConfigurationError",
    "ConnectionTimeout",
    "LineTooLong",
    "MissingExtraError",
    "NetserveError",
    "NetserveWarning",
    "ProxyProtocolError",
    "SocketActivationError",
    "StageError",
    "TLSHandshakeError",
    "UnusableSocketError",
]


class NetserveError(Exception):
    """Base class of the exceptions netserve raises for its own features."""


class AddressError(NetserveError, ValueError):
    """A listening address given as text could not be understood."""


# Named as the stdlib names TimeoutError, and as the limits issue (11) calls it.
class ConnectionTimeout(NetserveError, TimeoutError):  # noqa: N818
    """A time-out netserve enforces on a connection ran out.

    Raised where the handler (or a stage) waits. ``setting`` names the server
    attribute whose limit it was: ``"park_timeout"``, ``"idle_timeout"``,
    ``"write_timeout"``, ``"max_connection_age"`` or ``"stage_timeout"``.
    A time-out the handler set itself (``settimeout()``) raises the stdlib's
    plain ``TimeoutError`` instead.
    """

    def __init__(self, message: str = "timed out", setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


class LineTooLong(NetserveError, ValueError):  # noqa: N818
    """A line went past the server's ``max_line_size`` before its newline.

    Raised by ``rfile.readline()`` (and line iteration, ``readlines()``)
    having consumed the line's first ``max_line_size`` bytes; the rest of it
    is still unread.
    """


class StageError(NetserveError):
    """A connection stage rejected its peer (a malformed header, a failed handshake)."""


class ProxyProtocolError(StageError):
    """A PROXY protocol header was malformed, or not what the server expects.

    The spec's answer to anything invalid is to abort the connection: the
    stage closes it, counted as a stage failure.
    """


class TLSHandshakeError(StageError):
    """A TLS handshake failed (a bad or plain-text client, a peer gone mid-way).

    The stage closes the connection, counted as a stage failure; the reason is
    logged (rate-limited) on ``netserve.tls``.
    """


class ConfigurationError(NetserveError, ValueError):
    """A server's attributes contradict each other (raised at construction)."""


class MissingExtraError(NetserveError, ImportError):
    """A feature needs an optional dependency that is not installed."""

    def __init__(self, feature: str, extra: str, package: str) -> None:
        super().__init__(
            f"{feature} needs the {package!r} package: install it with "
            f"`pip install 'netserve[{extra}]'`"
        )
        self.extra = extra


class SocketActivationError(NetserveError, ValueError):
    """The socket-activation variables (``LISTEN_FDS``, ...) are malformed."""


class UnusableSocketError(NetserveError, ValueError):
    """A socket handed to netserve cannot serve as asked (wrong family or type,
    a stream socket that is not listening, not a socket at all)."""


class NetserveWarning(UserWarning):
    """Something works, but probably not as the caller meant."""

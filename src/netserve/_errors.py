"""The one small hierarchy of netserve's own exceptions.

Code paths compatible with the stdlib raise what the stdlib raises; these are for
what the stdlib never had.
"""

from __future__ import annotations

__all__ = [
    "AddressError",
    "ConnectionTimeout",
    "MissingExtraError",
    "NetserveError",
    "NetserveWarning",
    "StageError",
]


class NetserveError(Exception):
    """Base class of the exceptions netserve raises for its own features."""


class AddressError(NetserveError, ValueError):
    """A listening address given as text could not be understood."""


# Named as the stdlib names TimeoutError, and as the limits issue (11) calls it.
class ConnectionTimeout(NetserveError, TimeoutError):  # noqa: N818
    """A time-out netserve enforces on a connection ran out (a stage's, so far)."""


class StageError(NetserveError):
    """A connection stage rejected its peer (a malformed header, a failed handshake)."""


class MissingExtraError(NetserveError, ImportError):
    """A feature needs an optional dependency that is not installed."""

    def __init__(self, feature: str, extra: str, package: str) -> None:
        super().__init__(
            f"{feature} needs the {package!r} package: install it with "
            f"`pip install 'netserve[{extra}]'`"
        )
        self.extra = extra


class NetserveWarning(UserWarning):
    """Something works, but probably not as the caller meant."""

"""The one small hierarchy of netserve's own exceptions.

Code paths compatible with the stdlib raise what the stdlib raises; these are for
what the stdlib never had.
"""

from __future__ import annotations

__all__ = ["AddressError", "MissingExtraError", "NetserveError", "NetserveWarning"]


class NetserveError(Exception):
    """Base class of the exceptions netserve raises for its own features."""


class AddressError(NetserveError, ValueError):
    """A listening address given as text could not be understood."""


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

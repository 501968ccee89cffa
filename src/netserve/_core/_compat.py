"""Running existing stdlib code on netserve: ``install_as_socketserver()``.

Stdlib modules such as ``http.server``, ``xmlrpc.server``,
``wsgiref.simple_server`` and ``logging.config.listen`` find their servers
through ``import socketserver``. Putting netserve in ``sys.modules`` under that
name makes every *later* import resolve to netserve. It cannot reach modules
that have already bound the stdlib's classes, so those are named in a warning
rather than silently left on the stdlib.
"""

from __future__ import annotations

import sys
import types
import warnings

from netserve._core._errors import NetserveWarning

__all__ = ["install_as_socketserver", "restore_socketserver"]

_NAME = "socketserver"
# What was in sys.modules before the first install (None: nothing was).
_saved: list[types.ModuleType | None] = []


def install_as_socketserver() -> None:
    """Make later ``import socketserver`` statements return netserve.

    Opt-in and idempotent; undo it with ``restore_socketserver()``. Modules that
    already hold the stdlib's socketserver (imported before this call) keep it,
    and a ``NetserveWarning`` names them.
    """
    netserve = sys.modules["netserve"]
    current = sys.modules.get(_NAME)
    if current is netserve:
        return
    _saved.append(current)
    sys.modules[_NAME] = netserve
    if current is not None:
        bound = _modules_bound_to(current)
        if bound:
            warnings.warn(
                "install_as_socketserver(): these modules were imported before it and keep "
                f"the stdlib's socketserver: {', '.join(sorted(bound))}",
                NetserveWarning,
                stacklevel=2,
            )


def restore_socketserver() -> None:
    """Undo ``install_as_socketserver()``: ``socketserver`` is the stdlib's again."""
    if not _saved:
        return
    previous = _saved.pop()
    _saved.clear()
    if previous is None:
        sys.modules.pop(_NAME, None)
    else:
        sys.modules[_NAME] = previous


def _modules_bound_to(module: types.ModuleType) -> list[str]:
    """Names of loaded modules holding ``module`` or a class defined in it."""
    bound = []
    for name, loaded in list(sys.modules.items()):
        if loaded is None or loaded is module or name == _NAME:
            continue
        # sys.modules may hold objects that are not modules; read what they have.
        for value in list(getattr(loaded, "__dict__", {}).values()):
            if value is module or (
                isinstance(value, type)
                and any(base.__module__ == module.__name__ for base in value.__mro__)
            ):
                bound.append(name)
                break
    return bound

"""What ``netserve MODULE:ATTR`` serves: the import string, and a server per socket.

``ATTR`` names one of three things (issue 12):

- a request-handler class: served by the chosen model's server class for the
  socket's family and type (``MODEL_CLASSES``);
- a server class: built as ``cls(address, cls.RequestHandlerClass,
  bind_and_activate=False)`` around the listening socket (``server_from_socket``);
  it must accept that call and need no ``server_bind()``;
- any other callable: a factory, called with the listening socket, that returns
  a server serving it (the form for servers with constructors of their own,
  such as ``xmlrpc.server.SimpleXMLRPCServer``).

Mistakes in the import string are ``TargetError`` (one line for the user);
an exception the user's module raises while importing is ``TargetImportError``,
whose cause keeps the module's traceback (the user needs it).
"""

from __future__ import annotations

import importlib
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import netserve
from netserve._core._errors import NetserveError
from netserve._serving._adopt import server_from_socket

__all__ = ["MODELS", "TargetError", "TargetImportError", "load_target", "server_maker"]

#: The models the command line offers, and its default: the bounded pool
#: serves any blocking handler with the limits' safe defaults on.
MODELS = ("sync", "threading", "forking", "pool", "green")
DEFAULT_MODEL = "pool"


class TargetError(NetserveError, ValueError):
    """The import string does not name something netserve can serve."""


class TargetImportError(NetserveError, ImportError):
    """The user's module raised while it was imported (see ``__cause__``)."""


def load_target(spec: str, *, module_alone: bool = False) -> Any:
    """Import ``MODULE:ATTR`` (``ATTR`` may be dotted) from the current directory
    or ``sys.path``, as gunicorn users expect; with ``module_alone``, ``MODULE``
    names the module itself."""
    module_name, sep, attr = spec.partition(":")
    if module_alone and not sep and module_name:
        attr = ""
    elif not sep or not module_name or not attr:
        raise TargetError(f"{spec!r} is not MODULE:ATTR (as in mymodule:MyHandler)")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            raise TargetError(
                f"no module named {missing!r} (looked in {os.getcwd()} and sys.path)"
            ) from None
        raise TargetImportError(f"importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise TargetImportError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    target: Any = module
    for part in attr.split(".") if attr else ():
        try:
            target = getattr(target, part)
        except AttributeError:
            raise TargetError(f"{module_name!r} has no attribute {attr!r}") from None
    return target


def _is_handler_class(target: Any) -> bool:
    # netserve's handlers or the stdlib's (http.server's, say): a class with
    # handle() whose constructor takes (request, client_address, server).
    return (
        isinstance(target, type)
        and callable(getattr(target, "handle", None))
        and any(base.__name__ == "BaseRequestHandler" for base in target.__mro__)
    )


def _is_server_class(target: Any) -> bool:
    return isinstance(target, type) and callable(getattr(target, "serve_forever", None))


def model_class(model: str, family: int, kind: int) -> type:
    """The server class of ``model`` for a socket of ``family`` and ``kind``."""
    datagram = kind == socket.SOCK_DGRAM
    unix = family == getattr(socket, "AF_UNIX", None)
    prefix = {
        "sync": "",
        "threading": "Threading",
        "forking": "Forking",
        "pool": "ThreadPool",
        "green": "Green",
    }[model]
    if unix:
        name = prefix + ("UnixDatagramServer" if datagram else "UnixStreamServer")
    else:
        name = prefix + ("UDPServer" if datagram else "TCPServer")
    cls = getattr(netserve, name, None)
    if cls is None:
        raise TargetError(f"the {model} model has no server for this socket ({name})")
    return cls  # type: ignore[no-any-return]


def server_maker(
    target: Any,
    model: str,
    *,
    threads: int | None = None,
    attributes: dict[str, Any] | None = None,
) -> Callable[[socket.socket], Any]:
    """A function that builds a server around one listening socket; ``threads``
    sets the pool's ``max_workers`` (handler classes only); ``attributes`` are
    server attributes set on a subclass (handler and server classes)."""
    attributes = attributes or {}
    if _is_handler_class(target):

        def for_handler(sock: socket.socket) -> Any:
            cls = model_class(model, sock.family, sock.type)
            extra = dict(attributes)
            if threads is not None:
                extra["max_workers"] = threads
            if extra:
                cls = type(cls.__name__, (cls,), extra)
            return server_from_socket(cls, sock, target)

        return for_handler
    if threads is not None:
        raise TargetError("--threads applies to a handler class served by the pool model")
    if attributes and _is_server_class(target):
        target = type(target.__name__, (target,), attributes)
    elif attributes and callable(target):
        raise TargetError(
            "--proxy-protocol, the TLS options and --access-log apply to a handler class "
            "or a server class, not a factory: set their attributes on the server it builds"
        )
    if _is_server_class(target):
        handler = getattr(target, "RequestHandlerClass", None)
        if handler is None:
            raise TargetError(
                f"{target.__name__} is a server class without a RequestHandlerClass "
                "attribute: set one, or name a factory that takes the socket"
            )

        def for_server(sock: socket.socket) -> Any:
            return server_from_socket(target, sock, handler)

        return for_server
    if callable(target):

        def for_factory(sock: socket.socket) -> Any:
            server = target(sock)
            if not callable(getattr(server, "serve_forever", None)):
                raise TargetError(f"{target!r} returned {server!r}, which is not a server")
            return server

        return for_factory
    raise TargetError(
        f"{target!r} is neither a request handler class, a server class nor a factory"
    )

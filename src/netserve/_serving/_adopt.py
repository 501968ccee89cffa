"""A server around a socket that is already bound (and, for streams, listening).

Socket activation, a supervisor's workers and ``--bind fd://N`` all hand a
server a socket someone else made. The server class is built as the stdlib
builds it, ``cls(address, handler, bind_and_activate=False)``, and its own
unbound socket is swapped for the given one; ``server_bind()`` and
``server_activate()`` are not called: the socket has its address, and calling
``listen()`` again would replace the backlog its owner chose (systemd's
``Backlog=``) with the class's ``request_queue_size``.
"""

from __future__ import annotations

import socket
from typing import Any, TypeVar

from netserve._core._errors import UnusableSocketError
from netserve._core._socket_servers import TCPServer

__all__ = ["server_from_socket"]

_Server = TypeVar("_Server", bound=TCPServer)

_IP = frozenset({socket.AF_INET, socket.AF_INET6})


def server_from_socket(server_class: type[_Server], sock: socket.socket, handler: Any) -> _Server:
    """A ``server_class`` instance that serves ``sock`` with ``handler``.

    ``server_class`` is any of netserve's TCP, UDP or Unix server classes, with
    any model mixed in, or a subclass of one whose constructor accepts
    ``(server_address, RequestHandlerClass, bind_and_activate=False)`` and
    needs no ``server_bind()`` (``http.server.HTTPServer`` sets its
    ``server_name`` there: build such servers with a function of your own).
    The socket's type must be the class's ``socket_type``, and its family the
    class's ``address_family``, except that an IP class takes an IPv4 or IPv6
    socket alike (systemd's ``ListenStream=8080`` is an IPv6 socket that also
    accepts IPv4): the server's ``address_family`` becomes the socket's. A
    stream socket must be listening. ``server_address`` is read from the
    socket.

    The server owns the socket from then on (``server_close()`` closes it);
    when this raises ``UnusableSocketError``, the caller still does.
    """
    family, kind = sock.family, sock.type
    wanted_family, wanted_kind = server_class.address_family, server_class.socket_type
    if kind != wanted_kind or not (
        family == wanted_family or (family in _IP and wanted_family in _IP)
    ):
        raise UnusableSocketError(
            f"{server_class.__name__} serves {_kind(wanted_family, wanted_kind)} sockets, "
            f"not a {_kind(family, kind)} socket"
        )
    if kind == socket.SOCK_STREAM and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise UnusableSocketError(
            f"the {_kind(family, kind)} socket given to {server_class.__name__} is not "
            "listening: call listen() first"
        )
    address = sock.getsockname()
    server = server_class(address, handler, bind_and_activate=False)
    try:
        server.socket.close()
        server.socket = sock
        server.server_address = address
        if family != wanted_family:
            server.address_family = family
        if kind == socket.SOCK_STREAM:
            # Unlike a fresh listener, this one may already hold connections,
            # as many as its backlog, which the kernel caps at somaxconn: that
            # many are checked as they are accepted (see _limits.TimedAccept).
            server._netserve_arm_listener(_somaxconn())
    except BaseException:
        # Hand the socket back unclosed, and release what the server made.
        if server.socket is sock:
            server.socket = socket.socket(family, kind)
        server.server_close()
        raise
    return server


def _somaxconn() -> int:
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read())
    except (OSError, ValueError):
        return socket.SOMAXCONN


def _kind(family: int, kind: int) -> str:
    names: dict[tuple[int, bool], str] = {
        (socket.SOCK_STREAM, True): "TCP",
        (socket.SOCK_DGRAM, True): "UDP",
        (socket.SOCK_STREAM, False): "Unix stream",
        (socket.SOCK_DGRAM, False): "Unix datagram",
    }
    if family in _IP or family == getattr(socket, "AF_UNIX", None):
        name = names.get((kind, family in _IP))
        if name is not None:
            return name
    try:
        return f"{socket.AddressFamily(family).name}/{socket.SocketKind(kind).name}"
    except ValueError:
        return f"family {family}, type {kind}"

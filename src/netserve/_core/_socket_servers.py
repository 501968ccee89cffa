"""The servers for each socket family: TCPServer, UDPServer, Unix*Server.

Each supplies ``BaseServer``'s socket hooks (``_servers``): the listening
socket and its options (reuse, dual stack, Unix socket files, the receive
buffer), ``get_request()`` (accepting with netserve's kernel time-outs once
any is set: ``_limits``), and how a request is shut down and closed. The
stdlib's classes keep the stdlib's behaviour; the new models turn netserve's
options on in their own subclasses.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from netserve._core._limits import TimedAccept
from netserve._core._log import get_logger
from netserve._core._servers import BaseServer
from netserve._edges._unix import FileIdentity, bind_unix, remove_socket_file

if TYPE_CHECKING:
    from netserve._core._handlers import BaseRequestHandler

__all__ = ["TCPServer", "UDPServer", "UnixDatagramServer", "UnixStreamServer"]

# Typeshed spells a request as a connected socket (streams) or a
# (data, server socket) pair (datagrams); addresses depend on the family.
_Request = Any
_Address = Any
_HandlerFactory = Callable[[Any, Any, Any], "BaseRequestHandler"]

_limits_log = get_logger("limits")
_DONTWAIT = int(getattr(socket, "MSG_DONTWAIT", 0))
_TRUNCATED = int(getattr(socket, "MSG_TRUNC", 0))
_NO_TIMEOUTS = (None, None, None, None)


class TCPServer(BaseServer):
    """A stream server: one connected socket per request."""

    address_family: int = socket.AF_INET
    socket_type: int = socket.SOCK_STREAM
    # 3.15 raised the stdlib's default backlog to SOMAXCONN; follow the running
    # interpreter so that netserve stays a drop-in on each version.
    request_queue_size: int = socket.SOMAXCONN if sys.version_info >= (3, 15) else 5
    allow_reuse_address: bool = False
    allow_reuse_port: bool = False
    # Accepts with netserve's time-outs, once any is set (see _limits).
    _netserve_timed_accept: TimedAccept | None = None
    # Unix sockets (see _unix): replace a stale socket file on bind (the new
    # models), remove the file on server_close(), and the file's mode. Off in
    # the stdlib's classes, which keep the stdlib's EADDRINUSE.
    unix_replace_stale: bool = False
    unix_remove_on_close: bool = False
    unix_mode: int | None = None
    _netserve_unix_inode: FileIdentity | None = None
    # An IPv6 server's socket: True takes IPv4 too (IPV6_V6ONLY off), False
    # IPv6 only, either set explicitly, as socket.create_server() does (the
    # new models: False). None leaves it to the host's net.ipv6.bindv6only,
    # as the stdlib's classes do.
    dualstack_ipv6: bool | None = None

    def __init__(
        self,
        server_address: _Address,
        RequestHandlerClass: _HandlerFactory,
        bind_and_activate: bool = True,
    ) -> None:
        super().__init__(server_address, RequestHandlerClass)
        self.socket = socket.socket(self.address_family, self.socket_type)
        # Whose it is (_netserve_created): a socket put in its place, or this
        # one in a forked child, may be shared with other processes.
        self._netserve_made_socket = (self.socket, os.getpid())
        if bind_and_activate:
            try:
                self.server_bind()
                self.server_activate()
            except BaseException:
                # A failed bind or listen must not leak the descriptor.
                self.server_close()
                raise

    def server_bind(self) -> None:
        """Apply the reuse options, bind, and record the bound address."""
        sock = self.socket
        if self.allow_reuse_address and hasattr(socket, "SO_REUSEADDR"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # SO_REUSEPORT means nothing to AF_UNIX; the stdlib applies it to IP only.
        if (
            self.allow_reuse_port
            and hasattr(socket, "SO_REUSEPORT")
            and self.address_family in (socket.AF_INET, socket.AF_INET6)
        ):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if self.address_family == socket.AF_INET6 and self.dualstack_ipv6 is not None:
            sock.setsockopt(
                socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if self.dualstack_ipv6 else 1
            )
        if self.address_family == getattr(socket, "AF_UNIX", None):
            self._netserve_unix_inode = bind_unix(
                sock,
                self.server_address,
                replace_stale=self.unix_replace_stale,
                mode=self.unix_mode,
            )
        else:
            sock.bind(self.server_address)
        # Port 0 (or an abstract Unix name) resolves to the real address here.
        self.server_address = sock.getsockname()

    def server_activate(self) -> None:
        """Start listening with ``request_queue_size``."""
        # Before listen(): every connection then inherits them (see _limits).
        self._netserve_arm_listener(0)
        self.socket.listen(self.request_queue_size)

    def _netserve_arm_listener(self, backlog: int) -> None:
        """Give the listener the kernel time-outs its connections inherit;
        ``backlog``: how many connections may already wait on it."""
        timeouts = self._netserve_timeouts()
        if timeouts != _NO_TIMEOUTS:
            self._netserve_timed_accept = TimedAccept()
            self._netserve_timed_accept.arm(self.socket, timeouts, backlog)

    def server_close(self) -> None:
        """Close the listening socket (and, with ``unix_remove_on_close``, its file)."""
        self.socket.close()
        if self.unix_remove_on_close:
            remove_socket_file(self.server_address, self._netserve_unix_inode)

    def _netserve_close_listener(self) -> None:
        self.socket.close()

    def fileno(self) -> int:
        """The listening socket's file descriptor."""
        return self.socket.fileno()

    def get_request(self) -> tuple[Any, _Address]:
        """Accept one connection (with netserve's time-outs, when any is set)."""
        timeouts = self._netserve_timeouts()
        timed = self._netserve_timed_accept
        if timeouts == _NO_TIMEOUTS:
            if timed is not None:
                timed.disarm(self.socket)
            return self.socket.accept()
        if timed is None:
            timed = self._netserve_timed_accept = TimedAccept()
        return timed(self.socket, timeouts, self._netserve_table.clock, self.request_queue_size)

    def shutdown_request(self, request: _Request) -> None:
        """Half-close the connection so the peer sees EOF, then close it."""
        try:
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer may already have gone
        self.close_request(request)

    def close_request(self, request: _Request) -> None:
        """Close the connection."""
        request.close()


class UDPServer(TCPServer):
    """A datagram server: one datagram per request, replies through the server socket."""

    socket_type: int = socket.SOCK_DGRAM
    allow_reuse_address: bool = False
    allow_reuse_port: bool = False
    # The longest datagram handed to a handler.
    max_packet_size: int = 8192
    # A longer one: "truncate" (cut to max_packet_size, silently, as the
    # stdlib does) or "drop" (counted in refused and logged: the new models).
    oversized_datagrams: str = "truncate"
    # SO_RCVBUF for the socket (None: the system's default). A burst of small
    # datagrams overflows the default buffer; the kernel caps the size at
    # net.core.rmem_max, and the size it took is logged on netserve.limits.
    receive_buffer_size: int | None = None

    def server_bind(self) -> None:
        """Bind as a stream server does; apply ``receive_buffer_size`` first."""
        if self.receive_buffer_size is not None:
            sock = self.socket
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer_size)
            _limits_log.info(
                "datagram receive buffer: asked for %d bytes, the kernel gave %d",
                self.receive_buffer_size,
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
            )
        super().server_bind()

    def server_activate(self) -> None:
        """Datagram sockets do not listen."""

    def get_request(self) -> tuple[tuple[bytes, socket.socket], _Address]:
        """Receive one datagram: ((data, server socket), client_address)."""
        # Only called once the socket is readable; MSG_DONTWAIT still keeps the
        # loop from blocking when another process sharing the socket took the
        # datagram first (EAGAIN is "nothing to take" to the accept routine).
        if self.oversized_datagrams == "truncate":
            data, client_address = self.socket.recvfrom(self.max_packet_size, _DONTWAIT)
            return (data, self.socket), client_address
        data, _, flags, client_address = self.socket.recvmsg(self.max_packet_size, 0, _DONTWAIT)
        if flags & _TRUNCATED:
            self._netserve_table.shed()
            self._netserve_rate_limited("oversized", _limits_log, logging.WARNING).event(
                "dropped a datagram from %s longer than max_packet_size (%d bytes)",
                client_address,
                self.max_packet_size,
            )
            # Nothing to hand over: to the accept routine, "nothing to take".
            raise BlockingIOError(errno.EAGAIN, "an oversized datagram was dropped")
        return (data, self.socket), client_address

    def shutdown_request(self, request: _Request) -> None:
        """Nothing to half-close: the socket is the server's."""
        self.close_request(request)

    def close_request(self, request: _Request) -> None:
        """Nothing to close: the socket is the server's."""


if hasattr(socket, "AF_UNIX"):

    class UnixStreamServer(TCPServer):
        """A stream server on a Unix-domain socket."""

        address_family: int = socket.AF_UNIX

    class UnixDatagramServer(UDPServer):
        """A datagram server on a Unix-domain socket."""

        address_family: int = socket.AF_UNIX

"""The predefined server classes: each is ``class X(MixIn, Server): pass``."""

from __future__ import annotations

import os
import socket

from netserve._core._socket_servers import TCPServer, UDPServer
from netserve._models._threading import ThreadingMixIn

__all__ = ["ThreadingTCPServer", "ThreadingUDPServer"]


class ThreadingTCPServer(ThreadingMixIn, TCPServer):
    """A TCP server with a thread per connection."""


class ThreadingUDPServer(ThreadingMixIn, UDPServer):
    """A UDP server with a thread per datagram."""


if hasattr(os, "fork"):
    from netserve._models._forking import ForkingMixIn

    __all__ += ["ForkingTCPServer", "ForkingUDPServer"]

    class ForkingTCPServer(ForkingMixIn, TCPServer):
        """A TCP server with a child process per connection."""

    class ForkingUDPServer(ForkingMixIn, UDPServer):
        """A UDP server with a child process per datagram."""


if hasattr(socket, "AF_UNIX"):
    from netserve._core._socket_servers import UnixDatagramServer, UnixStreamServer

    __all__ += ["ThreadingUnixDatagramServer", "ThreadingUnixStreamServer"]

    class ThreadingUnixStreamServer(ThreadingMixIn, UnixStreamServer):
        """A Unix stream server with a thread per connection."""

    class ThreadingUnixDatagramServer(ThreadingMixIn, UnixDatagramServer):
        """A Unix datagram server with a thread per datagram."""

    if hasattr(os, "fork"):
        __all__ += ["ForkingUnixDatagramServer", "ForkingUnixStreamServer"]

        class ForkingUnixStreamServer(ForkingMixIn, UnixStreamServer):
            """A Unix stream server with a child process per connection."""

        class ForkingUnixDatagramServer(ForkingMixIn, UnixDatagramServer):
            """A Unix datagram server with a child process per datagram."""

"""netserve: the stdlib's socketserver as a drop-in, and what production servers need.

``import netserve as socketserver`` runs existing socketserver code unchanged.
"""

import logging as _logging
import os as _os
import socket as _socket

from netserve._core._compat import install_as_socketserver, restore_socketserver
from netserve._core._connections import ServerStatistics
from netserve._core._errors import (
    AddressError,
    ConfigurationError,
    ConnectionTimeout,
    LineTooLong,
    MissingExtraError,
    NetserveError,
    NetserveWarning,
    ProxyProtocolError,
    SocketActivationError,
    StageError,
    TLSHandshakeError,
    UnusableSocketError,
)
from netserve._core._handlers import (
    BaseRequestHandler,
    DatagramRequestHandler,
    StreamRequestHandler,
)
from netserve._core._log import JsonFormatter
from netserve._core._servers import BaseServer
from netserve._core._socket_servers import TCPServer, UDPServer
from netserve._edges._proxy import proxy_header
from netserve._edges._proxyproto import ProxyHeader
from netserve._edges._proxyproto import parse_header as parse_proxy_header
from netserve._models._combos import ThreadingTCPServer, ThreadingUDPServer
from netserve._models._green import (
    GreenMixIn,
    GreenSocket,
    GreenTCPServer,
    GreenUDPServer,
    HubStatistics,
    green_sleep,
    to_thread,
)
from netserve._models._pool import (
    PoolStatistics,
    ThreadPoolMixIn,
    ThreadPoolTCPServer,
    ThreadPoolUDPServer,
)
from netserve._models._threading import ThreadingMixIn
from netserve._serving._adopt import server_from_socket
from netserve._serving._health import AdminThread, serve_admin
from netserve._serving._systemd import (
    SystemdNotifier,
    SystemdSocket,
    systemd_listeners,
    systemd_notify,
    systemd_watchdog_interval,
)

__version__ = "0.1.0"

# netserve logs through "netserve.<part>"; without this, Python's last-resort
# handler would print its warnings on a drop-in user's stderr, which the stdlib
# module never wrote to. Applications opt in by configuring logging.
_logging.getLogger("netserve").addHandler(_logging.NullHandler())

__all__ = [
    # The stdlib's names, always present.
    "BaseRequestHandler",
    "BaseServer",
    "DatagramRequestHandler",
    "StreamRequestHandler",
    "TCPServer",
    "ThreadingMixIn",
    "ThreadingTCPServer",
    "ThreadingUDPServer",
    "UDPServer",
]

if hasattr(_os, "fork"):
    from netserve._models._combos import ForkingTCPServer, ForkingUDPServer
    from netserve._models._forking import ForkingMixIn

    __all__ += ["ForkingMixIn", "ForkingTCPServer", "ForkingUDPServer"]

if hasattr(_socket, "AF_UNIX"):
    from netserve._core._socket_servers import UnixDatagramServer, UnixStreamServer
    from netserve._models._combos import ThreadingUnixDatagramServer, ThreadingUnixStreamServer

    __all__ += [
        "ThreadingUnixDatagramServer",
        "ThreadingUnixStreamServer",
        "UnixDatagramServer",
        "UnixStreamServer",
    ]
    if hasattr(_os, "fork"):
        from netserve._models._combos import ForkingUnixDatagramServer, ForkingUnixStreamServer

        __all__ += ["ForkingUnixDatagramServer", "ForkingUnixStreamServer"]

__all__ += [
    # netserve's own: concurrency models.
    "GreenMixIn",
    "GreenSocket",
    "GreenTCPServer",
    "GreenUDPServer",
    "green_sleep",
    "to_thread",
    "PoolStatistics",
    "HubStatistics",
    "ServerStatistics",
    "ThreadPoolMixIn",
    "ThreadPoolTCPServer",
    "ThreadPoolUDPServer",
]
if hasattr(_socket, "AF_UNIX"):
    from netserve._edges._unix import PeerCredentials, peer_credentials
    from netserve._models._green import GreenUnixDatagramServer, GreenUnixStreamServer
    from netserve._models._pool import ThreadPoolUnixDatagramServer, ThreadPoolUnixStreamServer

    __all__ += [
        "PeerCredentials",
        "peer_credentials",
        "GreenUnixDatagramServer",
        "GreenUnixStreamServer",
        "ThreadPoolUnixDatagramServer",
        "ThreadPoolUnixStreamServer",
    ]

if hasattr(_os, "fork"):
    from netserve._serving._figures import SupervisorStatistics
    from netserve._serving._supervisor import EXIT_WORKER_FAILED, Supervisor

    __all__ += [
        # netserve's own: the prefork supervisor.
        "EXIT_WORKER_FAILED",
        "Supervisor",
        "SupervisorStatistics",
    ]

__all__ += [
    # netserve's own: serving sockets made elsewhere, and systemd.
    "server_from_socket",
    "systemd_listeners",
    "SystemdSocket",
    "SystemdNotifier",
    "systemd_notify",
    "systemd_watchdog_interval",
    # netserve's own: running stdlib code on netserve.
    "install_as_socketserver",
    "restore_socketserver",
    # netserve's own: logging, health and metrics.
    "JsonFormatter",
    "AdminThread",
    "serve_admin",
    # netserve's own: the PROXY protocol.
    "ProxyHeader",
    "parse_proxy_header",
    "proxy_header",
    # netserve's own: errors and warnings.
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

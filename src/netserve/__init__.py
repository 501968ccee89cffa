"""netserve: the stdlib's socketserver as a drop-in, and what production servers need.

``import netserve as socketserver`` runs existing socketserver code unchanged.
"""

import logging as _logging
import os as _os
import socket as _socket

from netserve._adopt import server_from_socket
from netserve._combos import ThreadingTCPServer, ThreadingUDPServer
from netserve._compat import install_as_socketserver, restore_socketserver
from netserve._connections import ServerStatistics
from netserve._errors import (
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
from netserve._green import (
    GreenMixIn,
    GreenSocket,
    GreenTCPServer,
    GreenUDPServer,
    HubStatistics,
    green_sleep,
    to_thread,
)
from netserve._handlers import BaseRequestHandler, DatagramRequestHandler, StreamRequestHandler
from netserve._health import AdminThread, serve_admin
from netserve._log import JsonFormatter
from netserve._pool import (
    PoolStatistics,
    ThreadPoolMixIn,
    ThreadPoolTCPServer,
    ThreadPoolUDPServer,
)
from netserve._proxy import proxy_header
from netserve._proxyproto import ProxyHeader
from netserve._proxyproto import parse_header as parse_proxy_header
from netserve._servers import BaseServer
from netserve._socket_servers import TCPServer, UDPServer
from netserve._systemd import (
    SystemdNotifier,
    SystemdSocket,
    systemd_listeners,
    systemd_notify,
    systemd_watchdog_interval,
)
from netserve._threading import ThreadingMixIn

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
    from netserve._combos import ForkingTCPServer, ForkingUDPServer
    from netserve._forking import ForkingMixIn

    __all__ += ["ForkingMixIn", "ForkingTCPServer", "ForkingUDPServer"]

if hasattr(_socket, "AF_UNIX"):
    from netserve._combos import ThreadingUnixDatagramServer, ThreadingUnixStreamServer
    from netserve._socket_servers import UnixDatagramServer, UnixStreamServer

    __all__ += [
        "ThreadingUnixDatagramServer",
        "ThreadingUnixStreamServer",
        "UnixDatagramServer",
        "UnixStreamServer",
    ]
    if hasattr(_os, "fork"):
        from netserve._combos import ForkingUnixDatagramServer, ForkingUnixStreamServer

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
    from netserve._green import GreenUnixDatagramServer, GreenUnixStreamServer
    from netserve._pool import ThreadPoolUnixDatagramServer, ThreadPoolUnixStreamServer
    from netserve._unix import PeerCredentials, peer_credentials

    __all__ += [
        "PeerCredentials",
        "peer_credentials",
        "GreenUnixDatagramServer",
        "GreenUnixStreamServer",
        "ThreadPoolUnixDatagramServer",
        "ThreadPoolUnixStreamServer",
    ]

if hasattr(_os, "fork"):
    from netserve._figures import SupervisorStatistics
    from netserve._supervisor import EXIT_WORKER_FAILED, Supervisor

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

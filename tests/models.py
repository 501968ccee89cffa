"""The concurrency models, for tests parametrised over all of them."""

from __future__ import annotations

from typing import NamedTuple

import netserve


class Model(NamedTuple):
    tcp: type
    udp: type
    unix_stream: type
    unix_datagram: type


MODELS = {
    "sync": Model(
        netserve.TCPServer,
        netserve.UDPServer,
        netserve.UnixStreamServer,
        netserve.UnixDatagramServer,
    ),
    "threading": Model(
        netserve.ThreadingTCPServer,
        netserve.ThreadingUDPServer,
        netserve.ThreadingUnixStreamServer,
        netserve.ThreadingUnixDatagramServer,
    ),
    "forking": Model(
        netserve.ForkingTCPServer,
        netserve.ForkingUDPServer,
        netserve.ForkingUnixStreamServer,
        netserve.ForkingUnixDatagramServer,
    ),
    "pool": Model(
        netserve.ThreadPoolTCPServer,
        netserve.ThreadPoolUDPServer,
        netserve.ThreadPoolUnixStreamServer,
        netserve.ThreadPoolUnixDatagramServer,
    ),
    "hub": Model(
        netserve.GreenTCPServer,
        netserve.GreenUDPServer,
        netserve.GreenUnixStreamServer,
        netserve.GreenUnixDatagramServer,
    ),
}

# Models that handle requests concurrently, so a request can be in flight while
# the serving loop stops.
CONCURRENT = ["threading", "forking", "pool", "hub"]

# Models that park a silent stream connection until its first byte
# (park_until_readable, park_timeout).
PARKING = ["pool", "hub"]

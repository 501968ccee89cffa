"""The handler the two instances behind HAProxy serve (examples/haproxy/haproxy.cfg).

    cd examples/haproxy && netserve echo:LineEcho --bind 127.0.0.1:9001 \
        --metrics-bind 9101 --drain-delay 3 --workers 2

Each line a client sends comes back as it is, until the client closes. The
handler knows nothing of the load balancer: the command's readiness path
(/readyz on the --metrics-bind port) is what HAProxy checks, and --drain-delay
keeps the instance serving until HAProxy has stopped sending it connections.
"""

from __future__ import annotations

import netserve


class LineEcho(netserve.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)

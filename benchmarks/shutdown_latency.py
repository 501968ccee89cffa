"""shutdown() latency per model: how long shutdown() takes to return for a
server idling in serve_forever() with the default poll_interval (0.5 s).

Prints a JSON object: row -> {"median_ms", "max_ms"}. netserve wakes its loop;
the stdlib polls, so it is expected to take up to poll_interval.
"""

from __future__ import annotations

import json
import socket
import socketserver
import statistics
import sys
import threading
import time
from typing import Any

import netserve

RUNS = 7


class Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.recv(1)


def latency(server_class: Any) -> dict[str, float]:
    times = []
    for _ in range(RUNS):
        server = server_class(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        # One request through the loop: it is now surely inside serve_forever.
        with socket.create_connection(server.server_address, timeout=10) as client:
            client.sendall(b"x")
        # Then let it go idle in its wait, where a shutdown normally finds it
        # (a measurement, not a test: a short pause is what is being modelled).
        time.sleep(0.05)
        started = time.perf_counter()
        server.shutdown()
        times.append((time.perf_counter() - started) * 1000)
        thread.join()
        server.server_close()
    return {"median_ms": statistics.median(times), "max_ms": max(times)}


def main() -> int:
    rows = {
        "netserve-sync": netserve.TCPServer,
        "netserve-threading": netserve.ThreadingTCPServer,
        "netserve-forking": netserve.ForkingTCPServer,
        "netserve-pool": netserve.ThreadPoolTCPServer,
        "netserve-hub": netserve.GreenTCPServer,
        "stdlib-sync": socketserver.TCPServer,
        "stdlib-threading": socketserver.ThreadingTCPServer,
        "stdlib-forking": socketserver.ForkingTCPServer,
    }
    print(json.dumps({name: latency(cls) for name, cls in rows.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

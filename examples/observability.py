"""Health, metrics and logs for a server run without the supervisor.

    python examples/observability.py

Starts a thread-pool echo server with an access log in JSON and its health
and metrics endpoint (``serve_admin``), plays one client, reads ``/readyz``
and ``/metrics`` as a load balancer and Prometheus would, drains, and prints
what each said (docs/observability.md).
"""

from __future__ import annotations

import http.client
import logging
import socket
import sys
import threading

import netserve


class Echo(netserve.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


class Server(netserve.ThreadPoolTCPServer):
    access_log = True  # a line per request on netserve.access


def get(address: tuple[str, int], path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def main() -> None:
    # The application configures logging; netserve only logs (JSON on stdout).
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(netserve.JsonFormatter())
    logging.getLogger("netserve.access").addHandler(handler)
    logging.getLogger("netserve.access").setLevel(logging.INFO)

    server = Server(("127.0.0.1", 0), Echo)
    with netserve.serve_admin(server) as admin:
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        try:
            with socket.create_connection(server.server_address, timeout=10) as client:
                client.sendall(b"hello\n")
                client.recv(100)
            server.wait_closed(10)  # the access line is written as it closes
            print("readyz:", *get(admin.address, "/readyz"), end="")
            metrics = get(admin.address, "/metrics")[1].splitlines()
            print(*[m for m in metrics if m.startswith("netserve_requests_handled_total")])
            server.drain(5)
            print("readyz:", *get(admin.address, "/readyz"), end="")
        finally:
            server.shutdown()
            thread.join()
    server.server_close()
    logging.getLogger("netserve.access").removeHandler(handler)


if __name__ == "__main__":
    main()

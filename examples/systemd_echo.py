"""An echo server that systemd starts: socket activation and readiness.

Started by a socket unit, or by hand with

    systemd-socket-activate -l 127.0.0.1:9999 --fdname=echo python3 systemd_echo.py

it serves the socket it is given (the launcher starts it at the first
connection); started plainly, it listens on localhost:PORT (9999) itself. It
tells systemd when it serves (``Type=notify``) and when it stops; SIGTERM
(``systemctl stop``) or Ctrl-C stops it. Outside systemd the notifications
are simply not sent.
"""

import os
import signal
import socket

import netserve


class UpperEcho(netserve.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line.upper())


class TCPServer(netserve.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False  # on stop, do not wait for clients that stay connected


class UnixServer(netserve.ThreadingUnixStreamServer):
    daemon_threads = True
    block_on_close = False


def make_server():
    """The server, and the name of what it serves."""
    activated = netserve.systemd_listeners()
    if not activated:
        port = int(os.environ.get("PORT", "9999"))
        return TCPServer(("localhost", port), UpperEcho), "localhost"
    if len(activated) != 1:
        raise SystemExit(f"expected one socket from systemd, got {len(activated)}")
    (listener,) = activated
    server_class = UnixServer if listener.socket.family == socket.AF_UNIX else TCPServer
    return netserve.server_from_socket(server_class, listener.socket, UpperEcho), listener.name


if __name__ == "__main__":
    server, name = make_server()
    signal.signal(signal.SIGTERM, lambda signum, frame: server.shutdown())
    signal.signal(signal.SIGINT, lambda signum, frame: server.shutdown())
    with netserve.SystemdNotifier() as systemd:
        print(f"Serving {name} on {server.server_address}", flush=True)
        systemd.ready(status=f"serving {name}")
        server.serve_forever()
        systemd.stopping()
        server.server_close()
    print("Stopped", flush=True)

"""Limits and time-outs: a line server that bounds what each client can hold.

    python examples/limits.py

Starts a thread-pool server on a free loopback port, plays two clients
against it (one that goes quiet, one that sends an overlong line), and prints
what each was told and the server's counters (docs/limits.md).
"""

from __future__ import annotations

import socket
import threading

import netserve


class Lines(netserve.StreamRequestHandler):
    """Echoes lines; says why when netserve ends the conversation."""

    def handle(self) -> None:
        try:
            for line in self.rfile:
                self.wfile.write(b"echo: " + line)
        except netserve.ConnectionTimeout as exc:
            # The client went quiet: tell it, then let the time-out end the
            # request (counted in statistics().timeouts, never handle_error()).
            self.wfile.write(f"bye ({exc.setting})\n".encode())
            raise
        except netserve.LineTooLong:
            self.wfile.write(b"line too long\n")


class Server(netserve.ThreadPoolTCPServer):
    idle_timeout = 0.5  # seconds between lines (the pool's default is 120)
    max_line_size = 1024  # bytes in one line, newline included (default 64 KiB)
    max_connections_per_client = 10  # (default 100)


def talk(address: tuple[str, int], data: bytes, replies: int) -> None:
    with socket.create_connection(address, timeout=10) as client:
        client.sendall(data)
        with client.makefile("rb") as answers:
            for _ in range(replies):
                print(answers.readline().decode(), end="")


def main() -> None:
    with Server(("127.0.0.1", 0), Lines) as server:
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        try:
            address = server.server_address
            talk(address, b"hello\n", replies=2)  # then quiet: bye after 0.5 s
            talk(address, b"x" * 2000 + b"\n", replies=1)
        finally:
            server.shutdown()
            thread.join()
    # Read once server_close() (the with block) has waited for the workers.
    stats = server.statistics()
    print(f"handled {stats.handled}, timeouts {stats.timeouts}")


if __name__ == "__main__":
    main()

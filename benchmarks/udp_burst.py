"""Datagrams lost in a burst, against the receive buffer (issue 13, section 3).

    python benchmarks/udp_burst.py                      every model, the default sizes
    python benchmarks/udp_burst.py --models hub --sizes 0,1048576 --count 100000

For each model and each ``receive_buffer_size`` (0: the system's default), a
server of the model in this process (its handler does nothing), and a client
in a child process, pinned to another core where there is one, that sends
COUNT datagrams of 32 bytes as fast as it can. Then a marker datagram, sent
until it is answered: the socket's queue is taken in order, so once it is,
every datagram of the burst was either taken or dropped by the kernel. The
server is closed (waiting for the handlers still running), and the datagrams
its handler saw give what was lost. The kernel caps the buffer at
``net.core.rmem_max`` (and Linux doubles what it is asked for): the table
shows the size it took.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import netserve

MARKER = b"netserve-burst-end"
MODELS = {
    "sync": netserve.UDPServer,
    "threading": netserve.ThreadingUDPServer,
    "pool": netserve.ThreadPoolUDPServer,
    "hub": netserve.GreenUDPServer,
}
# The forking model forks a child per datagram: a burst of 100,000 is a
# measure of fork(), not of the buffer, so it is not among the defaults.

CLIENT = """
import socket, sys
count, port = int(sys.argv[1]), int(sys.argv[2])
payload = b"x" * 32
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.connect(("127.0.0.1", port))
    for _ in range(count):
        try:
            s.send(payload)
        except (BlockingIOError, ConnectionRefusedError):
            pass
"""


class Burst(netserve.DatagramRequestHandler):
    def handle(self) -> None:
        if self.packet == MARKER:
            self.wfile.write(b"ok")
        else:
            self.server.seen.append(1)  # one append: atomic across threads


def one(model: str, size: int, count: int) -> tuple[int, int]:
    """(the buffer the kernel gave, datagrams handled) for one burst."""
    base: Any = MODELS[model]
    cls: Any = type("Server", (base,), {"receive_buffer_size": size or None})
    server = cls(("127.0.0.1", 0), Burst)
    server.seen = []
    given = server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        cpus = sorted(os.sched_getaffinity(0))
        pin = ["taskset", "-c", str(cpus[-1])] if len(cpus) > 1 else []
        port = str(server.server_address[1])
        subprocess.run([*pin, sys.executable, "-c", CLIENT, str(count), port], check=True)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as marker:
            marker.settimeout(1)
            for _ in range(60):
                marker.sendto(MARKER, server.server_address)
                try:
                    marker.recv(16)
                    break
                except TimeoutError:
                    continue
            else:
                raise RuntimeError("the marker went unanswered for a minute")
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
    return given, len(server.seen)


def main() -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/udp_burst.py", description=__doc__)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--sizes", default="0,1048576,4194304,16777216")
    parser.add_argument("--count", type=int, default=100_000)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with open("/proc/sys/net/core/rmem_max") as f:
        rmem_max = int(f.read())
    print(
        f"{args.count:,} datagrams of 32 bytes; net.core.rmem_max {rmem_max:,}; "
        f"{os.cpu_count()} CPUs; Python {sys.version.split()[0]}\n"
    )
    print("| model | asked | kernel gave | handled | lost |")
    print("|---|---|---|---|---|")
    for model in args.models.split(","):
        for size in sizes:
            given, handled = one(model, size, args.count)
            lost = 1 - min(handled, args.count) / args.count
            asked = "default" if not size else f"{size:,}"
            print(f"| {model} | {asked} | {given:,} | {handled:,} | {lost:.0%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark's server rows, one per process: ``python servers.py ROW [udp]``.

Each binds 127.0.0.1 on a port the OS picks, prints ``READY <port>`` and serves
the line-echo workload (each line back upper-cased) until SIGTERM or SIGINT.
Every Python row uses the same logic: read a line, write it upper-cased.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

HOST = "127.0.0.1"


def ready(port: int) -> None:
    print(f"READY {port}", flush=True)


# -- socketserver-style rows (netserve and the stdlib) -------------------------------


def socketserver_row(module: Any, server_name: str, *, udp: bool) -> None:
    class LineEcho(module.StreamRequestHandler):  # type: ignore[misc, name-defined]
        disable_nagle_algorithm = True

        def handle(self) -> None:
            write = self.wfile.write
            for line in self.rfile:
                write(line.upper())

    class DatagramEcho(module.DatagramRequestHandler):  # type: ignore[misc, name-defined]
        def handle(self) -> None:
            self.wfile.write(self.rfile.read().upper())

    base = getattr(module, server_name)
    attributes: dict[str, Any] = {"allow_reuse_address": True, "daemon_threads": True}
    if not udp:
        attributes["request_queue_size"] = socket.SOMAXCONN
    if hasattr(base, "max_children"):
        attributes["block_on_close"] = False
    if hasattr(base, "max_connections_per_client"):
        # Every benchmark client comes from 127.0.0.1, up to 2,048 at once: the
        # connection limits would measure themselves. The time-outs stay at
        # their defaults (they are on the hot path, and measured with it).
        attributes["max_connections"] = None
        attributes["max_connections_per_client"] = None
    server_class = type("BenchServer", (base,), attributes)
    server = server_class((HOST, 0), DatagramEcho if udp else LineEcho)

    def stop(signum: int, frame: object) -> None:
        # Ask from another thread: the stdlib's shutdown() deadlocks on the
        # serving thread (netserve's would not).
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    ready(server.server_address[1])
    try:
        server.serve_forever()
    finally:
        server.block_on_close = False
        server.server_close()


# -- asyncio and uvloop rows -------------------------------------------------------


async def _handle_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while line := await reader.readline():
            writer.write(line.upper())
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


class _EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.pending = b""

    def data_received(self, data: bytes) -> None:
        data = self.pending + data
        end = data.rfind(b"\n") + 1
        if end:
            self.transport.write(data[:end].upper())
        self.pending = data[end:]

    def eof_received(self) -> bool:
        return False


class _DatagramEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data.upper(), addr)


async def _asyncio_main(kind: str, udp: bool) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    if udp:
        transport, _ = await loop.create_datagram_endpoint(_DatagramEcho, local_addr=(HOST, 0))
        ready(transport.get_extra_info("sockname")[1])
        await stopping.wait()
        transport.close()
        return
    if kind == "streams":
        server = await asyncio.start_server(_handle_stream, HOST, 0, backlog=socket.SOMAXCONN)
    else:
        server = await loop.create_server(_EchoProtocol, HOST, 0, backlog=socket.SOMAXCONN)
    ready(server.sockets[0].getsockname()[1])
    await stopping.wait()
    server.close()


def asyncio_row(kind: str, *, udp: bool, use_uvloop: bool) -> None:
    if use_uvloop:
        import uvloop

        uvloop.run(_asyncio_main(kind, udp))
    else:
        asyncio.run(_asyncio_main(kind, udp))


# -- gevent ------------------------------------------------------------------------


def gevent_row(*, udp: bool) -> None:
    from gevent import signal_handler
    from gevent.server import DatagramServer, StreamServer

    def handle(sock: Any, address: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rfile = sock.makefile("rb")
        try:
            for line in rfile:
                sock.sendall(line.upper())
        except ConnectionError:
            pass
        finally:
            rfile.close()

    class Echo(DatagramServer):  # type: ignore[misc]
        def handle(self, data: bytes, address: Any) -> None:
            self.socket.sendto(data.upper(), address)

    server: Any = Echo((HOST, 0)) if udp else StreamServer((HOST, 0), handle, backlog=4096)
    server.start()
    signal_handler(signal.SIGTERM, server.stop)
    signal_handler(signal.SIGINT, server.stop)
    ready(server.address[1])
    server.serve_forever()


# -- the table of rows -------------------------------------------------------------


def _netserve(name: str) -> Callable[[bool], None]:
    def run(udp: bool) -> None:
        import netserve

        socketserver_row(netserve, name, udp=udp)

    return run


def _stdlib(name: str) -> Callable[[bool], None]:
    def run(udp: bool) -> None:
        import socketserver

        socketserver_row(socketserver, name, udp=udp)

    return run


ROWS: dict[str, tuple[Callable[[bool], None], Callable[[bool], None] | None]] = {
    # name: (tcp runner, udp runner or None)
    "netserve-sync": (_netserve("TCPServer"), _netserve("UDPServer")),
    "netserve-threading": (_netserve("ThreadingTCPServer"), _netserve("ThreadingUDPServer")),
    "netserve-forking": (_netserve("ForkingTCPServer"), _netserve("ForkingUDPServer")),
    "netserve-pool": (_netserve("ThreadPoolTCPServer"), _netserve("ThreadPoolUDPServer")),
    "netserve-hub": (_netserve("GreenTCPServer"), _netserve("GreenUDPServer")),
    "stdlib-threading": (_stdlib("ThreadingTCPServer"), _stdlib("ThreadingUDPServer")),
    "stdlib-sync": (_stdlib("TCPServer"), _stdlib("UDPServer")),
    "stdlib-forking": (_stdlib("ForkingTCPServer"), _stdlib("ForkingUDPServer")),
    "asyncio-streams": (
        lambda udp: asyncio_row("streams", udp=udp, use_uvloop=False),
        lambda udp: asyncio_row("streams", udp=udp, use_uvloop=False),
    ),
    "asyncio-protocol": (lambda udp: asyncio_row("protocol", udp=udp, use_uvloop=False), None),
    "uvloop-streams": (
        lambda udp: asyncio_row("streams", udp=udp, use_uvloop=True),
        lambda udp: asyncio_row("streams", udp=udp, use_uvloop=True),
    ),
    "uvloop-protocol": (lambda udp: asyncio_row("protocol", udp=udp, use_uvloop=True), None),
    "gevent": (lambda udp: gevent_row(udp=udp), lambda udp: gevent_row(udp=udp)),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ROWS:
        print(f"usage: servers.py ROW [udp]; ROW is one of {', '.join(ROWS)}", file=sys.stderr)
        return 2
    udp = argv[1:] == ["udp"]
    tcp_runner, udp_runner = ROWS[argv[0]]
    runner = udp_runner if udp else tcp_runner
    if runner is None:
        print(f"{argv[0]} has no UDP row", file=sys.stderr)
        return 2
    runner(udp)
    # Leave at once: daemon handler threads may still hold drained connections.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

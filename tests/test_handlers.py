"""Request handlers: setup/handle/finish order, stream files, datagram replies."""

from __future__ import annotations

import io
import socket
from typing import Any

import pytest

import netserve
from tests.conftest import connect, recv_all


def serve_one(handler: type, payload: bytes = b"", *, shut_wr: bool = True) -> bytes:
    """Run one request through a TCPServer and return what the client received."""
    with netserve.TCPServer(("127.0.0.1", 0), handler) as server:
        with connect(server.server_address) as client:
            client.sendall(payload)
            if shut_wr:
                client.shutdown(socket.SHUT_WR)
            server.handle_request()
            return recv_all(client)


def test_setup_handle_finish_order() -> None:
    calls: list[str] = []

    class Handler(netserve.BaseRequestHandler):
        def setup(self) -> None:
            calls.append("setup")

        def handle(self) -> None:
            calls.append("handle")

        def finish(self) -> None:
            calls.append("finish")

    serve_one(Handler)
    assert calls == ["setup", "handle", "finish"]


def test_handler_attributes() -> None:
    seen: dict[str, Any] = {}

    class Handler(netserve.BaseRequestHandler):
        def handle(self) -> None:
            seen.update(request=self.request, address=self.client_address, server=self.server)

    with netserve.TCPServer(("127.0.0.1", 0), Handler) as server:
        with connect(server.server_address) as client:
            server.handle_request()
            assert seen["address"] == client.getsockname()
    assert seen["server"] is server
    assert isinstance(seen["request"], socket.socket)


def test_finish_runs_when_handle_raises() -> None:
    calls: list[str] = []

    class Handler(netserve.BaseRequestHandler):
        def handle(self) -> None:
            raise ValueError("boom")

        def finish(self) -> None:
            calls.append("finish")

    class Quiet(netserve.TCPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            calls.append("handle_error")

    with Quiet(("127.0.0.1", 0), Handler) as server, connect(server.server_address):
        server.handle_request()
    assert calls == ["finish", "handle_error"]


def test_setup_raising_skips_handle_and_finish() -> None:
    calls: list[str] = []

    class Handler(netserve.BaseRequestHandler):
        def setup(self) -> None:
            raise ValueError("no setup")

        def handle(self) -> None:
            calls.append("handle")

        def finish(self) -> None:
            calls.append("finish")

    class Quiet(netserve.TCPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            calls.append("handle_error")

    with Quiet(("127.0.0.1", 0), Handler) as server, connect(server.server_address) as client:
        server.handle_request()
        assert recv_all(client) == b""
    assert calls == ["handle_error"]


def test_stream_handler_files() -> None:
    seen: dict[str, Any] = {}

    class Handler(netserve.StreamRequestHandler):
        def handle(self) -> None:
            seen["wfile"] = self.wfile
            seen["rfile"] = self.rfile
            seen["connection"] = self.connection
            seen["written"] = self.wfile.write(b"abc")
            seen["line"] = self.rfile.readline()
            seen["wfile_fileno"] = self.wfile.fileno()
            seen["request_fileno"] = self.request.fileno()

    assert serve_one(Handler, b"line\nrest") == b"abc"
    assert isinstance(seen["wfile"], io.BufferedIOBase)
    assert seen["written"] == 3
    assert seen["line"] == b"line\n"
    assert seen["wfile_fileno"] == seen["request_fileno"]
    assert seen["wfile"].closed
    assert seen["rfile"].closed
    assert seen["connection"].fileno() == -1  # shut down and closed by the server


def test_unbuffered_wfile_sends_before_handle_returns() -> None:
    class Handler(netserve.StreamRequestHandler):
        def handle(self) -> None:
            self.wfile.write(b"first\n")
            # The client only answers after it got "first": this deadlocks if
            # the write were buffered.
            self.wfile.write(self.rfile.readline().upper())

    with netserve.ThreadingTCPServer(("127.0.0.1", 0), Handler) as server:
        with connect(server.server_address) as client:
            import threading

            t = threading.Thread(target=server.handle_request)
            t.start()
            reader = client.makefile("rb")
            assert reader.readline() == b"first\n"
            client.sendall(b"second\n")
            assert reader.readline() == b"SECOND\n"
            reader.close()
            t.join()


def test_closed_sendall_writer_refuses_writes() -> None:
    seen: dict[str, Any] = {}

    class Handler(netserve.StreamRequestHandler):
        def handle(self) -> None:
            self.wfile.close()
            with pytest.raises(ValueError, match="closed"):
                self.wfile.write(b"x")
            seen["ok"] = True

    serve_one(Handler)
    assert seen == {"ok": True}


def test_buffered_wfile_is_flushed_by_finish() -> None:
    class Handler(netserve.StreamRequestHandler):
        wbufsize = 65536

        def handle(self) -> None:
            self.wfile.write(b"buffered")

    assert serve_one(Handler) == b"buffered"


def test_unbuffered_rfile() -> None:
    class Handler(netserve.StreamRequestHandler):
        rbufsize = 0

        def handle(self) -> None:
            self.wfile.write(self.rfile.read(5))

    assert serve_one(Handler, b"hello world") == b"hello"


def test_finish_ignores_a_gone_peer() -> None:
    errors: list[Any] = []

    class Handler(netserve.StreamRequestHandler):
        wbufsize = 1 << 20

        def handle(self) -> None:
            # Stays in the buffer; finish() flushes it into a reset connection.
            self.wfile.write(b"x" * 200_000)

    class Server(netserve.TCPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            errors.append(client_address)

    with Server(("127.0.0.1", 0), Handler) as server:
        client = connect(server.server_address)
        # RST on close: no lingering, so the server's writes fail.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        client.close()
        server.handle_request()
    assert errors == []


def test_timeout_is_applied_to_the_connection() -> None:
    seen: dict[str, Any] = {}

    class Handler(netserve.StreamRequestHandler):
        timeout = 0.05

        def handle(self) -> None:
            seen["timeout"] = self.connection.gettimeout()
            try:
                self.rfile.readline()
            except TimeoutError:
                seen["timed_out"] = True

    serve_one(Handler, shut_wr=False)
    assert seen == {"timeout": 0.05, "timed_out": True}


@pytest.mark.parametrize("disable", [False, True])
def test_disable_nagle_algorithm(disable: bool) -> None:
    seen: dict[str, int] = {}

    class Handler(netserve.StreamRequestHandler):
        disable_nagle_algorithm = disable

        def handle(self) -> None:
            seen["nodelay"] = self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

    serve_one(Handler)
    assert bool(seen["nodelay"]) == disable


def udp_round_trip(handler: type, payload: bytes) -> tuple[bytes, Any]:
    with netserve.UDPServer(("127.0.0.1", 0), handler) as server:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(10)
            client.sendto(payload, server.server_address)
            server.handle_request()
            reply = client.recvfrom(65536)
            assert server.socket.fileno() >= 0  # the request did not close it
            return reply


def test_datagram_handler_replies_with_wfile() -> None:
    seen: dict[str, Any] = {}

    class Handler(netserve.DatagramRequestHandler):
        def handle(self) -> None:
            seen["packet"] = self.packet
            seen["socket"] = self.socket
            self.wfile.write(self.rfile.read().upper())

    data, _ = udp_round_trip(Handler, b"ping")
    assert data == b"PING"
    assert seen["packet"] == b"ping"
    assert isinstance(seen["socket"], socket.socket)


def test_datagram_handler_sends_an_empty_reply() -> None:
    class Handler(netserve.DatagramRequestHandler):
        def handle(self) -> None:
            pass

    data, _ = udp_round_trip(Handler, b"anything")
    assert data == b""


def test_long_datagram_is_truncated_to_max_packet_size() -> None:
    class Handler(netserve.DatagramRequestHandler):
        def handle(self) -> None:
            self.wfile.write(str(len(self.packet)).encode())

    data, _ = udp_round_trip(Handler, b"x" * 10000)
    assert data == b"8192"


def test_unix_datagram_server(unix_path: str) -> None:
    class Handler(netserve.DatagramRequestHandler):
        def handle(self) -> None:
            self.wfile.write(self.rfile.read()[::-1])

    with netserve.UnixDatagramServer(unix_path, Handler) as server:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
            client.settimeout(10)
            client.bind(unix_path + ".client")
            client.sendto(b"abc", server.server_address)
            server.handle_request()
            assert client.recv(100) == b"cba"

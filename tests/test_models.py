"""One behaviour suite over every concurrency model, with one unchanged handler.

The handlers are plain StreamRequestHandler/DatagramRequestHandler subclasses
as written for the stdlib; only the server class changes. Outcomes are observed
from the client side, so the forking model (whose handlers run in children) is
checked the same way as the others.
"""

from __future__ import annotations

import functools
import http.client
import http.server
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

import netserve
from tests.conftest import Serving, connect, recv_all
from tests.models import CONCURRENT, MODELS, PARKING


class LineEcho(netserve.StreamRequestHandler):
    """Answers each line upper-cased; "fail" raises; a silent client times out."""

    timeout = 5

    def handle(self) -> None:
        for line in self.rfile:
            if line == b"bye\n":
                return
            if line == b"fail\n":
                raise ValueError("asked to fail")
            if line == b"timeout please\n":
                self.connection.settimeout(0.05)
            self.wfile.write(line.upper())


class DatagramUpper(netserve.DatagramRequestHandler):
    def handle(self) -> None:
        data = self.rfile.read()
        if data == b"fail":
            raise ValueError("asked to fail")
        self.wfile.write(data.upper())


def reporting(server_class: type) -> type:
    """A subclass whose handle_error tells the client what went wrong."""

    class Reporting(server_class):  # type: ignore[misc, valid-type]
        def handle_error(self, request: Any, client_address: Any) -> None:
            import sys

            message = f"error: {type(sys.exc_info()[1]).__name__}\n".encode()
            if isinstance(request, tuple):
                request[1].sendto(message, client_address)
            else:
                request.sendall(message)

    return Reporting


@pytest.fixture(params=sorted(MODELS))
def model(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_tcp_echo(model: str) -> None:
    server = reporting(MODELS[model].tcp)(("127.0.0.1", 0), LineEcho)
    with Serving(server) as serving:
        for _ in range(3):
            with connect(serving.address) as client:
                client.sendall(b"hello\nworld\n")
                client.shutdown(socket.SHUT_WR)
                assert recv_all(client) == b"HELLO\nWORLD\n"


def test_unix_stream_echo(model: str, unix_path: str) -> None:
    server = reporting(MODELS[model].unix_stream)(unix_path, LineEcho)
    with Serving(server), connect(unix_path, socket.AF_UNIX) as client:
        client.sendall(b"unix\n")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b"UNIX\n"


def test_udp_echo(model: str) -> None:
    server = reporting(MODELS[model].udp)(("127.0.0.1", 0), DatagramUpper)
    with Serving(server) as serving, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(10)
        for word in (b"one", b"two", b"three"):
            client.sendto(word, serving.address)
            assert client.recv(100) == word.upper()


def test_unix_datagram_echo(model: str, unix_path: str) -> None:
    server = reporting(MODELS[model].unix_datagram)(unix_path, DatagramUpper)
    with Serving(server), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
        client.settimeout(10)
        client.bind(unix_path + ".client")
        client.sendto(b"datagram", unix_path)
        assert client.recv(100) == b"DATAGRAM"


def test_stream_errors_reach_handle_error(model: str) -> None:
    server = reporting(MODELS[model].tcp)(("127.0.0.1", 0), LineEcho)
    with Serving(server) as serving, connect(serving.address) as client:
        client.sendall(b"ok\nfail\n")
        assert recv_all(client) == b"OK\nerror: ValueError\n"
        # The server carries on.
        with connect(serving.address) as again:
            again.sendall(b"still here\n")
            again.shutdown(socket.SHUT_WR)
            assert recv_all(again) == b"STILL HERE\n"


def test_datagram_errors_reach_handle_error(model: str) -> None:
    server = reporting(MODELS[model].udp)(("127.0.0.1", 0), DatagramUpper)
    with Serving(server) as serving, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(10)
        client.sendto(b"fail", serving.address)
        replies = {client.recv(100), client.recv(100)}
        # handle_error's report, and finish()'s (empty) reply.
        assert replies == {b"error: ValueError\n", b""}


def test_handler_timeout(model: str) -> None:
    server = reporting(MODELS[model].tcp)(("127.0.0.1", 0), LineEcho)
    with Serving(server) as serving, connect(serving.address) as client:
        client.sendall(b"timeout please\n")
        # Then silence: the handler's read times out and handle_error reports it.
        assert recv_all(client) == b"TIMEOUT PLEASE\nerror: TimeoutError\n"


def test_shutdown_and_server_close(model: str) -> None:
    server = MODELS[model].tcp(("127.0.0.1", 0), LineEcho)
    thread = threading.Thread(target=server.serve_forever, args=(3600,))
    thread.start()
    with connect(server.server_address) as client:
        client.sendall(b"x\n")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b"X\n"
    server.shutdown()  # an hour-long poll interval: only a wake-up ends it
    thread.join(10)
    assert not thread.is_alive()
    server.server_close()
    assert server.socket.fileno() == -1


@pytest.mark.parametrize("model_name", CONCURRENT)
def test_server_close_waits_for_requests_in_flight(model_name: str) -> None:
    server = MODELS[model_name].tcp(("127.0.0.1", 0), LineEcho)
    entered = threading.Event()
    closed = threading.Event()
    with Serving(server, close=False) as serving:
        client = connect(serving.address)
        client.sendall(b"first\n")
        assert client.recv(100) == b"FIRST\n"  # a handler is now in flight
    # The loop has stopped; the handler still serves its connection.
    client.sendall(b"after shutdown\n")
    assert client.recv(100) == b"AFTER SHUTDOWN\n"

    def close() -> None:
        entered.set()
        server.server_close()
        closed.set()

    closer = threading.Thread(target=close)
    closer.start()
    try:
        assert entered.wait(10)
        # The handler ends only on "bye": while it runs, server_close() must
        # not return. It is alive on both sides of this wait (it answers
        # below, on the same connection), so a return in between is a failure.
        assert not closed.wait(0.5), "server_close() returned while a handler was in flight"
        client.sendall(b"during close\n")
        assert client.recv(100) == b"DURING CLOSE\n"
        assert not closed.is_set(), "server_close() returned while a handler was in flight"
    finally:
        # The handler ends, so server_close() can return. (Not by closing: a
        # forked child holds a copy of this process's client socket.)
        client.sendall(b"bye\n")
        closer.join(10)
        client.close()
    assert not closer.is_alive()
    assert closed.is_set()


def test_stdlib_http_handler(model: str, tmp_path: Path) -> None:
    (tmp_path / "index.txt").write_bytes(b"served by netserve\n")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    with Serving(MODELS[model].tcp(("127.0.0.1", 0), handler)) as serving:
        for _ in range(2):
            conn = http.client.HTTPConnection(*serving.address, timeout=10)
            try:
                conn.request("GET", "/index.txt")
                response = conn.getresponse()
                assert response.status == 200
                assert response.read() == b"served by netserve\n"
            finally:
                conn.close()


@pytest.mark.parametrize("model", PARKING)
def test_server_speaks_first_without_parking(model: str) -> None:
    class Banner(netserve.StreamRequestHandler):
        def handle(self) -> None:
            self.wfile.write(b"220 hello\n")
            self.wfile.write(self.rfile.readline().upper())

    server_class = type("Speaking", (MODELS[model].tcp,), {"park_until_readable": False})
    with Serving(server_class(("127.0.0.1", 0), Banner)) as serving:
        with connect(serving.address) as client:
            assert client.recv(100) == b"220 hello\n"  # before the client said anything
            client.sendall(b"ehlo\n")
            assert client.recv(100) == b"EHLO\n"

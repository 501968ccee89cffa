"""server_from_socket(): every model serves a socket made elsewhere."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

import netserve
from tests.conftest import Serving, connect, recv_all
from tests.models import MODELS


class UpperStream(netserve.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.readline().upper())


class UpperDatagram(netserve.DatagramRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.read().upper())


KINDS = ["tcp", "tcp6", "udp", "unix_stream", "unix_datagram"]


def _made_elsewhere(kind: str, path: str) -> socket.socket:
    """A bound (and for streams, listening) socket, as a manager would pass it."""
    if kind == "tcp":
        return socket.create_server(("127.0.0.1", 0))
    if kind == "tcp6":
        return socket.create_server(("::1", 0), family=socket.AF_INET6)
    family = socket.AF_UNIX if kind.startswith("unix") else socket.AF_INET
    stream = kind == "unix_stream"
    sock = socket.socket(family, socket.SOCK_STREAM if stream else socket.SOCK_DGRAM)
    sock.bind(path if family == socket.AF_UNIX else ("127.0.0.1", 0))
    if stream:
        sock.listen()
    return sock


@pytest.fixture
def client_path() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="ns-", dir="/tmp") as directory:
        yield os.path.join(directory, "c")


def _exchange(kind: str, address: Any, client_path: str) -> bytes:
    if kind in ("tcp", "tcp6", "unix_stream"):
        family = {"tcp": socket.AF_INET, "tcp6": socket.AF_INET6}.get(kind, socket.AF_UNIX)
        with connect(address, family) as client:
            client.sendall(b"hello\n")
            return recv_all(client)
    family = socket.AF_UNIX if kind == "unix_datagram" else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as client:
        client.settimeout(10)
        # A Unix datagram client needs an address of its own for the reply.
        client.bind(client_path if family == socket.AF_UNIX else ("127.0.0.1", 0))
        client.sendto(b"hello\n", address)
        return client.recv(100)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_model_serves_a_socket_made_elsewhere(
    model: str, kind: str, unix_path: str, client_path: str
) -> None:
    server_class = getattr(MODELS[model], "tcp" if kind == "tcp6" else kind)
    handler = UpperStream if kind in ("tcp", "tcp6", "unix_stream") else UpperDatagram
    sock = _made_elsewhere(kind, unix_path)
    with netserve.server_from_socket(server_class, sock, handler) as server:
        assert server.socket is sock
        assert server.server_address == sock.getsockname()
        assert server.address_family == sock.family
        with Serving(server, poll_interval=None, close=False):
            assert _exchange(kind, server.server_address, client_path) == b"HELLO\n"
    assert sock.fileno() == -1  # server_close() closed it


@pytest.mark.parametrize(
    ("server_class", "kind", "message"),
    [
        (netserve.TCPServer, "udp", "TCPServer serves TCP sockets, not a UDP socket"),
        (
            netserve.ThreadingTCPServer,
            "unix_stream",
            "ThreadingTCPServer serves TCP sockets, not a Unix stream socket",
        ),
        (
            netserve.GreenUnixStreamServer,
            "tcp",
            "GreenUnixStreamServer serves Unix stream sockets, not a TCP socket",
        ),
        (
            netserve.ThreadPoolUDPServer,
            "unix_datagram",
            "ThreadPoolUDPServer serves UDP sockets, not a Unix datagram socket",
        ),
    ],
)
def test_a_socket_of_another_kind_is_refused(
    server_class: type[netserve.TCPServer], kind: str, message: str, unix_path: str
) -> None:
    with _made_elsewhere(kind, unix_path) as sock:
        with pytest.raises(netserve.UnusableSocketError) as caught:
            netserve.server_from_socket(server_class, sock, UpperStream)
        assert str(caught.value) == message
        assert sock.fileno() >= 0  # still the caller's


def test_a_stream_socket_must_be_listening() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        with pytest.raises(netserve.UnusableSocketError, match="not listening: call listen"):
            netserve.server_from_socket(netserve.ThreadPoolTCPServer, sock, UpperStream)
        assert sock.fileno() >= 0


def test_the_backlog_its_owner_chose_is_kept() -> None:
    # request_queue_size is 5; listen() is not called again. Six clients fit in a
    # backlog of 16 before the server accepts any.
    with socket.create_server(("127.0.0.1", 0), backlog=16) as sock:
        with netserve.server_from_socket(netserve.TCPServer, sock, UpperStream) as server:
            clients = [connect(server.server_address) for _ in range(8)]
            try:
                for client in clients:
                    client.sendall(b"queued\n")
                with Serving(server, poll_interval=None, close=False):
                    assert [recv_all(c) for c in clients] == [b"QUEUED\n"] * 8
            finally:
                for client in clients:
                    client.close()


class IdleLimited(netserve.ThreadingTCPServer):
    # The same for the first byte and the next: the kernel's receive time-out.
    park_timeout = idle_timeout = 0.3
    # Smaller than the number of connections queued before the server starts.
    request_queue_size = 1


def test_connections_queued_before_adoption_get_the_time_outs() -> None:
    # Connections queued on the listener before it had its time-outs do not
    # inherit them: each one the kernel may hold is checked as it is accepted.
    with socket.create_server(("127.0.0.1", 0), backlog=16) as sock:
        clients = [connect(sock.getsockname()) for _ in range(4)]
        try:
            with netserve.server_from_socket(IdleLimited, sock, UpperStream) as server:
                with Serving(server, poll_interval=None, close=False):
                    # Silent clients: each handler's readline() times out; the
                    # server closes the connection (well within the 10 s the
                    # client waits).
                    assert [recv_all(c) for c in clients] == [b""] * 4
        finally:
            for client in clients:
                client.close()

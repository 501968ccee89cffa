"""Close separate from wait: close() now, wait_closed(timeout), abort_connections().

The regression these answer: server_close() waits as long as an idle client
stays connected (8.3 s in a probe, unbounded in practice). The bounded stop is
close(), then wait_closed() with a deadline, then abort_connections().
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest

import netserve
from tests.conftest import Serving, connect
from tests.models import MODELS, PARKING


class Chat(netserve.StreamRequestHandler):
    """Answers each line upper-cased until the client closes."""

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line.upper())


@pytest.fixture(params=sorted(MODELS))
def model(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def closing_in_thread(server: Any) -> threading.Thread:
    thread = threading.Thread(target=server.server_close)
    thread.start()
    return thread


def test_an_idle_client_is_ended_by_abort_not_waited_for(model: str) -> None:
    server = MODELS[model].tcp(("127.0.0.1", 0), Chat)
    with Serving(server, close=False) as serving:
        address = serving.address
        with connect(address) as idle:
            idle.sendall(b"hello\n")
            assert idle.recv(100) == b"HELLO\n"  # its handler runs, and now waits
            server.close()  # returns at once, the handler still waiting
            with pytest.raises(ConnectionRefusedError):
                connect(address).close()
            assert not server.wait_closed(0.2)
            assert server.statistics().active == 1
            server.abort_connections()
            assert server.wait_closed(10)
            assert read_until_closed(idle) == b""
    assert server.statistics().active == 0
    closer = closing_in_thread(server)
    closer.join(10)
    assert not closer.is_alive(), "server_close() still waits after every connection ended"


def test_requests_in_progress_finish_after_close(model: str) -> None:
    server = MODELS[model].tcp(("127.0.0.1", 0), Chat)
    with Serving(server, close=False) as serving, connect(serving.address) as client:
        client.sendall(b"one\n")
        assert client.recv(100) == b"ONE\n"
        server.close()
        # The connection was accepted before close(): it is served to its end.
        client.sendall(b"two\n")
        assert client.recv(100) == b"TWO\n"
        client.shutdown(socket.SHUT_WR)
        assert read_until_closed(client) == b""
        assert server.wait_closed(10)
    server.server_close()
    stats = server.statistics()
    assert (stats.accepted, stats.handled, stats.active) == (1, 1, 0)


@pytest.mark.parametrize("model", PARKING)
def test_close_closes_parked_connections(model: str) -> None:
    server = MODELS[model].tcp(("127.0.0.1", 0), Chat)
    with Serving(server, close=False) as serving, connect(serving.address) as silent:
        # Parked: accepted, no byte sent. Known once a second client got through.
        with connect(serving.address) as other:
            other.sendall(b"x\n")
            assert other.recv(10) == b"X\n"
        server.close()
        assert read_until_closed(silent) == b""
        assert server.wait_closed(10)
    server.server_close()
    stats = server.statistics()
    assert (stats.accepted, stats.handled, stats.parked, stats.active) == (2, 1, 0, 0)


def test_wait_closed_with_nothing_accepted_returns_at_once(model: str) -> None:
    with MODELS[model].tcp(("127.0.0.1", 0), Chat) as server:
        server.close()
        assert server.wait_closed(0)


def test_forking_abort_kills_a_child_that_ignores_sigterm() -> None:
    import signal

    class Stubborn(netserve.StreamRequestHandler):
        def handle(self) -> None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self.wfile.write(b"ready\n")
            self.rfile.read()  # until the client closes, which it never does

    class Server(netserve.ForkingTCPServer):
        abort_grace = 0.2

    server = Server(("127.0.0.1", 0), Stubborn)
    with Serving(server, close=False) as serving, connect(serving.address) as client:
        client.sendall(b"x")
        assert client.recv(10) == b"ready\n"
        server.close()
        server.abort_connections()  # SIGTERM is ignored: SIGKILL after the grace
        assert server.wait_closed(10)
        assert read_until_closed(client) == b""
    server.server_close()

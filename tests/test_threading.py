"""ThreadingMixIn: daemon flags, joining on close, pruning, errors in threads."""

from __future__ import annotations

import threading
from typing import Any

import pytest

import netserve
from tests.conftest import Serving, connect, recv_all


class Gate:
    """Handlers wait at the gate until the test opens it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()
        self.threads: list[threading.Thread] = []

    def handler(self) -> type:
        gate = self

        class Handler(netserve.BaseRequestHandler):
            def handle(self) -> None:
                gate.threads.append(threading.current_thread())
                gate.entered.set()
                assert gate.open.wait(10)
                self.request.sendall(b"done")

        return Handler


@pytest.mark.parametrize("daemon", [False, True])
def test_daemon_threads(daemon: bool) -> None:
    gate = Gate()

    class Server(netserve.ThreadingTCPServer):
        daemon_threads = daemon

    with Server(("127.0.0.1", 0), gate.handler()) as server:
        with connect(server.server_address) as client:
            server.handle_request()
            assert gate.entered.wait(10)
            assert gate.threads[0].daemon is daemon
            gate.open.set()
            assert recv_all(client) == b"done"
        gate.threads[0].join()


def test_server_close_waits_for_request_threads() -> None:
    gate = Gate()
    entered = threading.Event()
    closed = threading.Event()
    server = netserve.ThreadingTCPServer(("127.0.0.1", 0), gate.handler())
    with connect(server.server_address) as client:
        server.handle_request()
        assert gate.entered.wait(10)

        def close() -> None:
            entered.set()
            server.server_close()
            closed.set()

        closer = threading.Thread(target=close)
        closer.start()
        try:
            assert entered.wait(10)
            # The handler is held at the gate throughout: server_close() must
            # still be waiting for its thread.
            assert not closed.wait(0.5), "server_close() returned before the request thread"
            assert gate.threads[0].is_alive()
        finally:
            gate.open.set()
            closer.join(10)
        assert not closer.is_alive()
        assert closed.is_set()
        assert not gate.threads[0].is_alive()  # joined before close returned
        assert recv_all(client) == b"done"


def test_server_close_does_not_wait_without_block_on_close() -> None:
    gate = Gate()

    class Server(netserve.ThreadingTCPServer):
        block_on_close = False

    server = Server(("127.0.0.1", 0), gate.handler())
    with connect(server.server_address) as client:
        server.handle_request()
        assert gate.entered.wait(10)
        server.server_close()  # returns with the handler still waiting
        assert gate.threads[0].is_alive()
        gate.open.set()
        assert recv_all(client) == b"done"
        gate.threads[0].join()


def test_finished_threads_are_not_kept() -> None:
    class Quick(netserve.BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall(b"ok")

    with netserve.ThreadingTCPServer(("127.0.0.1", 0), Quick) as server:
        for _ in range(30):
            with connect(server.server_address) as client:
                server.handle_request()
                assert recv_all(client) == b"ok"
        # Each finished before the next was added: the record stays small.
        assert len(server._threads) < 5  # type: ignore[attr-defined]


def test_errors_in_threads_reach_handle_error_and_the_request_is_closed() -> None:
    seen: list[Any] = []
    done = threading.Event()

    class Failing(netserve.BaseRequestHandler):
        def handle(self) -> None:
            raise ValueError("in a thread")

    class Server(netserve.ThreadingTCPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            seen.append(client_address)

        def shutdown_request(self, request: Any) -> None:
            super().shutdown_request(request)
            done.set()

    with Server(("127.0.0.1", 0), Failing) as server, connect(server.server_address) as client:
        server.handle_request()
        assert done.wait(10)
        assert recv_all(client) == b""
        assert seen == [client.getsockname()]


def test_system_exit_in_a_thread_is_not_handled_and_still_closes(
    excepthook_calls: list[type[BaseException]],
) -> None:
    seen: list[Any] = []
    done = threading.Event()

    class Exiting(netserve.BaseRequestHandler):
        def handle(self) -> None:
            raise SystemExit(1)

    class Server(netserve.ThreadingTCPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            seen.append(client_address)

        def shutdown_request(self, request: Any) -> None:
            super().shutdown_request(request)
            done.set()

    with Server(("127.0.0.1", 0), Exiting) as server:
        with connect(server.server_address) as client:
            server.handle_request()
            assert done.wait(10)
            assert recv_all(client) == b""
        stats = server.statistics()
    assert seen == []
    assert excepthook_calls == [SystemExit]
    # Counted as an error, as in every model.
    assert (stats.handled, stats.errors, stats.active) == (1, 1, 0), stats


def test_threading_udp_server_serves_concurrently() -> None:
    import socket

    class Upper(netserve.DatagramRequestHandler):
        def handle(self) -> None:
            self.wfile.write(self.rfile.read().upper())

    with Serving(netserve.ThreadingUDPServer(("127.0.0.1", 0), Upper)) as serving:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(10)
            for word in (b"a", b"b", b"c"):
                client.sendto(word, serving.address)
            assert sorted(client.recv(10) for _ in range(3)) == [b"A", b"B", b"C"]

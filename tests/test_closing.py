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


# -- regressions from review ---------------------------------------------------------------


def test_hub_serves_on_after_aborting_a_sleeping_handler() -> None:
    class Sleepy(netserve.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                if line == b"sleep\n":
                    self.wfile.write(b"sleeping\n")
                    netserve.green_sleep(0.3)  # ended here by the abort
                self.wfile.write(line.upper())

    server = netserve.GreenTCPServer(("127.0.0.1", 0), Sleepy)
    with Serving(server) as serving:
        with connect(serving.address) as sleeper:
            sleeper.sendall(b"sleep\n")
            assert sleeper.recv(100) == b"sleeping\n"
            server.abort_connections()
            assert read_until_closed(sleeper) == b""
        # The sleep's timer fires after the abort: the hub must still serve.
        with connect(serving.address) as client:
            client.sendall(b"after\n")
            assert client.recv(100) == b"AFTER\n"
            # Past the aborted sleep's deadline, and served again.
            netserve_sleep_done = threading.Event()
            netserve_sleep_done.wait(0.4)
            client.sendall(b"again\n")
            assert client.recv(100) == b"AGAIN\n"


class Held(netserve.StreamRequestHandler):
    """Answers its first line once the server's gate opens, then echoes."""

    def handle(self) -> None:
        first = self.rfile.readline()
        assert self.server.gate.wait(10)  # type: ignore[attr-defined]
        self.wfile.write(first.upper())
        for line in self.rfile:
            self.wfile.write(line.upper())


class OneLine(netserve.StreamRequestHandler):
    """Answers one line once the server's gate opens: a single worker can take
    such requests in any order."""

    def handle(self) -> None:
        line = self.rfile.readline()
        assert self.server.gate.wait(10)  # type: ignore[attr-defined]
        self.wfile.write(line.upper())


def gated_pool(handler: type = Held, **attributes: Any) -> Any:
    cls = type(
        "GatedPool",
        (netserve.ThreadPoolTCPServer,),
        {"max_workers": 1, "queue_size": 1, **attributes},
    )
    server = cls(("127.0.0.1", 0), handler)
    server.gate = threading.Event()
    return server


def test_pool_accepts_again_after_an_abort_with_no_poll_interval() -> None:
    class Full(netserve.ThreadPoolTCPServer):
        max_workers = 1
        queue_size = 1

        def service_actions(self) -> None:
            # Runs on every pass of the loop: says when the worker is busy and
            # the queue full, without polling. The loop's next step is to stop
            # accepting and wait with no timeout (poll_interval None).
            stats = self.statistics()
            if (stats.busy_workers, stats.queued) == (1, 1):
                self.full.set()  # type: ignore[attr-defined]

    server = Full(("127.0.0.1", 0), OneLine)
    server.gate = threading.Event()  # type: ignore[attr-defined]
    server.full = threading.Event()  # type: ignore[attr-defined]
    with Serving(server, poll_interval=None):
        busy = connect(server.server_address)
        queued = connect(server.server_address)
        try:
            busy.sendall(b"a\n")
            queued.sendall(b"b\n")
            assert server.full.wait(10)  # type: ignore[attr-defined]
            server.abort_connections()  # must wake the loop: it waits with no timeout
            server.gate.set()  # type: ignore[attr-defined]
            with connect(server.server_address) as client:
                client.sendall(b"c\n")
                assert read_until_closed(client) == b"C\n"
        finally:
            busy.close()
            queued.close()


def test_pool_park_timeout_spares_a_client_that_spoke_while_workers_were_busy() -> None:
    server = gated_pool(OneLine, queue_size=1, park_timeout=0.3)
    with Serving(server, close=False):
        with connect(server.server_address) as busy, connect(server.server_address) as queued:
            busy.sendall(b"a\n")
            queued.sendall(b"b\n")
            with connect(server.server_address) as late:
                late.sendall(b"c\n")  # spoke at once, but no worker is free
                closed = threading.Event()
                closed.wait(0.6)  # past its park_timeout
                server.gate.set()
                for client, reply in ((busy, b"A\n"), (queued, b"B\n"), (late, b"C\n")):
                    assert read_until_closed(client) == reply
    server.server_close()
    stats = server.statistics()
    assert (stats.park_timeouts, stats.handled, stats.active) == (0, 3, 0)


def test_pool_close_hands_over_connections_that_spoke() -> None:
    # One worker held by the gate, a queue of one: clients accepted while the
    # queue had room and silent until it filled are parked when they speak.
    class Counting(netserve.ThreadPoolTCPServer):
        max_workers = 1
        queue_size = 1
        expected = 5

        def service_actions(self) -> None:
            # Runs on every pass of the loop: tells the test once every client
            # has been accepted, without polling.
            if self.statistics().accepted >= self.expected:
                self.all_in.set()  # type: ignore[attr-defined]

    server = Counting(("127.0.0.1", 0), OneLine)
    server.gate = threading.Event()  # type: ignore[attr-defined]
    server.all_in = threading.Event()  # type: ignore[attr-defined]
    clients: list[socket.socket] = []
    try:
        with Serving(server, poll_interval=0.05, close=False):
            clients.extend(connect(server.server_address) for _ in range(5))
            *speakers, silent = clients
            speakers[0].sendall(b"0\n")  # taken by the worker, held at the gate
            # Parked connections take no room in the queue: all are accepted.
            assert server.all_in.wait(10)  # type: ignore[attr-defined]
            for i, client in enumerate(speakers[1:], 1):
                client.sendall(b"%d\n" % i)  # one fills the queue, two stay parked
            server.close()
            server.gate.set()  # type: ignore[attr-defined]
            for i, client in enumerate(speakers):
                client.settimeout(5)
                assert read_until_closed(client) == b"%d\n" % i
            assert read_until_closed(silent) == b""
            assert server.wait_closed(10)
    finally:
        server.gate.set()  # type: ignore[attr-defined]
        for client in clients:
            client.close()
        server.server_close()
    stats = server.statistics()
    assert stats.accepted == stats.handled + stats.refused + stats.active
    assert (stats.handled, stats.refused, stats.active) == (4, 1, 0)


def test_pool_close_from_the_serving_thread() -> None:
    class ClosesItself(netserve.ThreadPoolTCPServer):
        close_now = False

        def service_actions(self) -> None:
            if self.close_now:
                self.close()  # on the loop's own thread

    server = ClosesItself(("127.0.0.1", 0), Chat)
    serving = Serving(server, poll_interval=0.05, close=False)
    with serving, connect(server.server_address) as silent:
        with connect(server.server_address) as client:
            client.sendall(b"x\n")
            assert client.recv(10) == b"X\n"
        server.close_now = True
        assert read_until_closed(silent) == b""  # parked: closed as the loop left
    server.server_close()


def test_hub_server_close_before_shutdown_leaves_nothing_open() -> None:
    server = netserve.GreenTCPServer(("127.0.0.1", 0), Chat)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            server.serve_forever()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    with connect(server.server_address) as client:
        client.sendall(b"x\n")
        assert client.recv(10) == b"X\n"
    server.server_close()
    server.shutdown()
    thread.join(10)
    assert not thread.is_alive()
    assert errors == []


@pytest.mark.parametrize("model", PARKING)
def test_server_close_serves_a_parked_connection_that_already_spoke(model: str) -> None:
    # handle_request() accepts it; its bytes are there before the server has
    # looked: server_close() hands it to a handler, as a request, not closes it.
    server = MODELS[model].tcp(("127.0.0.1", 0), Chat)
    with connect(server.server_address) as client:
        client.sendall(b"x\n")
        client.shutdown(socket.SHUT_WR)
        server.handle_request()
        server.server_close()
        assert read_until_closed(client) == b"X\n"
    assert server.statistics().handled == 1


@pytest.mark.parametrize("model", sorted(PARKING))
def test_abort_ends_parked_connections_while_the_loop_serves(model: str) -> None:
    # drain() calls abort_connections() at its deadline with the loop still
    # running: a parked (silent) connection must end then too, not only at
    # close() (the hub left it, so drain() ran on to the park timeout).
    server = MODELS[model].tcp(("127.0.0.1", 0), Chat)
    with Serving(server) as serving, connect(serving.address) as silent:
        # Served after it, so the silent one was accepted, and parked.
        with connect(serving.address) as marker:
            marker.sendall(b"marker\n")
            assert marker.recv(100) == b"MARKER\n"
            assert server.statistics().parked == 1
            server.abort_connections()
            assert server.wait_closed(10), server.statistics()
        assert read_until_closed(silent) == b""
        # Counted once: refused (the hub closes it), or handled (the pool's
        # shut-down socket reads as an end of stream, which a worker takes).
        stats = server.statistics()
        assert (stats.parked, stats.active, stats.handled + stats.refused) == (0, 0, 2), stats

"""GreenMixIn: cooperative handlers, timeouts, many connections, the hub's life.

(GreenSocket's own tests: test_greensocket.py; the kernel's: test_hub.py.)
"""

from __future__ import annotations

import contextvars
import logging
import os
import socket
import subprocess
import sys
import threading
from typing import Any

import pytest

import netserve
from tests.conftest import Serving, connect, recv_all


class Echo(netserve.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line.upper())


def test_a_waiting_handler_does_not_block_the_others() -> None:
    class Handler(netserve.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                if line == b"wait\n":
                    # Blocks on its own socket only: the others keep being served.
                    self.wfile.write(b"waiting\n" + self.rfile.readline())
                else:
                    self.wfile.write(line.upper())

    with Serving(netserve.GreenTCPServer(("127.0.0.1", 0), Handler)) as serving:
        with connect(serving.address) as slow:
            slow.sendall(b"wait\n")
            others = [connect(serving.address) for _ in range(20)]
            try:
                for client in others:
                    client.sendall(b"quick\n")
                for client in others:
                    assert client.recv(100) == b"QUICK\n"
            finally:
                for client in others:
                    client.close()
            slow.sendall(b"done\n")
            assert slow.recv(100) == b"waiting\ndone\n"


def test_green_sleep_is_cooperative() -> None:
    entered = threading.Event()

    class Sleepy(netserve.StreamRequestHandler):
        def handle(self) -> None:
            line = self.rfile.readline()
            if line == b"sleep\n":
                entered.set()
                netserve.green_sleep(3600)  # ended by server_close(block_on_close=False)
            self.wfile.write(line.upper())

    class Server(netserve.GreenTCPServer):
        block_on_close = False

    server = Server(("127.0.0.1", 0), Sleepy)
    with Serving(server) as serving:
        sleeper = connect(serving.address)
        sleeper.sendall(b"sleep\n")
        assert entered.wait(10)
        with connect(serving.address) as other:
            other.sendall(b"awake\n")
            assert other.recv(100) == b"AWAKE\n"
    # server_close() ended the sleeping handler; its connection was shut down.
    with sleeper:
        assert recv_all(sleeper) == b""


def test_green_sleep_outside_a_hub_is_time_sleep() -> None:
    netserve.green_sleep(0)  # no hub on this thread: a plain sleep, no error


def test_cooperative_timeout_while_others_are_served() -> None:
    class Handler(netserve.StreamRequestHandler):
        timeout = 0.05

        def handle(self) -> None:
            try:
                self.wfile.write(self.rfile.readline().upper())
                self.rfile.readline()  # the client stays silent
            except TimeoutError:
                self.wfile.write(b"timed out\n")

    with Serving(netserve.GreenTCPServer(("127.0.0.1", 0), Handler)) as serving:
        clients = [connect(serving.address) for _ in range(10)]
        try:
            for client in clients:
                client.sendall(b"hi\n")
            for client in clients:
                assert recv_all(client) == b"HI\ntimed out\n"
        finally:
            for client in clients:
                client.close()


def test_thousands_of_connections_held_at_once() -> None:
    count = 2000

    class Server(netserve.GreenTCPServer):
        # Every client here is 127.0.0.1: past the default per-client limit.
        max_connections_per_client = None

    with Serving(Server(("127.0.0.1", 0), Echo)) as serving:
        clients = []
        try:
            for _ in range(count):
                clients.append(connect(serving.address))
            for i, client in enumerate(clients):
                client.sendall(b"c%d\n" % i)
            for i, client in enumerate(clients):
                assert client.recv(100) == b"C%d\n" % i
            stats = serving.server.statistics()
            # Every one alive at the same time, each in its handler.
            assert (stats.active, stats.parked) == (count, 0)
            with pytest.deprecated_call():
                assert serving.server.green_statistics()["handlers"] == count
        finally:
            for client in clients:
                client.close()


def test_datagrams_under_the_hub(unix_path: str) -> None:
    class Upper(netserve.DatagramRequestHandler):
        def handle(self) -> None:
            assert isinstance(self.socket, netserve.GreenSocket)
            self.wfile.write(self.rfile.read().upper())

    with Serving(netserve.GreenUnixDatagramServer(unix_path, Upper)):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
            client.settimeout(10)
            client.bind(unix_path + ".c")
            for i in range(20):
                client.sendto(b"d%d" % i, unix_path)
            assert sorted(client.recv(100) for _ in range(20)) == sorted(
                b"D%d" % i for i in range(20)
            )


def test_block_on_close_false_ends_handlers_and_runs_finish() -> None:
    finished = threading.Event()
    started = threading.Event()

    class Handler(netserve.StreamRequestHandler):
        def handle(self) -> None:
            started.set()
            self.rfile.readline()
            self.rfile.readline()  # never comes

        def finish(self) -> None:
            finished.set()
            super().finish()

    class Server(netserve.GreenTCPServer):
        block_on_close = False

    with Serving(Server(("127.0.0.1", 0), Handler)) as serving:
        client = connect(serving.address)
        client.sendall(b"one line\n")
        assert started.wait(10)
    assert finished.is_set()
    assert recv_all(client) == b""
    client.close()


def test_handle_request_runs_the_handler_on_the_hub() -> None:
    with netserve.GreenTCPServer(("127.0.0.1", 0), Echo) as server:
        with connect(server.server_address) as client:
            client.sendall(b"one shot\n")
            client.shutdown(socket.SHUT_WR)
            server.handle_request()
            assert recv_all(client) == b"ONE SHOT\n"


def test_park_timeout_closes_silent_connections() -> None:
    class Impatient(netserve.GreenTCPServer):
        park_timeout = 0.05

    server = Impatient(("127.0.0.1", 0), Echo)
    with Serving(server) as serving, connect(serving.address) as silent:
        assert recv_all(silent) == b""
        stats = server.statistics()
        assert (stats.timeouts, stats.active, stats.handled) == (1, 0, 0)


def test_handler_system_exit_is_reported_and_the_hub_carries_on(
    excepthook_calls: list[type[BaseException]], caplog: pytest.LogCaptureFixture
) -> None:
    class Handler(netserve.StreamRequestHandler):
        def handle(self) -> None:
            if self.rfile.readline() == b"exit\n":
                raise SystemExit
            self.wfile.write(b"alive\n")

    server = netserve.GreenTCPServer(("127.0.0.1", 0), Handler)
    with caplog.at_level(logging.WARNING, logger="netserve"), Serving(server) as serving:
        with connect(serving.address) as client:
            client.sendall(b"exit\n")
            assert recv_all(client) == b""
        with connect(serving.address) as client:
            client.sendall(b"again\n")
            assert client.recv(100) == b"alive\n"
    assert excepthook_calls == [SystemExit]
    assert server.statistics().errors == 1
    # (The stall watchdog logs through netserve.hub too, should a loaded
    # machine hold a pass past its threshold: only the escape is counted here.)
    warnings = [
        r for r in caplog.records if r.name == "netserve.hub" and "raised" in r.getMessage()
    ]
    assert [r.levelno for r in warnings] == [logging.WARNING]


def test_new_models_have_a_production_backlog() -> None:
    assert netserve.GreenTCPServer.request_queue_size == socket.SOMAXCONN
    assert netserve.ThreadPoolTCPServer.request_queue_size == socket.SOMAXCONN
    assert netserve.TCPServer.request_queue_size in (5, socket.SOMAXCONN)  # the stdlib's


def test_the_idle_hub_waits_without_a_timeout() -> None:
    # No busy loop: with no timers and nothing ready the hub blocks in epoll
    # with no timeout at all, and its thread ends when it has nothing to do.
    server = netserve.GreenTCPServer(("127.0.0.1", 0), Echo)
    hub = server._green_hub  # type: ignore[attr-defined]
    with Serving(server, close=False) as serving:
        with connect(serving.address) as client:
            client.sendall(b"x\n")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"X\n"
        assert hub.run_sync(hub._next_timeout) == -1.0
    thread = hub.thread
    server.server_close()
    assert thread is None or not thread.is_alive()


def test_missing_greenlet_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['greenlet'] = None\n"
        "import netserve\n"
        "try:\n"
        "    netserve.GreenTCPServer(('127.0.0.1', 0), netserve.StreamRequestHandler)\n"
        "except netserve.MissingExtraError as exc:\n"
        "    print(exc)\n"
        "    assert isinstance(exc, ImportError)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    assert "netserve[green]" in result.stdout
    assert "greenlet" in result.stdout


def test_server_close_while_serving_leaves_nothing_watched() -> None:
    server = netserve.GreenTCPServer(("127.0.0.1", 0), Echo)
    hub = server._green_hub  # type: ignore[attr-defined]
    listener_fd = server.fileno()
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    with connect(server.server_address) as client:
        client.sendall(b"x\n")
        assert client.recv(10) == b"X\n"
        server.socket.close()  # closed under the running loop
        watched = hub.run_sync(lambda: set(hub._special))
        assert listener_fd in watched
        server.shutdown()
        thread.join()
        assert listener_fd not in hub.run_sync(lambda: set(hub._special))
    server.server_close()


def _greenlets_of_sequential_requests(server_class: type[Any], count: int) -> list[Any]:
    """Serve ``count`` connections one after another.

    Returns, per request, its handler's greenlet and whether the previous
    request's greenlet had ended by the time this one started.
    """
    import greenlet

    seen: list[tuple[Any, bool | None]] = []
    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="fresh")

    class Recorder(netserve.StreamRequestHandler):
        def handle(self) -> None:
            previous_ended = seen[-1][0].dead if seen else None
            seen.append((greenlet.getcurrent(), previous_ended))
            # Each request starts in an empty context, even in a reused greenlet.
            self.wfile.write(marker.get().encode() + b"\n")
            marker.set("left over")

    with Serving(server_class(("127.0.0.1", 0), Recorder)) as serving:
        for _ in range(count):
            with connect(serving.address) as client:
                client.sendall(b"go\n")
                assert recv_all(client) == b"fresh\n"
    return seen


def test_finished_greenlets_are_reused_and_end_with_the_hub() -> None:
    seen = _greenlets_of_sequential_requests(netserve.GreenTCPServer, 5)
    # The hub does everything from a handler's shutdown_request() to putting
    # its greenlet back without switching, so each next connection (accepted
    # after the client saw the previous one close) finds that greenlet spare.
    first = seen[0][0]
    assert [g is first for g, _ in seen] == [True] * 5
    assert [ended for _, ended in seen] == [None, False, False, False, False]
    # server_close() ended the hub's thread, and its spares with it.
    assert first.dead


def test_no_spares_means_a_fresh_greenlet_per_request() -> None:
    class Server(netserve.GreenTCPServer):
        spare_greenlets = 0

    seen = _greenlets_of_sequential_requests(Server, 3)
    assert [ended for _, ended in seen] == [None, True, True]


def test_overridden_accepting_hooks_are_called_on_the_hub() -> None:
    # Without overrides the hub accepts through an inlined path; with any of
    # these hooks overridden it must go through them.
    calls: list[str] = []

    class Picky(netserve.GreenTCPServer):
        def get_request(self) -> Any:
            accepted = super().get_request()  # (an empty backlog raises)
            calls.append("get_request")
            return accepted

        def verify_request(self, request: Any, client_address: Any) -> bool:
            calls.append("verify_request")
            return len(calls) > 2  # refuses the first connection

    with Serving(Picky(("127.0.0.1", 0), Echo)) as serving:
        with connect(serving.address) as refused:
            assert recv_all(refused) == b""
        with connect(serving.address) as accepted:
            accepted.sendall(b"hello\n")
            accepted.shutdown(socket.SHUT_WR)
            assert recv_all(accepted) == b"HELLO\n"
    assert calls == ["get_request", "verify_request"] * 2


def test_wfile_writes_everything_it_is_given() -> None:
    # wfile (wbufsize 0) over a GreenSocket sends bytes straight to the system
    # call; a reply larger than the socket buffers takes many partial sends.
    big = bytes(range(256)) * 4096  # 1 MiB
    outcome: dict[str, Any] = {}

    class Writer(netserve.StreamRequestHandler):
        def handle(self) -> None:
            self.rfile.readline()
            # Small buffers: the first send() cannot take it all.
            self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
            outcome["counts"] = [
                self.wfile.write(big),
                self.wfile.write(bytearray(b"array;")),
                self.wfile.write(memoryview(b"..view;")[2:]),
            ]

        def finish(self) -> None:
            super().finish()
            try:
                self.wfile.write(b"too late")
            except ValueError as exc:
                outcome["closed"] = str(exc)

    with Serving(netserve.GreenTCPServer(("127.0.0.1", 0), Writer)) as serving:
        with connect(serving.address) as client:
            client.sendall(b"go\n")
            assert recv_all(client) == big + b"array;view;"
    assert outcome == {"counts": [len(big), 6, 5], "closed": "write to closed file"}


def _release_a_deadlocked_shutdown(server: Any) -> None:
    """Cleanup for a failed run only: end a shutdown() stuck on the hub's thread.

    shutdown() from a handler waits for the loop to leave, and the loop waits
    for the hub's thread, which is the handler's own. Moving the loop's
    generation on lets that shutdown() return, so the handler, then the loop,
    can finish and the test fails instead of leaving both threads stuck. Does
    nothing where the loop's internals are not the ones this knows.
    """
    stop = getattr(server, "_netserve_stop", None)
    changed = getattr(stop, "_changed", None)
    if changed is None or not hasattr(stop, "_generation"):
        return
    with changed:
        stop._generation += 1  # type: ignore[union-attr]
        changed.notify_all()


def test_a_handler_may_call_shutdown() -> None:
    class Stopping(netserve.StreamRequestHandler):
        def handle(self) -> None:
            line = self.rfile.readline()
            self.server.shutdown()
            self.wfile.write(line.upper())

    class Server(netserve.GreenTCPServer):
        # A deadlocked hub must not keep the test process from exiting.
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Stopping)
    loop = threading.Thread(target=server.serve_forever, daemon=True)
    loop.start()
    closer = threading.Thread(target=server.server_close, daemon=True)
    try:
        with connect(server.server_address) as client:
            try:
                client.sendall(b"stop\n")
                loop.join(10)
                assert not loop.is_alive(), "serve_forever() did not return: shutdown() deadlocked"
                assert recv_all(client) == b"STOP\n"  # the handler carried on after shutdown()
            finally:
                if loop.is_alive():
                    _release_a_deadlocked_shutdown(server)
                    loop.join(10)
        closer.start()
        closer.join(10)
        assert not closer.is_alive(), "server_close() did not return"
    finally:
        # After a failure above: close here, unless the loop could not be freed
        # (closing would then wait on the stuck hub too).
        if closer.ident is None and not loop.is_alive():
            server.server_close()

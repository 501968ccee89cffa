"""serve_forever() and shutdown(): prompt, never deadlocking, restartable."""

from __future__ import annotations

import signal
import threading
from typing import Any

import pytest

import netserve
from tests.conftest import Serving, connect, recv_all


class Echo(netserve.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.readline())


class ReadyServer(netserve.TCPServer):
    """Sets ``looping`` from service_actions: the loop is demonstrably running."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.looping = threading.Event()
        self.passes = 0
        super().__init__(*args, **kwargs)

    def service_actions(self) -> None:
        self.passes += 1
        self.looping.set()


def test_shutdown_does_not_wait_for_poll_interval() -> None:
    # With an hour-long poll interval a polling shutdown would hang past the
    # test's timeout; waking the loop makes it return at once.
    server = ReadyServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, args=(3600,))
    thread.start()
    try:
        with connect(server.server_address) as client:  # one pass, so the loop runs
            client.sendall(b"x\n")
            assert recv_all(client) == b"x\n"
        assert server.looping.wait(10)
        server.shutdown()
        thread.join(10)
        assert not thread.is_alive()
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def test_shutdown_from_a_handler_on_the_serving_thread() -> None:
    class Stopper(netserve.BaseRequestHandler):
        def handle(self) -> None:
            self.server.shutdown()  # the stdlib deadlocks here
            self.request.sendall(b"stopping")

    with netserve.TCPServer(("127.0.0.1", 0), Stopper) as server:
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        with connect(server.server_address) as client:
            assert recv_all(client) == b"stopping"
        thread.join(10)
        assert not thread.is_alive()


def test_shutdown_when_not_serving_returns_and_next_loop_exits_at_once() -> None:
    with netserve.TCPServer(("127.0.0.1", 0), Echo) as server:
        server.shutdown()  # nothing to wait for: must not block
        server.serve_forever()  # returns at once: the request is pending
        # The request was consumed: a new loop serves until asked again.
        with Serving(server, close=False) as serving, connect(serving.address) as client:
            client.sendall(b"again\n")
            assert recv_all(client) == b"again\n"


def test_serve_forever_can_run_again_after_shutdown() -> None:
    with netserve.TCPServer(("127.0.0.1", 0), Echo) as server:
        for round_ in range(3):
            with Serving(server, close=False) as serving, connect(serving.address) as client:
                client.sendall(b"%d\n" % round_)
                assert recv_all(client) == b"%d\n" % round_


def test_shutdown_from_a_signal_handler_on_the_serving_thread() -> None:
    server = ReadyServer(("127.0.0.1", 0), Echo)
    main = threading.get_ident()

    def on_signal(signum: int, frame: object) -> None:
        server.shutdown()

    def send_signal_when_looping() -> None:
        server.looping.wait(10)
        signal.pthread_kill(main, signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, on_signal)
    sender = threading.Thread(target=send_signal_when_looping)
    try:
        sender.start()
        server.serve_forever(poll_interval=0.01)  # returns because of the signal
    finally:
        signal.signal(signal.SIGUSR1, previous)
        sender.join()
        server.server_close()
    assert server.looping.is_set()


def test_a_second_concurrent_serve_forever_is_refused() -> None:
    server = ReadyServer(("127.0.0.1", 0), Echo)
    with Serving(server, poll_interval=0.01):
        assert server.looping.wait(10)
        with pytest.raises(RuntimeError, match="already running"):
            server.serve_forever()


def test_service_actions_runs_on_every_pass() -> None:
    server = ReadyServer(("127.0.0.1", 0), Echo)
    with Serving(server, poll_interval=3600):
        for i in range(3):
            with connect(server.server_address) as client:
                client.sendall(b"%d\n" % i)
                assert recv_all(client) == b"%d\n" % i
    assert server.passes >= 3


def test_base_exception_propagates_out_of_serve_forever_and_loop_can_restart() -> None:
    class Interrupting(netserve.BaseRequestHandler):
        def handle(self) -> None:
            raise KeyboardInterrupt

    with netserve.TCPServer(("127.0.0.1", 0), Interrupting) as server:
        errors: list[BaseException] = []

        def serve() -> None:
            try:
                server.serve_forever()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=serve)
        thread.start()
        with connect(server.server_address) as client:
            assert recv_all(client) == b""
        thread.join(10)
        assert not thread.is_alive()
        assert len(errors) == 1
        assert isinstance(errors[0], KeyboardInterrupt)
        # The loop state was reset: shutdown() does not wait for a dead loop.
        server.shutdown()


@pytest.mark.parametrize("count", [20])
def test_many_servers_shut_down_promptly(count: int) -> None:
    servers = [netserve.TCPServer(("127.0.0.1", 0), Echo) for _ in range(count)]
    threads = [threading.Thread(target=s.serve_forever, args=(3600,)) for s in servers]
    for thread, server in zip(threads, servers, strict=True):
        thread.start()
        server.shutdown()
    for thread, server in zip(threads, servers, strict=True):
        thread.join(10)
        assert not thread.is_alive()
        server.server_close()

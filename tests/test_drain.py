"""drain(): stop accepting, serve what was accepted, end the rest at a deadline
(issue 12, section 3), on every model; and the fast stop on Ctrl-C."""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest

import netserve
from tests.conftest import LogEvent, Serving, connect, recv_all
from tests.models import MODELS, PARKING

STREAM_MODELS = list(MODELS)


class Gated(netserve.StreamRequestHandler):
    """Answers a line once the client sends a second one (a gate that works
    across processes too)."""

    def handle(self) -> None:
        line = self.rfile.readline()
        self.server.started.set()
        self.rfile.readline()
        self.wfile.write(line.upper())


def gated_server(model: str, handler: type = Gated, **attributes: Any) -> Any:
    cls = type("Drained", (MODELS[model].tcp,), attributes)
    server = cls(("127.0.0.1", 0), handler)
    server.started = threading.Event()
    return server


class Drainer(threading.Thread):
    """Runs drain(timeout) on a thread; ``result`` is what it returned."""

    def __init__(self, server: Any, timeout: float) -> None:
        super().__init__()
        self.server = server
        self.timeout = timeout
        self.result: bool | None = None

    def run(self) -> None:
        self.result = self.server.drain(self.timeout)


@pytest.mark.parametrize("model", STREAM_MODELS)
def test_drain_serves_the_request_in_progress_and_accepts_no_more(model: str) -> None:
    server = gated_server(model)
    if model == "forking":
        fork = server.process_request

        def process_request(request: Any, client_address: Any) -> None:
            fork(request, client_address)
            server.started.set()

        server.process_request = process_request
    stopped = LogEvent("netserve.drain", "accepting stopped")
    with stopped, Serving(server, close=False), connect(server.server_address) as busy:
        busy.sendall(b"busy\n")
        # Forking: the handler's flag is set in the child; the parent's
        # process_request() (wrapped below) says it has forked.
        assert server.started.wait(10)
        drainer = Drainer(server, 10)
        drainer.start()
        assert server.wait_for_drain(10)
        if model != "sync":  # its loop looks once the request it runs is done
            assert stopped.event.wait(10)
            assert stopped.messages == ["drain: accepting stopped; 1 connections open"]
        with connect(server.server_address) as late:  # waits in the backlog
            late.sendall(b"late\n")
            busy.sendall(b"go\n")
            busy.shutdown(socket.SHUT_WR)
            assert recv_all(busy) == b"BUSY\n"
            drainer.join()
            assert drainer.result is True
            assert stopped.event.is_set()
            # The drained server closed its listener: the late one is never served.
            try:
                assert recv_all(late) == b""
            except ConnectionResetError:
                pass
    stats = server.statistics()
    assert (stats.accepted, stats.handled, stats.active) == (1, 1, 0)
    assert server.draining
    server.server_close()


@pytest.mark.parametrize("model", PARKING)
def test_a_parked_connection_is_served_when_it_speaks_during_the_drain(model: str) -> None:
    server = gated_server(model)
    with Serving(server, close=False), connect(server.server_address) as parked:
        with connect(server.server_address) as first:  # accepted: the parked one was too
            first.sendall(b"first\ngo\n")
            assert first.recv(10) == b"FIRST\n"
        drainer = Drainer(server, 10)
        drainer.start()
        assert server.wait_for_drain(10)
        parked.sendall(b"parked\ngo\n")
        assert recv_all(parked) == b"PARKED\n"
        drainer.join()
    assert drainer.result is True
    assert server.statistics().handled == 2
    server.server_close()


class Idle(netserve.StreamRequestHandler):
    """A conversation that never ends by itself."""

    def handle(self) -> None:
        self.server.started.set()
        for line in self.rfile:
            self.wfile.write(line.upper())


@pytest.mark.parametrize("model", STREAM_MODELS)
def test_at_the_deadline_drain_ends_what_is_left_and_says_so(model: str) -> None:
    server = gated_server(model, Idle, idle_timeout=None)
    with Serving(server, close=False), connect(server.server_address) as client:
        client.sendall(b"x\n")
        assert client.recv(10) == b"X\n"
        assert server.drain(0.3) is False
        # Ended the model's way: the connection is shut (or its process ended).
        assert recv_all(client) == b""
    assert server.wait_closed(10)
    server.server_close()


class Polite(netserve.StreamRequestHandler):
    """Ends at its protocol's boundary once the server drains."""

    def handle(self) -> None:
        for line in self.rfile:
            if self.server.draining:
                self.wfile.write(b"bye\n")
                return
            self.wfile.write(line.upper())


@pytest.mark.parametrize("model", ["threading", "pool", "hub", "sync"])
def test_a_handler_sees_the_drain_and_ends_at_its_boundary(model: str) -> None:
    server = gated_server(model, Polite, idle_timeout=None)
    with Serving(server, close=False), connect(server.server_address) as client:
        client.sendall(b"a\n")
        assert client.recv(10) == b"A\n"
        drainer = Drainer(server, 10)
        drainer.start()
        assert server.wait_for_drain(10)
        client.sendall(b"b\n")
        assert recv_all(client) == b"bye\n"
        drainer.join()
    assert drainer.result is True
    server.server_close()


@pytest.mark.parametrize("model", ["pool", "hub"])
def test_ctrl_c_out_of_a_with_block_is_a_fast_bounded_stop(model: str) -> None:
    server = gated_server(model, Idle, idle_timeout=None)
    interrupted = threading.Event()

    def serve() -> None:
        try:
            with server:
                server.serve_forever()
        except KeyboardInterrupt:
            interrupted.set()

    # serve_forever() on a thread; the "Ctrl-C" is a KeyboardInterrupt raised
    # from service_actions() on that thread once a client is being served.
    def service_actions() -> None:
        if server.started.is_set() and server.stop_now:
            server.stop_now = False
            raise KeyboardInterrupt

    server.stop_now = True
    server.service_actions = service_actions
    thread = threading.Thread(target=serve)
    thread.start()
    with connect(server.server_address) as client:
        client.sendall(b"x\n")
        assert client.recv(10) == b"X\n"
        thread.join(10)
        assert interrupted.is_set()
        assert recv_all(client) == b""  # ended, not waited for
    assert server.statistics().active == 0

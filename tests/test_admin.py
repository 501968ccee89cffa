"""The admin endpoint (health and metrics over HTTP) on a selector loop (_admin)."""

from __future__ import annotations

import errno
import http.client
import os
import selectors
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import netserve
from netserve._serving import _admin
from netserve._serving._admin import AdminEndpoint, text
from netserve._serving._figures import SupervisorStatistics
from netserve._serving._metrics import metrics_route
from tests.conftest import Serving, connect, recv_all


@contextmanager
def endpoint(routes: dict[str, Any]) -> Iterator[tuple[str, int]]:
    """An endpoint served by a loop on a thread of its own."""
    listener = socket.create_server(("127.0.0.1", 0))
    admin = AdminEndpoint(listener, routes)
    stop_r, stop_w = os.pipe()
    thread = threading.Thread(target=admin.serve_until, args=(stop_r,))
    thread.start()
    try:
        yield listener.getsockname()
    finally:
        os.write(stop_w, b"x")
        thread.join(10)
        listener.close()
        os.close(stop_r)
        os.close(stop_w)


def get(address: tuple[str, int], path: str, method: str = "GET") -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        conn.close()


ROUTES = {
    "/readyz": lambda: text(200, "ready\n"),
    "/broken": lambda: 1 / 0,
}


def test_routes_methods_and_errors() -> None:
    with endpoint(ROUTES) as address:
        assert get(address, "/readyz") == (200, "text/plain; charset=utf-8", b"ready\n")
        assert get(address, "/readyz?verbose=1")[0] == 200
        assert get(address, "/readyz", "HEAD") == (200, "text/plain; charset=utf-8", b"")
        assert get(address, "/missing")[0] == 404
        assert get(address, "/readyz", "POST")[0] == 405
        assert get(address, "/broken") == (500, "text/plain; charset=utf-8", b"internal error\n")
        with connect(address) as client:
            client.sendall(b"nonsense\r\n\r\n")
            assert recv_all(client).startswith(b"HTTP/1.1 400 ")
        with connect(address) as client:
            client.sendall(b"GET /" + b"x" * _admin.MAX_REQUEST)
            assert recv_all(client).startswith(b"HTTP/1.1 431 ")


def test_a_silent_client_holds_nobody_up_and_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_admin, "TIMEOUT", 0.3)
    with endpoint(ROUTES) as address, connect(address) as silent:
        silent.sendall(b"GET /readyz HTTP/1.1\r\n")  # and never the blank line
        assert get(address, "/readyz")[0] == 200  # answered meanwhile
        assert recv_all(silent) == b""  # closed once its time was up


def test_idle_clients_cannot_lock_the_health_checks_out(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every place taken by clients that send nothing: a new client takes the
    # place of the one that has waited longest, and is answered.
    monkeypatch.setattr(_admin, "MAX_CLIENTS", 2)
    with endpoint(ROUTES) as address:
        idle = [connect(address) for _ in range(2)]
        try:
            idle[0].sendall(b"GET")  # accepted, and waiting for the rest
            idle[1].sendall(b"GET")
            assert get(address, "/readyz")[0] == 200
            assert recv_all(idle[0]) == b""  # its place went to the health check
            idle[1].sendall(b" /readyz HTTP/1.0\r\n\r\n")
            assert recv_all(idle[1]).startswith(b"HTTP/1.1 200 ")
        finally:
            for client in idle:
                client.close()


def test_a_client_whose_place_was_taken_in_the_same_pass_is_left_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One pass of the loop may hold both a new connection and bytes from the
    # idle client whose place that connection takes: the second event then
    # finds its client closed, and must not read from it (it raised EBADF, then
    # ValueError out of the endpoint's loop, killing it).
    monkeypatch.setattr(_admin, "MAX_CLIENTS", 1)
    listener = socket.create_server(("127.0.0.1", 0))
    admin = AdminEndpoint(listener, ROUTES)
    address = listener.getsockname()
    with selectors.DefaultSelector() as selector, connect(address) as idle:
        admin.attach(selector)
        try:
            for key, _ in selector.select(5):  # the idle client's accept
                key.data(selector, key)
            with connect(address) as newcomer:
                idle.sendall(b"GET")
                ready: list[Any] = []
                for _ in range(50):  # both events, in one pass (level-triggered)
                    ready = selector.select(5)
                    if len(ready) == 2:
                        break
                assert len(ready) == 2, "the two events never came together"
                # The listener first: its accept closes the idle client.
                ready.sort(key=lambda event: event[0].fileobj is not listener)
                for key, _ in ready:
                    key.data(selector, key)
                assert recv_all(idle) == b""
                newcomer.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
                for key, _ in selector.select(5):
                    key.data(selector, key)
                assert recv_all(newcomer).startswith(b"HTTP/1.1 200 ")
        finally:
            admin.detach(selector)
            listener.close()


def test_accept_failures_back_off_instead_of_spinning(monkeypatch: pytest.MonkeyPatch) -> None:
    # Out of descriptors, the listener stays readable: the endpoint stops
    # watching it for a while (10 ms, doubling), then serves again once
    # accept() works. A loop that retried at once would try thousands of times.
    failing = threading.Event()
    failing.set()
    tries: list[float] = []
    real_accept = socket.socket.accept

    def accept(self: socket.socket) -> Any:
        if self.gettimeout() == 0.0 and failing.is_set():  # the endpoint's listener
            tries.append(time.monotonic())
            raise OSError(errno.EMFILE, "Too many open files")
        return real_accept(self)

    monkeypatch.setattr(socket.socket, "accept", accept)
    with endpoint(ROUTES) as address, connect(address) as waiting:
        threading.Event().wait(0.5)  # a measuring window, not a readiness wait
        assert 2 <= len(tries) < 20, len(tries)
        failing.clear()
        waiting.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
        assert recv_all(waiting).startswith(b"HTTP/1.1 200 ")


def test_metrics_render_every_figure() -> None:
    stats = SupervisorStatistics(
        accepted=7, handled=5, timeouts=2, timeouts_by_kind={"idle_timeout": 2}, workers=3
    )
    status, content_type, body = metrics_route(lambda: stats)()
    assert status == 200
    assert content_type.startswith("text/plain; version=")
    lines = body.decode().splitlines()
    for sample in (
        "netserve_connections_accepted_total 7.0",
        "netserve_requests_handled_total 5.0",
        'netserve_timeouts_total{kind="idle_timeout"} 2.0',
        'netserve_timeouts_total{kind="write_timeout"} 0.0',
        "netserve_workers 3.0",
        "netserve_draining 0.0",
        "netserve_pool_busy_threads 0.0",
        "netserve_hub_greenlets 0.0",
        "netserve_worker_restarts_total 0.0",
    ):
        assert sample in lines


def test_metrics_without_the_extra_answer_501_with_a_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails
    status, _, body = metrics_route(SupervisorStatistics)()
    assert status == 501
    assert body.decode() == (
        "metrics need the prometheus-client package: pip install 'netserve[metrics]'\n"
    )


class DrainAware(netserve.StreamRequestHandler):
    """Echoes a line; then, once the server drains, says so and ends."""

    def handle(self) -> None:
        self.wfile.write(self.rfile.readline())
        self.wfile.flush()
        assert self.server.wait_for_drain(10)
        self.wfile.write(b"draining\n")


@pytest.mark.parametrize("model", ["threading", "pool"])
def test_serve_admin_for_servers_run_without_the_supervisor(model: str) -> None:
    server_class = {"threading": netserve.ThreadingTCPServer, "pool": netserve.ThreadPoolTCPServer}
    server = server_class[model](("127.0.0.1", 0), DrainAware)
    with netserve.serve_admin(server) as admin:
        assert admin.address[0] == "127.0.0.1"
        assert get(admin.address, "/readyz")[0] == 503  # not serving yet
        with Serving(server, close=False) as serving, connect(serving.address) as client:
            client.sendall(b"hello\n")
            assert client.recv(100) == b"hello\n"  # the loop runs
            assert get(admin.address, "/livez")[:2] == (200, "text/plain; charset=utf-8")
            assert get(admin.address, "/readyz")[2] == b"ready\n"
            metrics = get(admin.address, "/metrics")[2].decode().splitlines()
            assert "netserve_connections_active 1.0" in metrics
            assert "netserve_workers 1.0" in metrics
            drained = threading.Thread(target=server.drain, args=(10,))
            drained.start()
            try:
                # The handler saw the drain: readiness is 503 while it still serves.
                assert client.recv(100) == b"draining\n"
                assert get(admin.address, "/readyz")[2] == b"draining\n"
            finally:
                drained.join(20)
        assert get(admin.address, "/livez")[0] == 503  # serve_forever() returned
        metrics = get(admin.address, "/metrics")[2].decode().splitlines()
        assert "netserve_requests_handled_total 1.0" in metrics
        assert "netserve_draining 1.0" in metrics
    server.server_close()

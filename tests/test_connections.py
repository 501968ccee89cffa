"""The connection table: one statistics type, the same counts under every model."""

from __future__ import annotations

import dataclasses
import logging
import socket
import subprocess
import sys
from typing import Any

import pytest

import netserve
from netserve._core._connections import HANDLED, ConnectionTable
from netserve._core._log import RateLimitedLog
from tests.conftest import Serving, connect, recv_all
from tests.models import MODELS


class Upper(netserve.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline()
        if line == b"fail\n":
            raise ValueError("asked to fail")
        self.wfile.write(line.upper())


class DatagramUpper(netserve.DatagramRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.read().upper())


def counting(server_class: type) -> type:
    """Refuses the fourth connection; handle_error stays quiet."""

    class Counting(server_class):  # type: ignore[misc, valid-type]
        seen = 0

        def verify_request(self, request: Any, client_address: Any) -> bool:
            # On the accept path (the hub's thread, for the hub): no I/O here.
            self.seen += 1
            return self.seen != 4

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass

    return Counting


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_model_counts_the_same(model: str) -> None:
    server = counting(MODELS[model].tcp)(("127.0.0.1", 0), Upper)
    with Serving(server, close=False) as serving:
        for line in (b"one\n", b"two\n", b"fail\n", b"no\n"):
            with connect(serving.address) as client:
                client.sendall(line)
                try:
                    reply = recv_all(client)
                except ConnectionResetError:
                    reply = b""  # closed with the line unread: refused
                assert reply == (b"" if line in (b"fail\n", b"no\n") else line.upper())
    server.server_close()  # waits for threads, workers, greenlets and children
    stats = server.statistics()
    assert isinstance(stats, netserve.ServerStatistics)
    assert dataclasses.asdict(stats) | {"accepting": False} == dataclasses.asdict(stats)
    assert (stats.accepted, stats.refused, stats.handled, stats.errors) == (4, 1, 3, 1)
    assert (stats.active, stats.parked, stats.timeouts, stats.accept_errors) == (0, 0, 0, 0)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_datagrams_are_requests(model: str) -> None:
    server = MODELS[model].udp(("127.0.0.1", 0), DatagramUpper)
    with Serving(server, close=False) as serving:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(10)
            for data in (b"a", b"b", b"c"):
                client.sendto(data, serving.address)
                assert client.recv(100) == data.upper()
    server.server_close()
    stats = server.statistics()
    assert (stats.accepted, stats.handled, stats.errors, stats.active) == (3, 3, 0, 0)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_handle_request_without_a_loop_leaves_nothing_active(model: str) -> None:
    # The hub takes such requests on from another thread, as other objects (a
    # GreenSocket, a cooperative view of the datagram socket): they must still
    # be counted out.
    stream = MODELS[model].tcp(("127.0.0.1", 0), Upper)
    datagram = MODELS[model].udp(("127.0.0.1", 0), DatagramUpper)
    try:
        with connect(stream.server_address) as client:
            client.sendall(b"one\n")
            stream.handle_request()
            assert recv_all(client) == b"ONE\n"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(10)
            client.sendto(b"two", datagram.server_address)
            datagram.handle_request()
            assert client.recv(100) == b"TWO"
    finally:
        stream.server_close()
        datagram.server_close()
    for server in (stream, datagram):
        assert server.wait_closed(5), f"{type(server).__name__}: still active"
        stats = server.statistics()
        assert (stats.accepted, stats.handled, stats.active) == (1, 1, 0)


def test_statistics_say_whether_the_loop_accepts() -> None:
    server = netserve.ThreadingTCPServer(("127.0.0.1", 0), Upper)
    try:
        assert not server.statistics().accepting
        with Serving(server, close=False) as serving:
            with connect(serving.address) as client:
                client.sendall(b"x\n")
                assert client.recv(10) == b"X\n"
            assert server.statistics().accepting
        assert not server.statistics().accepting
    finally:
        server.server_close()


def test_pool_statistics_is_a_server_statistics() -> None:
    assert issubclass(netserve.PoolStatistics, netserve.ServerStatistics)
    with netserve.ThreadPoolTCPServer(("127.0.0.1", 0), Upper) as server:
        stats = server.statistics()
    assert isinstance(stats, netserve.PoolStatistics)
    fields = {field.name for field in dataclasses.fields(stats)}
    # The fields PoolStatistics had before it joined the common type.
    assert {
        "max_workers",
        "workers",
        "busy_workers",
        "queued",
        "parked",
        "handled",
        "errors",
        "park_timeouts",
        "accepting",
    } <= fields


def test_table_counts_from_many_threads_without_losing_any() -> None:
    import threading

    table = ConnectionTable()
    rounds = 20_000

    def work() -> None:
        for _ in range(rounds):
            request = object()
            table.accept(request)
            table.finish(request)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counters = table.counters()
    assert (counters["accepted"], counters["handled"], counters["active"]) == (
        4 * rounds,
        4 * rounds,
        0,
    )


def test_table_counts_accepted_as_every_exit_plus_the_active() -> None:
    table = ConnectionTable()
    handled, refused, timed_out, stage_failed, child = (object() for _ in range(5))
    for request in (handled, refused, timed_out, stage_failed, child):
        table.accept(request)
    table.finish(handled)
    table.refuse(refused)
    table.time_out(timed_out)
    table.stage_failed(stage_failed, timed_out=False)
    table.shed()
    table.detach(child)
    assert not table.wait_idle(0)  # the child still holds its connection
    assert table.counters() == {
        "accepted": 6,  # the shed one was accepted too
        "refused": 2,
        "handled": 1,
        "errors": 0,
        "timeouts": 1,
        "stage_failures": 1,
        "accept_errors": 0,
        "disconnects": 0,
        "lines_too_long": 0,
        "limited": 0,
        "active": 1,
        "timeouts_by_kind": {"park_timeout": 1},
    }
    table.finish_detached(HANDLED)
    assert table.wait_idle(0)
    counters = table.counters()
    assert (counters["accepted"], counters["handled"], counters["active"]) == (6, 2, 0)


def test_rate_limited_log_reports_a_count_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limited = RateLimitedLog(
        logging.getLogger("netserve.test"), logging.WARNING, interval=10, clock=lambda: now[0]
    )
    with caplog.at_level(logging.WARNING, logger="netserve.test"):
        for second in range(25):
            now[0] = float(second)
            limited.event("full")
            limited.event("full")
        # The condition ends and comes back four seconds after the last line:
        # counted with the rest, not logged (a condition that comes and goes
        # must not write a line each time it comes back).
        now[0] = 24.0
        limited.event("full")
        now[0] = 30.0
        limited.event("full")  # the report is due: the count so far
        now[0] = 41.0
        limited.event("full")  # nothing since the last line: said plainly
    assert [record.getMessage() for record in caplog.records] == [
        "full",
        "full (20 more in the last 10 s)",
        "full (20 more in the last 10 s)",
        "full (11 more in the last 10 s)",
        "full",
    ]


def test_drop_in_users_see_no_log_output() -> None:
    # Python's last-resort handler prints warnings of unconfigured loggers on
    # stderr; the package's NullHandler keeps a drop-in user's stderr as it was.
    code = (
        "import logging, netserve; "
        "logging.getLogger('netserve.accept').warning('should not be seen')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert result.stderr == ""

"""Workers' figures in shared memory, summed by their supervisor (_figures)."""

from __future__ import annotations

import dataclasses
import os
import select
import socket
import sys
import threading
from typing import Any

import pytest

import netserve
from netserve._core._connections import COUNTER_NAMES, ConnectionTable
from netserve._serving._figures import COUNTERS, GAUGES, Board, figures_of
from tests.conftest import Serving, connect, recv_all


def figures(**values: int) -> dict[str, int]:
    return {**dict.fromkeys(COUNTERS + GAUGES, 0), **values}


def test_a_slot_reads_nothing_before_its_first_write() -> None:
    board = Board(slots=4)
    try:
        index = board.take()
        assert index is not None
        assert board.totals() == figures()
    finally:
        board.close()


def test_counters_survive_their_worker_and_gauges_do_not() -> None:
    board = Board(slots=4)
    try:
        first, second = board.take(), board.take()
        assert first is not None
        assert second is not None
        board.writer(first).publish(figures(handled=5, active=2, **{"timeouts:idle_timeout": 1}), 1)
        board.writer(second).publish(figures(handled=7, active=3), 2)
        assert (board.totals()["handled"], board.totals()["active"]) == (12, 5)
        board.release(first)
        totals = board.totals()
        assert (totals["handled"], totals["active"], totals["timeouts:idle_timeout"]) == (12, 3, 1)
        # The freed slot is handed out again, zeroed: its old figures are not
        # counted twice.
        again = board.take()
        assert again == first
        assert board.totals()["handled"] == 12
    finally:
        board.close()


def test_slots_run_out_rather_than_overlap() -> None:
    board = Board(slots=2)
    try:
        assert [board.take(), board.take(), board.take()] == [0, 1, None]
    finally:
        board.close()


def test_a_forked_worker_writes_what_the_supervisor_reads() -> None:
    board = Board(slots=4)
    index = board.take()
    assert index is not None
    written, done = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        status = 1
        try:
            os.close(written)
            writer = board.writer(index)
            for handled in range(1, 20_001):  # many writes: a reader never sees half of one
                writer.publish(figures(handled=handled, accepted=handled), os.getpid())
            status = 0
        finally:
            os.close(done)
            os._exit(status)
    os.close(done)
    try:
        # Read while it writes (bounded): every read is one whole write.
        reads = 0
        for reads in range(1, 1_000_000):  # noqa: B007
            totals = board.totals()
            assert totals["handled"] == totals["accepted"]
            if select.select([written], [], [], 0)[0]:
                break  # end of file: the worker is done
    finally:
        os.close(written)
        _, status = os.waitpid(pid, 0)
    assert reads > 1
    assert os.waitstatus_to_exitcode(status) == 0
    assert board.totals()["handled"] == 20_000
    board.release(index)
    assert board.totals()["handled"] == 20_000
    board.close()


class Echo(netserve.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


@pytest.mark.parametrize(
    ("server_class", "gauge"),
    [(netserve.ThreadPoolTCPServer, "threads"), (netserve.GreenTCPServer, "greenlets")],
)
def test_figures_of_a_worker_sum_its_servers(server_class: Any, gauge: str) -> None:
    servers = [server_class(("127.0.0.1", 0), Echo) for _ in range(2)]
    with Serving(servers[0]) as one, Serving(servers[1]) as two:
        clients = [connect(one.address), connect(two.address)]
        try:
            for client in clients:
                client.sendall(b"x\n")
                assert client.recv(10) == b"x\n"
            during = figures_of(servers)
            assert (during["active"], during[gauge]) == (2, 2)
        finally:
            for client in clients:
                client.shutdown(socket.SHUT_WR)
                assert recv_all(client) == b""
                client.close()
        for server in servers:
            assert server.wait_closed(5)
    after = figures_of([*servers, object()])  # a server without statistics() counts nothing
    assert (after["handled"], after["accepted"], after["active"]) == (2, 2, 0)
    for server in servers:
        server.server_close()


def test_the_hub_reports_its_greenlets() -> None:
    entered, release = threading.Event(), threading.Event()

    class Held(netserve.BaseRequestHandler):
        def handle(self) -> None:
            self.request.recv(1)
            entered.set()
            while not release.is_set():
                netserve.green_sleep(0.01)

    server = netserve.GreenTCPServer(("127.0.0.1", 0), Held)
    with Serving(server) as serving, connect(serving.address) as client:
        try:
            client.sendall(b"x")
            assert entered.wait(5)
            assert server.statistics().greenlets == 1
        finally:
            release.set()
        assert recv_all(client) == b""
    assert server.statistics().greenlets == 0
    server.server_close()


def test_a_write_under_way_reads_as_the_last_figures_never_as_none() -> None:
    # A scrape that meets a write in progress (or a writer killed in the middle
    # of one) must not see the worker's counters vanish: counters never go back.
    board = Board(slots=2)
    try:
        index = board.take()
        assert index is not None
        board.writer(index).publish(figures(handled=5), 1)
        assert board.totals()["handled"] == 5
        # The writer's next write begins (odd sequence number) and never ends.
        board._block[0:8] = (7).to_bytes(8, sys.byteorder)
        assert board.totals()["handled"] == 5
        board.release(index)
        assert board.totals()["handled"] == 5
    finally:
        board.close()


def test_the_counters_are_the_statistics_fields_that_only_grow() -> None:
    server_fields = {f.name for f in dataclasses.fields(netserve.ServerStatistics)}
    supervisor_fields = {f.name for f in dataclasses.fields(netserve.SupervisorStatistics)}
    assert set(COUNTER_NAMES) <= server_fields & supervisor_fields
    table_counters = set(ConnectionTable().counters())
    assert table_counters == {*COUNTER_NAMES, "active", "timeouts_by_kind"}

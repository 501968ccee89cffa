"""Limits and time-outs on the thread models (issue 11): sync, threading, forking, pool.

Each server records what its handler saw (``seen``) and what reached
``handle_error()`` (``reported``); the client side reads until the server has
counted the request (it counts before it closes). Time-outs are short (0.2 to
0.5 s) so that each test takes about a second. The hub's are in
test_hub_limits.py, the per-model fault table with figures in test_abuse.py.
"""

from __future__ import annotations

import logging
import socket
import struct
import sys
import threading
import time
from typing import Any

import pytest

import netserve
from netserve._core._limits import TimedSocket
from tests.conftest import LogEvent, Serving, connect, recv_all

THREADED = ["threading", "pool"]
CLASSES = {
    "sync": netserve.TCPServer,
    "threading": netserve.ThreadingTCPServer,
    "pool": netserve.ThreadPoolTCPServer,
    "forking": netserve.ForkingTCPServer,
}


def make_server(model: str, handler: type, **attributes: Any) -> Any:
    """A server of ``model`` on loopback that records handle_error() calls."""

    def handle_error(self: Any, request: Any, client_address: Any) -> None:
        self.reported.append(sys.exc_info()[0])

    cls = type(
        f"Limited{model.title()}",
        (CLASSES[model],),
        {"handle_error": handle_error, **attributes},
    )
    server = cls(("127.0.0.1", 0), handler)
    server.reported = []
    server.seen = []
    return server


class EchoThenWait(netserve.StreamRequestHandler):
    """Answers each line; records the exception that ends it, and lets it out."""

    def handle(self) -> None:
        try:
            for line in self.rfile:
                self.wfile.write(line.upper())
        except BaseException as exc:
            self.server.seen.append((type(exc), getattr(exc, "setting", None)))
            raise


@pytest.mark.parametrize("model", ["sync", *THREADED])
def test_idle_timeout_raises_connection_timeout_where_the_handler_waits(model: str) -> None:
    server = make_server(model, EchoThenWait, idle_timeout=0.3, park_timeout=None)
    with Serving(server), connect(server.server_address) as client:
        client.sendall(b"hello\n")
        # The reply, then the close once the idle time-out ended the handler.
        assert recv_all(client) == b"HELLO\n"
    stats = server.statistics()
    assert server.seen == [(netserve.ConnectionTimeout, "idle_timeout")]
    assert server.reported == []  # never handle_error()
    assert (stats.timeouts, stats.handled, stats.errors, stats.active) == (1, 0, 0, 0)
    assert stats.timeouts_by_kind == {"idle_timeout": 1}
    server.server_close()


def test_park_timeout_reaches_the_handler_of_a_connection_that_never_spoke() -> None:
    server = make_server("threading", EchoThenWait, park_timeout=0.3, idle_timeout=None)
    with Serving(server), connect(server.server_address) as client:
        assert recv_all(client) == b""
    assert server.seen == [(netserve.ConnectionTimeout, "park_timeout")]
    assert server.reported == []
    assert server.statistics().timeouts_by_kind == {"park_timeout": 1}
    server.server_close()


def test_pool_closes_a_parked_connection_without_taking_a_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="netserve.limits")
    server = make_server("pool", EchoThenWait, park_timeout=0.3)
    with Serving(server), connect(server.server_address) as client:
        assert recv_all(client) == b""
    stats = server.statistics()
    assert server.seen == []  # no handler ran
    assert (stats.timeouts, stats.park_timeouts, stats.handled) == (1, 1, 0)
    assert stats.timeouts_by_kind == {"park_timeout": 1}
    # Logged at DEBUG, as every time-out is (docs/limits.md).
    logged = [r for r in caplog.records if r.name == "netserve.limits"]
    assert [r.levelno for r in logged] == [logging.DEBUG]
    assert "park_timeout" in logged[0].getMessage()
    server.server_close()


@pytest.mark.parametrize("model", THREADED)
def test_the_park_timeout_ends_once_the_client_has_spoken(model: str) -> None:
    # Parked 0.3 s, idle 5 s: a pause of 0.6 s after the first line is fine.
    server = make_server(model, EchoThenWait, park_timeout=0.3, idle_timeout=5.0)
    with Serving(server), connect(server.server_address) as client:
        client.sendall(b"one\n")
        assert client.recv(10) == b"ONE\n"
        threading.Event().wait(0.6)  # a quiet spell longer than the park time-out
        client.sendall(b"two\n")
        assert client.recv(10) == b"TWO\n"
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b""
    assert server.seen == []
    assert server.statistics().handled == 1
    server.server_close()


class BigReply(netserve.StreamRequestHandler):
    """Sends 10 MB to a peer that never reads them."""

    def handle(self) -> None:
        self.rfile.readline()
        try:
            self.wfile.write(b"x" * 10_000_000)
        except BaseException as exc:
            self.server.seen.append((type(exc), getattr(exc, "setting", None)))
            raise


def small_buffer_client(address: Any) -> socket.socket:
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.settimeout(10)
    client.connect(address)
    return client


@pytest.mark.parametrize("model", ["sync", *THREADED])
def test_write_timeout_ends_a_reply_to_a_peer_that_does_not_read(model: str) -> None:
    server = make_server(model, BigReply, write_timeout=0.3)
    with Serving(server), small_buffer_client(server.server_address) as client:
        client.sendall(b"go\n")
        done = threading.Event()
        server.service_actions = lambda: server.seen and done.set()
        # The client reads nothing until the server gave up on it.
        assert done.wait(10)
        assert server.wait_closed(10)
        # What it did not read is dropped with a reset: a peer must not take
        # the cut reply, ended by a normal end of stream, for a whole one.
        with pytest.raises(ConnectionResetError):
            recv_all(client)
    assert server.seen == [(netserve.ConnectionTimeout, "write_timeout")]
    assert server.reported == []
    server.server_close()
    assert server.statistics().timeouts_by_kind == {"write_timeout": 1}


class UserTimeout(EchoThenWait):
    timeout = 0.2


@pytest.mark.parametrize("model", THREADED)
def test_a_timeout_the_handler_set_is_the_stdlibs_and_reaches_handle_error(model: str) -> None:
    server = make_server(model, UserTimeout, idle_timeout=30.0)
    with Serving(server), connect(server.server_address) as client:
        client.sendall(b"x\n")
        assert recv_all(client) == b"X\n"
    assert server.reported == [TimeoutError]
    assert server.seen == [(TimeoutError, None)]  # not a ConnectionTimeout
    stats = server.statistics()
    assert (stats.errors, stats.timeouts) == (1, 0)
    server.server_close()


def trickle_until_closed(client: socket.socket, lines: int) -> bool:
    """Send a line every 0.1 s, reading each answer, until the server closes
    the connection (True) or ``lines`` have gone (False)."""
    for _ in range(lines):
        try:
            client.sendall(b"x\n")
            if client.recv(10) == b"":
                return True
        except ConnectionError:
            return True
        threading.Event().wait(0.1)  # the trickle's pace, not a readiness wait
    return False


@pytest.mark.parametrize("model", THREADED)
def test_max_connection_age_ends_a_client_that_keeps_trickling(model: str) -> None:
    server = make_server(model, EchoThenWait, idle_timeout=5.0, max_connection_age=0.5)
    with Serving(server), connect(server.server_address) as client:
        closed = trickle_until_closed(client, lines=100)  # a line every 0.1 s, inside idle
    assert closed
    assert server.seen == [(netserve.ConnectionTimeout, "max_connection_age")]
    assert server.statistics().timeouts_by_kind == {"max_connection_age": 1}
    server.server_close()


class OwnLongTimeout(EchoThenWait):
    timeout = 5.0


@pytest.mark.parametrize("model", ["sync", *THREADED])
def test_max_connection_age_bounds_a_handler_with_a_time_out_of_its_own(model: str) -> None:
    # A handler's own time-out (StreamRequestHandler.timeout) replaces the idle
    # and write time-outs, not the age: the connection still ends at its age,
    # with ConnectionTimeout, while the client trickles well inside both.
    server = make_server(model, OwnLongTimeout, max_connection_age=0.5)
    with Serving(server), connect(server.server_address) as client:
        closed = trickle_until_closed(client, lines=40)
    assert closed, "still open long past max_connection_age"
    assert server.seen == [(netserve.ConnectionTimeout, "max_connection_age")]
    assert server.reported == []
    assert server.statistics().timeouts_by_kind == {"max_connection_age": 1}
    server.server_close()


class ReadsLines(netserve.StreamRequestHandler):
    def handle(self) -> None:
        try:
            line = self.rfile.readline()
            self.wfile.write(b"%d\n" % len(line))
            self.rfile.readline()  # the long one
        except BaseException as exc:
            self.server.seen.append(type(exc))
            raise


@pytest.mark.parametrize(
    ("model", "reported"), [("pool", []), ("threading", [netserve.LineTooLong])]
)
def test_a_line_past_max_line_size_raises_line_too_long(model: str, reported: list[type]) -> None:
    server = make_server(model, ReadsLines, max_line_size=1024)
    with Serving(server), connect(server.server_address) as client:
        client.sendall(b"y" * 1023 + b"\n")  # exactly the limit, newline included
        assert client.recv(10) == b"1024\n"
        try:
            client.sendall(b"z" * 1_000_000)  # no newline
        except ConnectionError:
            pass  # the server may close before it all went out
        assert recv_all(client) == b""
    assert server.seen == [netserve.LineTooLong]
    assert server.reported == reported  # stdlib classes report it, new models do not
    stats = server.statistics()
    assert (stats.lines_too_long, stats.handled) == (1, 1)
    server.server_close()


def test_line_too_long_consumes_the_limit_and_leaves_the_rest() -> None:
    left, right = socket.socketpair()
    with left, right:
        from netserve._core._lines import open_reader

        rfile = open_reader(left, -1, 8)
        with rfile:
            right.sendall(b"short\n0123456789\nnext\n")
            assert rfile.readline() == b"short\n"
            with pytest.raises(netserve.LineTooLong):
                rfile.readline()
            assert rfile.readline() == b"89\n"  # the rest of the long line
            assert rfile.readline(3) == b"nex"  # a size below the limit as asked
            right.sendall(b"a\n" + b"b" * 20)
            right.shutdown(socket.SHUT_WR)
            assert rfile.readline() == b"t\n"
            assert rfile.readline() == b"a\n"
            for _ in range(2):  # 8 bytes, twice
                with pytest.raises(netserve.LineTooLong):
                    rfile.readline()
            assert rfile.readline() == b"bbbb"  # the end of the stream ends a line
            assert rfile.readline() == b""
    # Iteration stops too.
    left, right = socket.socketpair()
    with left, right:
        rfile = open_reader(left, 0, 8)  # unbuffered
        with rfile:
            right.sendall(b"ok\n" + b"c" * 20)
            lines = iter(rfile)
            assert next(lines) == b"ok\n"
            with pytest.raises(netserve.LineTooLong):
                next(lines)
            # Unbuffered: nothing past the limit was taken from the socket.
            assert left.recv(100, socket.MSG_DONTWAIT) == b"c" * 12


class WritesAfterReset(netserve.StreamRequestHandler):
    def handle(self) -> None:
        self.rfile.readline()
        self.server.got_line.set()
        assert self.server.reset.wait(10)
        try:
            for _ in range(1000):  # a reset peer fails a send within a few
                self.wfile.write(b"x" * 65536)
        except BaseException as exc:
            self.server.seen.append(type(exc))
            raise


def reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN (SO_LINGER with a zero time)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize(("model", "reported"), [("pool", 0), ("threading", 1)])
def test_a_peer_that_resets_is_counted_and_quiet_in_the_new_models(
    model: str, reported: int
) -> None:
    server = make_server(model, WritesAfterReset)
    server.got_line = threading.Event()
    server.reset = threading.Event()
    with Serving(server):
        client = connect(server.server_address)
        client.sendall(b"x\n")
        assert server.got_line.wait(10)
        reset(client)
        server.reset.set()
        assert server.wait_closed(10)
    assert len(server.seen) == 1
    assert issubclass(server.seen[0], ConnectionError)
    assert len(server.reported) == reported
    stats = server.statistics()
    assert (stats.disconnects, stats.handled, stats.errors) == (1, 1, reported)
    server.server_close()


class HoldsUntilEOF(netserve.StreamRequestHandler):
    # A bound for a forked child whose client failed to close (the test's
    # other clients, inherited by the child, would keep it open).
    timeout = 10

    def handle(self) -> None:
        self.wfile.write(b"hi\n")
        self.rfile.read()


@pytest.mark.parametrize("model", ["threading", "pool", "forking"])
def test_max_connections_pauses_accepting_and_resumes_below(model: str) -> None:
    server = make_server(model, HoldsUntilEOF, max_connections=2)
    with LogEvent("netserve.limits", "accepting paused") as paused, Serving(server):
        first, second = connect(server.server_address), connect(server.server_address)
        with first, second:
            for client in (first, second):
                client.sendall(b"x")
                assert client.recv(10) == b"hi\n"
            with connect(server.server_address) as third:
                assert paused.event.wait(10)
                stats = server.statistics()
                assert (stats.accepted, stats.active, stats.at_limit) == (2, 2, True)
                third.sendall(b"x")
                first.shutdown(socket.SHUT_WR)  # its handler ends: room for the third
                assert recv_all(first) == b""
                assert third.recv(10) == b"hi\n"
                third.shutdown(socket.SHUT_WR)
                assert recv_all(third) == b""
            second.shutdown(socket.SHUT_WR)
            assert recv_all(second) == b""
        assert server.wait_closed(10)
    stats = server.statistics()
    assert (stats.accepted, stats.handled, stats.refused) == (3, 3, 0)
    server.server_close()


@pytest.mark.parametrize("model", ["threading", "pool", "forking"])
def test_max_connections_per_client_closes_the_extra_one_at_once(model: str) -> None:
    reaped = threading.Event()

    def child_exited(self: Any, pid: int, exitcode: int) -> None:
        netserve.ForkingTCPServer._netserve_child_exited(self, pid, exitcode)
        reaped.set()

    extra = {"_netserve_child_exited": child_exited} if model == "forking" else {}
    server = make_server(model, HoldsUntilEOF, max_connections_per_client=2, **extra)
    with LogEvent("netserve.limits", "max_connections_per_client") as limited, Serving(server):
        first, second = connect(server.server_address), connect(server.server_address)
        with first, second:
            for client in (first, second):
                client.sendall(b"x")
                assert client.recv(10) == b"hi\n"
            with connect(server.server_address) as third:
                assert recv_all(third) == b""  # closed without a handler
            assert limited.event.wait(10)
            stats = server.statistics()
            assert (stats.refused, stats.limited, stats.active) == (1, 1, 2)
            first.shutdown(socket.SHUT_WR)
            assert recv_all(first) == b""
            if model == "forking":
                # The parent learns that a child's connection closed when it
                # reaps the child: until then the host still holds two.
                assert reaped.wait(10)
            assert server.statistics().active == 1
            with connect(server.server_address) as fourth:  # room again for this host
                fourth.sendall(b"x")
                assert fourth.recv(10) == b"hi\n"
                fourth.shutdown(socket.SHUT_WR)
                assert recv_all(fourth) == b""
            second.shutdown(socket.SHUT_WR)
            assert recv_all(second) == b""
        assert server.wait_closed(10)
    assert "127.0.0.1" in limited.messages[0]
    server.server_close()


def test_datagram_servers_are_exempt_from_connection_limits() -> None:
    class Echo(netserve.DatagramRequestHandler):
        def handle(self) -> None:
            self.wfile.write(self.rfile.read())

    server = netserve.ThreadPoolUDPServer(("127.0.0.1", 0), Echo)
    server.max_connections = 1
    server.max_connections_per_client = 1
    with Serving(server), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(10)
        for i in range(5):
            client.sendto(b"%d" % i, server.server_address)
            assert client.recv(10) == b"%d" % i
    assert server.statistics().refused == 0
    server.server_close()


class Held(netserve.StreamRequestHandler):
    def handle(self) -> None:
        self.rfile.readline()
        assert self.server.gate.wait(10)


def test_a_saturated_pool_says_so() -> None:
    server = make_server("pool", Held, max_workers=1, queue_size=1)
    server.gate = threading.Event()
    with LogEvent("netserve.pool", "pool saturated") as saturated, Serving(server):
        clients = [connect(server.server_address) for _ in range(3)]
        try:
            for client in clients:
                client.sendall(b"x\n")
            assert saturated.event.wait(10)
        finally:
            server.gate.set()
            for client in clients:
                client.close()
    assert "1 of 1 workers busy, 1 queued" in saturated.messages[0]
    server.server_close()


def test_forking_counts_a_child_that_timed_out() -> None:
    server = make_server("forking", EchoThenWait, idle_timeout=0.3)
    with Serving(server), connect(server.server_address) as client:
        client.sendall(b"a\n")
        assert recv_all(client) == b"A\n"
        assert server.wait_closed(10)
    stats = server.statistics()
    assert (stats.timeouts, stats.handled, stats.active) == (1, 0, 0)
    # The kind came through the child's exit status.
    assert stats.timeouts_by_kind == {"idle_timeout": 1}
    server.server_close()


def test_timed_socket_passes_a_non_blocking_call_through() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()) as client:
        from netserve._core._limits import TimedAccept

        sock, _ = TimedAccept()(listener, (0.2, 0.2, 0.2, None), time.monotonic, 5)
        with sock:
            assert isinstance(sock, TimedSocket)
            with pytest.raises(BlockingIOError):
                sock.recv(10, socket.MSG_DONTWAIT)
            sock.setblocking(False)
            with pytest.raises(BlockingIOError) as raised:
                sock.recv(10)
            assert not isinstance(raised.value, netserve.ConnectionTimeout)
            sock.setblocking(True)
            with pytest.raises(netserve.ConnectionTimeout):
                sock.recv(10)
            client.sendall(b"ok")
            assert sock.recv(10) == b"ok"


def test_unix_stream_connections_get_the_time_outs_too(unix_path: str) -> None:
    # A Unix listener does not pass its time-outs on to what it accepts: each
    # connection gets them itself.
    class Server(netserve.ThreadingUnixStreamServer):
        idle_timeout = 0.3

        def handle_error(self, request: Any, client_address: Any) -> None:
            self.reported.append(sys.exc_info()[0])  # type: ignore[attr-defined]

    server = Server(unix_path, EchoThenWait)
    server.reported = []  # type: ignore[attr-defined]
    server.seen = []  # type: ignore[attr-defined]
    with Serving(server), connect(unix_path, socket.AF_UNIX) as client:
        client.sendall(b"u\n")
        assert recv_all(client) == b"U\n"
    assert server.seen == [(netserve.ConnectionTimeout, "idle_timeout")]  # type: ignore[attr-defined]
    assert server.reported == []  # type: ignore[attr-defined]
    server.server_close()


def test_time_outs_switched_off_leave_the_listener_as_it_was() -> None:
    server = make_server("threading", EchoThenWait, idle_timeout=0.3)
    with Serving(server), connect(server.server_address) as client:
        client.sendall(b"a\n")
        assert recv_all(client) == b"A\n"
        server.idle_timeout = None
        with connect(server.server_address) as second:
            second.sendall(b"b\n")
            assert second.recv(10) == b"B\n"
            received = server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)
            assert received == bytes(16)  # off again
            second.shutdown(socket.SHUT_WR)
            assert recv_all(second) == b""
    assert server.seen == [(netserve.ConnectionTimeout, "idle_timeout")]
    server.server_close()


class SendsAFile(netserve.StreamRequestHandler):
    def handle(self) -> None:
        self.rfile.readline()
        try:
            with open(self.server.path, "rb") as file:
                self.request.sendfile(file)
        except BaseException as exc:
            self.server.seen.append((type(exc), getattr(exc, "setting", None)))
            raise


def test_sendfile_to_a_peer_that_does_not_read_ends_by_write_timeout(tmp_path: Any) -> None:
    path = tmp_path / "big"
    path.write_bytes(b"f" * 10_000_000)
    server = make_server("threading", SendsAFile, write_timeout=0.3)
    server.path = str(path)
    with Serving(server), small_buffer_client(server.server_address) as client:
        client.sendall(b"go\n")
        done = threading.Event()
        server.service_actions = lambda: server.seen and done.set()
        assert done.wait(10)  # the stdlib's sendfile() would wait forever
    assert server.seen == [(netserve.ConnectionTimeout, "write_timeout")]
    assert server.reported == []
    server.server_close()


def test_sendfile_sends_the_whole_file_and_leaves_its_position_after_it(tmp_path: Any) -> None:
    path = tmp_path / "small"
    path.write_bytes(bytes(range(256)) * 40)
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()) as client:
        from netserve._core._limits import TimedAccept

        sock, _ = TimedAccept()(listener, (None, 5.0, 5.0, None), time.monotonic, 5)
        with sock, open(path, "rb") as file:
            assert sock.sendfile(file, 100, 5000) == 5000
            assert file.tell() == 5100
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(client) == path.read_bytes()[100:5100]

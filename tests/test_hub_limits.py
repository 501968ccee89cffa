"""The hub's limits (issue 11): its time-outs, line bound, connection bound, stall
watchdog and ``to_thread()``, end to end on real sockets.

Time-outs here are a few tenths of a second; every wait on the test's side is
an event, a reply or an end of stream, with a hard timeout on the client.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import socket
import sys
import threading
from typing import Any

import pytest

import netserve
from tests.conftest import Serving, connect, recv_all


class Recording(netserve.GreenTCPServer):
    """Records handle_error() calls instead of printing them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.reported: list[type[BaseException]] = []
        super().__init__(*args, **kwargs)

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.reported.append(sys.exc_info()[0])  # type: ignore[arg-type]


def server_of(handler: type, **attributes: Any) -> Any:
    cls = type("Server", (Recording,), attributes)
    return cls(("127.0.0.1", 0), handler)


class Seen:
    """What the handlers saw, and an event once each has ended."""

    def __init__(self) -> None:
        self.errors: list[BaseException] = []
        self.ended = threading.Event()


# -- time-outs -----------------------------------------------------------------------------


def test_idle_timeout_raises_connection_timeout_where_the_handler_waits() -> None:
    seen = Seen()

    class Handler(netserve.StreamRequestHandler):
        def handle(self) -> None:
            self.wfile.write(self.rfile.readline().upper())
            try:
                self.rfile.readline()  # the client says no more
            except BaseException as exc:
                seen.errors.append(exc)
                raise

    server = server_of(Handler, idle_timeout=0.3)
    with Serving(server) as serving, connect(serving.address) as client:
        client.sendall(b"hi\n")
        # Closed by the server once the idle time-out ran out.
        assert recv_all(client) == b"HI\n"
        assert server.wait_closed(5)
    [error] = seen.errors
    assert type(error) is netserve.ConnectionTimeout
    assert error.setting == "idle_timeout"
    # netserve's own time-out: counted, never handle_error()'s.
    assert server.reported == []
    stats = server.statistics()
    assert (stats.timeouts, stats.handled, stats.errors) == (1, 0, 0)
    assert stats.timeouts_by_kind == {"idle_timeout": 1}


def test_the_park_timeout_bounds_the_first_read_then_the_idle_timeout_the_others() -> None:
    seen: dict[str, str | None] = {}
    done = threading.Event()

    class Handler(netserve.StreamRequestHandler):
        def handle(self) -> None:
            name = "silent"
            try:
                name = self.rfile.readline().strip().decode()
                self.rfile.readline()
            except netserve.ConnectionTimeout as exc:
                seen[name] = exc.setting
                if len(seen) == 2:
                    done.set()

    # The handler starts at once (no parking), so the park time-out is the
    # first read's; the idle time-out is longer, to tell the two apart.
    server = server_of(Handler, park_until_readable=False, park_timeout=0.2, idle_timeout=0.4)
    with Serving(server) as serving:
        with connect(serving.address) as silent, connect(serving.address) as spoken:
            spoken.sendall(b"spoken\n")
            assert done.wait(10)
            assert recv_all(silent) == recv_all(spoken) == b""
    assert seen == {"silent": "park_timeout", "spoken": "idle_timeout"}


def test_a_parked_connection_that_never_speaks_is_closed_by_the_park_timeout() -> None:
    server = server_of(netserve.StreamRequestHandler, park_timeout=0.2)
    with Serving(server) as serving, connect(serving.address) as silent:
        assert recv_all(silent) == b""
        assert server.wait_closed(5)
        stats = server.statistics()
        assert (stats.timeouts, stats.handled, stats.active, stats.parked) == (1, 0, 0, 0)
        assert stats.timeouts_by_kind == {"park_timeout": 1}


def test_write_timeout_ends_a_reply_the_peer_never_reads() -> None:
    seen = Seen()

    class Handler(netserve.StreamRequestHandler):
        def handle(self) -> None:
            self.rfile.readline()
            try:
                self.wfile.write(b"x" * 10_000_000)
            except BaseException as exc:
                seen.errors.append(exc)
                raise
            finally:
                seen.ended.set()

    server = server_of(Handler, write_timeout=0.3)
    with Serving(server) as serving:
        client = socket.socket()
        try:
            # A small receive buffer: the server's send buffer fills at once.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.settimeout(10)
            client.connect(serving.address)
            client.sendall(b"send me everything\n")
            assert seen.ended.wait(10)  # and the client reads nothing
            assert server.wait_closed(5)
            # The unread rest is dropped with a reset (see test_limits).
            with pytest.raises(ConnectionResetError):
                recv_all(client)
        finally:
            client.close()
    [error] = seen.errors
    assert type(error) is netserve.ConnectionTimeout
    assert error.setting == "write_timeout"
    assert server.reported == []
    assert server.statistics().timeouts == 1


def test_a_user_timeout_replaces_netserves_and_reaches_handle_error() -> None:
    seen = Seen()

    class Handler(netserve.StreamRequestHandler):
        timeout = 0.2  # the stdlib's: a plain TimeoutError

        def handle(self) -> None:
            try:
                self.rfile.readline()
            except BaseException as exc:
                seen.errors.append(exc)
                raise

    # netserve's own time-outs are far longer: the user's is the one that runs out.
    server = server_of(Handler, park_until_readable=False, park_timeout=60, idle_timeout=60)
    with Serving(server) as serving, connect(serving.address) as client:
        assert recv_all(client) == b""
        assert server.wait_closed(5)
    [error] = seen.errors
    assert type(error) is TimeoutError
    assert server.reported == [TimeoutError]
    stats = server.statistics()
    assert (stats.timeouts, stats.handled, stats.errors) == (0, 1, 1)


def test_max_connection_age_ends_a_connection_whatever_it_does() -> None:
    seen = Seen()

    class Handler(netserve.StreamRequestHandler):
        def handle(self) -> None:
            try:
                for line in self.rfile:
                    self.wfile.write(line.upper())
            except BaseException as exc:
                seen.errors.append(exc)
                raise

    server = server_of(Handler, max_connection_age=0.3, idle_timeout=60)
    with Serving(server) as serving, connect(serving.address) as client:
        client.sendall(b"one\n")
        assert client.recv(100) == b"ONE\n"
        # Silent now: the idle time-out is far, the age limit is not.
        assert recv_all(client) == b""
        assert server.wait_closed(5)
    [error] = seen.errors
    assert type(error) is netserve.ConnectionTimeout
    assert error.setting == "max_connection_age"
    assert server.statistics().timeouts == 1


def test_the_timeouts_hold_on_a_unix_stream_server(unix_path: str) -> None:
    class Server(netserve.GreenUnixStreamServer):
        idle_timeout = 0.2

    class Handler(netserve.StreamRequestHandler):
        def handle(self) -> None:
            self.wfile.write(self.rfile.readline().upper())
            self.rfile.readline()

    server = Server(unix_path, Handler)
    with Serving(server) as serving, connect(serving.address, socket.AF_UNIX) as client:
        client.sendall(b"hi\n")
        assert recv_all(client) == b"HI\n"
        assert server.wait_closed(5)
    assert server.statistics().timeouts == 1


def test_the_new_models_defaults() -> None:
    green = netserve.GreenTCPServer
    assert (green.park_timeout, green.idle_timeout, green.write_timeout) == (30.0, 120.0, 60.0)
    assert green.max_connection_age is None
    assert (green.max_connections, green.max_connections_per_client) == (10000, 1000)
    assert green.max_line_size == 65536
    assert green.client_faults_are_errors is False
    assert green.hub_stall_warning == 0.1
    assert green.to_thread_workers == 16


# -- lines ---------------------------------------------------------------------------------


def test_a_line_past_max_line_size_raises_line_too_long_having_consumed_the_limit() -> None:
    seen: list[Any] = []
    done = threading.Event()

    class Handler(netserve.StreamRequestHandler):
        def handle(self) -> None:
            try:
                seen.append(self.rfile.readline())  # exactly the limit: fine
                try:
                    self.rfile.readline(5000)  # a size above the limit is bounded too
                except netserve.LineTooLong as exc:
                    seen.append(exc)
                # The line's first 1,024 bytes are gone, the rest is there.
                seen.append(self.rfile.read(1))
                seen.append(self.rfile.readline(10))  # a size within the limit: as ever
                # The reader holds at most one receive, not the megabyte.
                seen.append(len(self.rfile._buffer) <= 8192)  # type: ignore[attr-defined]
                for _ in self.rfile:  # iteration is bounded as well
                    pass
            finally:
                done.set()

    line = b"x" * 1023 + b"\n"
    long_line = b"a" * 1024 + b"b" * (1_000_000 - 1024)
    server = server_of(Handler, max_line_size=1024)
    with Serving(server) as serving, connect(serving.address) as client:

        def send() -> None:
            try:
                client.sendall(line + long_line)
            except OSError:
                pass  # the server closed with the rest of the line unread

        sender = threading.Thread(target=send)
        sender.start()
        try:
            assert done.wait(10)
        finally:
            with contextlib.suppress(OSError):  # reset by the server already
                client.shutdown(socket.SHUT_RDWR)
            sender.join()
        assert server.wait_closed(5)
    assert seen[0] == line
    assert type(seen[1]) is netserve.LineTooLong
    assert seen[2:] == [b"b", b"b" * 10, True]
    # It escaped the handler at the loop: a client's fault, counted, not reported.
    assert server.reported == []
    stats = server.statistics()
    assert (stats.lines_too_long, stats.handled, stats.errors) == (1, 1, 0)


@pytest.mark.parametrize("rbufsize", [-1, 0], ids=["buffered", "unbuffered"])
def test_the_line_bound_within_one_receive(rbufsize: int) -> None:
    seen: list[Any] = []

    class Handler(netserve.StreamRequestHandler):
        def handle(self) -> None:
            seen.append(self.rfile.readline())  # 8 bytes with its newline: fine
            try:
                self.rfile.readline()
            except netserve.LineTooLong:
                seen.append("too long")
            seen.append(self.rfile.read(1))  # the ninth byte is still there
            seen.append(self.rfile.readline())
            self.wfile.write(b"done\n")

    Handler.rbufsize = rbufsize
    server = server_of(Handler, max_line_size=8)
    with Serving(server) as serving, connect(serving.address) as client:
        client.sendall(b"1234567\n12345678\nabc\n")  # all of it in one receive
        assert client.recv(100) == b"done\n"
    assert seen == [b"1234567\n", "too long", b"\n", b"abc\n"]


# -- max_connections -----------------------------------------------------------------------


def test_max_connections_pauses_accepting_and_resumes_below_it() -> None:
    class Handler(netserve.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                self.wfile.write(line.upper())

    server = server_of(Handler, max_connections=2)
    with Serving(server) as serving:
        first = connect(serving.address)
        with connect(serving.address) as second, connect(serving.address) as third:
            try:
                for client in (first, second):
                    client.sendall(b"hi\n")
                    assert client.recv(100) == b"HI\n"
                # The third waits in the backlog, its line unanswered.
                third.sendall(b"third\n")
                stats = server.statistics()
                assert (stats.at_limit, stats.accepting, stats.active) == (True, False, 2)
                assert stats.accepted == 2
            finally:
                first.close()
            # One closed: the hub accepts again, and the third is served...
            assert third.recv(100) == b"THIRD\n"
            # ... which makes two again: paused again.
            stats = server.statistics()
            assert (stats.at_limit, stats.accepting, stats.accepted) == (True, False, 3)
        assert server.wait_closed(5)
        assert server.statistics().at_limit is False


# -- the stall watchdog --------------------------------------------------------------------


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self.arrived = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.arrived.set()


@pytest.fixture
def hub_warnings() -> Any:
    collect = _Collect()
    logger = logging.getLogger("netserve.hub")
    logger.addHandler(collect)
    try:
        yield collect
    finally:
        logger.removeHandler(collect)


def test_the_watchdog_names_a_handler_that_blocks_the_hub_with_its_stack(
    hub_warnings: _Collect,
) -> None:
    release = threading.Event()

    class Blocking(netserve.StreamRequestHandler):
        def handle(self) -> None:
            self.rfile.readline()
            release.wait(10)  # blocks the hub's thread, as time.sleep() would
            self.wfile.write(b"done\n")

    server = server_of(Blocking, hub_stall_warning=0.1)
    with Serving(server) as serving, connect(serving.address) as client:
        client.sendall(b"block\n")
        try:
            # Logged while the handler still blocks: its stack as it is now.
            assert hub_warnings.arrived.wait(10)
        finally:
            release.set()
        assert client.recv(100) == b"done\n"
    [record] = hub_warnings.records
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "Blocking.handle() for ('127.0.0.1'," in message
    assert "release.wait(10)" in message


def test_the_watchdog_stays_quiet_for_a_handler_that_waits_cooperatively(
    hub_warnings: _Collect,
) -> None:
    class Cooperative(netserve.StreamRequestHandler):
        def handle(self) -> None:
            self.rfile.readline()
            netserve.green_sleep(0.3)  # three thresholds, yielding all along
            self.wfile.write(b"done\n")

    server = server_of(Cooperative, hub_stall_warning=0.1)
    with Serving(server) as serving, connect(serving.address) as client:
        client.sendall(b"wait\n")
        assert client.recv(100) == b"done\n"
    assert hub_warnings.records == []


# -- to_thread -----------------------------------------------------------------------------


def test_to_thread_keeps_serving_the_others_while_a_call_blocks() -> None:
    started = threading.Event()
    release = threading.Event()
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")

    def blocking(tag: str) -> bytes:
        started.set()
        assert release.wait(10)
        # The call runs in a copy of the handler's context.
        return f"{tag} {request_id.get()} on {threading.current_thread().name}\n".encode()

    class Handler(netserve.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                if line == b"block\n":
                    request_id.set("r1")
                    self.wfile.write(netserve.to_thread(blocking, tag="unblocked"))
                else:
                    self.wfile.write(line.upper())

    server = server_of(Handler)
    with Serving(server) as serving:
        with connect(serving.address) as blocked, connect(serving.address) as other:
            blocked.sendall(b"block\n")
            assert started.wait(10)
            # Served while the other handler's call still blocks its thread.
            other.sendall(b"meanwhile\n")
            assert other.recv(100) == b"MEANWHILE\n"
            assert not release.is_set()
            release.set()
            reply = blocked.recv(100)
    assert reply.startswith(b"unblocked r1 on ")
    assert b"to-thread" in reply


def test_to_thread_raises_the_calls_exception_in_the_handler() -> None:
    seen: list[BaseException] = []

    def fails() -> None:
        raise LookupError("from the worker")

    class Handler(netserve.StreamRequestHandler):
        def handle(self) -> None:
            self.rfile.readline()
            try:
                netserve.to_thread(fails)
            except LookupError as exc:
                seen.append(exc)
            self.wfile.write(b"ok\n")

    server = server_of(Handler)
    with Serving(server) as serving, connect(serving.address) as client:
        client.sendall(b"go\n")
        assert client.recv(100) == b"ok\n"
    assert [str(e) for e in seen] == ["from the worker"]


def test_to_thread_runs_at_most_to_thread_workers_calls_at_once() -> None:
    lock = threading.Lock()
    running = [0, 0]  # now, most
    two_running = threading.Event()
    release = threading.Event()

    def blocking() -> None:
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
            if running[0] == 2:
                two_running.set()
        assert release.wait(10)
        with lock:
            running[0] -= 1

    class Handler(netserve.StreamRequestHandler):
        def handle(self) -> None:
            self.rfile.readline()
            netserve.to_thread(blocking)
            self.wfile.write(b"ok\n")

    server = server_of(Handler, to_thread_workers=2)
    with Serving(server) as serving:
        clients = [connect(serving.address) for _ in range(3)]
        try:
            for client in clients:
                client.sendall(b"go\n")
            assert two_running.wait(10)
            release.set()
            for client in clients:
                assert client.recv(100) == b"ok\n"
        finally:
            for client in clients:
                client.close()
    assert running == [0, 2]
    # Its threads were joined as the server closed (and the leak check agrees).
    assert server._green_hub._runner.threads == 2


def test_to_thread_outside_the_hub_is_a_plain_call() -> None:
    assert netserve.to_thread(divmod, 7, 2) == (3, 1)
    assert netserve.to_thread(threading.current_thread) is threading.current_thread()


def test_the_limits_leave_the_hub_idle_without_connections() -> None:
    # The sweep runs only while connections are open: an idle hub still
    # blocks in epoll with no timeout at all.
    server = server_of(netserve.StreamRequestHandler, idle_timeout=0.2)
    hub = server._green_hub
    with Serving(server) as serving:
        with connect(serving.address) as client:
            client.sendall(b"x\n")
            assert recv_all(client) == b""
        assert server.wait_closed(5)
        assert hub.run_sync(hub._next_timeout) == -1.0

"""ForkingMixIn: children handle requests, are bounded and reaped, and only ours."""

from __future__ import annotations

import contextlib
import os
import select
import selectors
import socket
import threading
import time
from typing import Any

import pytest

import netserve
from tests.conftest import LogEvent, Serving, connect, recv_all


class PidEcho(netserve.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline()
        self.wfile.write(b"%d %s" % (os.getpid(), line))


def test_each_request_runs_in_a_child_and_is_reaped() -> None:
    with netserve.ForkingTCPServer(("127.0.0.1", 0), PidEcho) as server:
        with connect(server.server_address) as client:
            client.sendall(b"hi\n")
            server.handle_request()
            pid, _, line = recv_all(client).partition(b" ")
        assert line == b"hi\n"
        assert int(pid) != os.getpid()
        assert server.active_children == {int(pid)}
    # server_close() waited: nothing left to reap (the leak check verifies too).
    assert server.active_children == set()


def test_max_children_bounds_the_running_children() -> None:
    observed: list[int] = []

    class Holding(netserve.BaseRequestHandler):
        def handle(self) -> None:
            # Hold until the client says so. (Not until EOF: the children
            # inherit this process's client sockets, so a close is not an EOF.)
            self.request.recv(100)

    class Server(netserve.ForkingTCPServer):
        max_children = 2

        def process_request(self, request: Any, client_address: Any) -> None:
            super().process_request(request, client_address)
            observed.append(len(self.active_children or ()))

    with Server(("127.0.0.1", 0), Holding) as server:
        clients = [connect(server.server_address) for _ in range(3)]
        try:
            server.handle_request()
            server.handle_request()
            assert observed == [1, 2]
            # The third request must wait for a child to end: end the first.
            clients[0].sendall(b"bye")
            server.handle_request()
            assert observed == [1, 2, 2]
        finally:
            for client in clients:
                client.sendall(b"bye")
                client.close()


def test_an_unrelated_child_is_not_reaped() -> None:
    unrelated = os.fork()
    if unrelated == 0:
        os._exit(72)
    try:
        with Serving(netserve.ForkingTCPServer(("127.0.0.1", 0), PidEcho)) as serving:
            for _ in range(3):
                with connect(serving.address) as client:
                    client.sendall(b"x\n")
                    assert recv_all(client).endswith(b"x\n")
    finally:
        _, status = os.waitpid(unrelated, 0)
    assert os.waitstatus_to_exitcode(status) == 72


def test_child_errors_go_to_handle_error_in_the_child(
    capfd: pytest.CaptureFixture[str],
) -> None:
    class Failing(netserve.BaseRequestHandler):
        def handle(self) -> None:
            raise ValueError("in the child")

    with netserve.ForkingTCPServer(("127.0.0.1", 0), Failing) as server:
        with connect(server.server_address) as client:
            server.handle_request()
            assert recv_all(client) == b""
    # The child's report reached the shared stderr before it exited.
    err = capfd.readouterr().err
    assert "Exception occurred during processing of request from" in err
    assert "ValueError: in the child" in err


def test_child_system_exit_is_not_reported(capfd: pytest.CaptureFixture[str]) -> None:
    class Exiting(netserve.BaseRequestHandler):
        def handle(self) -> None:
            raise SystemExit(5)

    with netserve.ForkingTCPServer(("127.0.0.1", 0), Exiting) as server:
        with connect(server.server_address) as client:
            server.handle_request()
            assert recv_all(client) == b""
    assert "Exception occurred" not in capfd.readouterr().err


def test_child_exit_status_says_whether_the_handler_succeeded() -> None:
    class Handler(netserve.StreamRequestHandler):
        def handle(self) -> None:
            if self.rfile.readline() == b"fail\n":
                raise ValueError("asked to fail")

    class Server(netserve.ForkingTCPServer):
        def collect_children(self, *, blocking: bool = False) -> None:
            pass  # the test reaps them, to read their statuses

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # the report is not what this test is about

    with Server(("127.0.0.1", 0), Handler) as server:
        for line in (b"ok\n", b"fail\n"):
            with connect(server.server_address) as client:
                client.sendall(line)
                server.handle_request()
                assert recv_all(client) == b""
    statuses = []
    for pid in sorted(server.active_children or ()):
        _, status = os.waitpid(pid, 0)
        statuses.append(os.waitstatus_to_exitcode(status))
    assert statuses == [0, 1]


def test_forking_udp_server() -> None:
    class Upper(netserve.DatagramRequestHandler):
        def handle(self) -> None:
            self.wfile.write(self.rfile.read().upper())

    with netserve.ForkingUDPServer(("127.0.0.1", 0), Upper) as server:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(10)
            client.sendto(b"fork", server.server_address)
            server.handle_request()
            assert client.recv(10) == b"FORK"


def test_forking_unix_stream_server(unix_path: str) -> None:
    with netserve.ForkingUnixStreamServer(unix_path, PidEcho) as server:
        with connect(unix_path, socket.AF_UNIX) as client:
            client.sendall(b"unix\n")
            server.handle_request()
            assert recv_all(client).endswith(b"unix\n")


def _unreaped(pids: list[int]) -> dict[int, str]:
    """The /proc state ("Z": a zombie) of each of this process's children not yet reaped."""
    states = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue  # reaped (before the open, or between the open and the read)
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        state, ppid = stat.rpartition(b")")[2].split()[:2]
        if int(ppid) == os.getpid():  # else the pid was reaped and reused
            states[pid] = state.decode()
    return states


def test_children_are_reaped_after_a_non_blocking_close() -> None:
    count = 10

    class Held(netserve.BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall(b"%d\n" % os.getpid())
            # Until the client says so. (Not until EOF: later children hold
            # copies of this process's client sockets.)
            self.request.recv(100)

    class Server(netserve.ForkingTCPServer):
        block_on_close = False

    server = Server(("127.0.0.1", 0), Held)
    clients: list[socket.socket] = []
    pids: list[int] = []
    closer = threading.Thread(target=server.server_close)
    passed = False
    try:
        for _ in range(count):
            clients.append(connect(server.server_address))
            server.handle_request()
            pids.append(int(clients[-1].recv(100)))
        closer.start()
        closer.join(10)
        assert not closer.is_alive(), "server_close() waited for the children"
        # Every child ends now, after server_close() has returned; nothing
        # else is called on the server.
        pidfds = [os.pidfd_open(pid) for pid in pids]
        try:
            for client in clients:
                client.sendall(b"go")
            for fd in pidfds:
                assert select.select([fd], [], [], 10)[0], "a child did not exit"
        finally:
            for fd in pidfds:
                os.close(fd)
        # Nothing tells a third party that a process was reaped: look again at
        # short intervals, for at most 5 s.
        deadline = time.monotonic() + 5
        while (left := _unreaped(pids)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not left, f"children not reaped 5 s after they exited: {left}"
        passed = True
    finally:
        for client in clients:
            with contextlib.suppress(OSError):
                client.sendall(b"go")  # ends any child still held
            client.close()
        if not passed:
            if closer.ident is None:
                server.server_close()
            closer.join(10)
            for pid in pids:  # so that the leak check has nothing to add
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)


class ServesUntilTold(netserve.BaseRequestHandler):
    """Says it serves, then holds until the client sends something, and echoes
    it. (Not until EOF: the children inherit this process's client sockets, so
    a close is not an end of stream for them.)"""

    def handle(self) -> None:
        self.request.sendall(b"serving\n")
        self.request.sendall(self.request.recv(100))


def end_held(clients: list[socket.socket]) -> None:
    """Tell every held child to end, and close the clients."""
    for client in clients:
        with contextlib.suppress(OSError):
            client.sendall(b"end\n")
        client.close()


def test_at_max_children_the_loop_waits_for_an_exit_and_still_closes_at_once() -> None:
    # The stdlib's loop waits inside process_request() for a child to exit
    # when max_children run, so close() (and shutdown()) hung for as long as a
    # child served. netserve's loop stops accepting instead (the backlog holds
    # the next client), is woken by a child's exit, and answers a stop at once.
    class Server(netserve.ForkingTCPServer):
        max_children = 2

    server = Server(("127.0.0.1", 0), ServesUntilTold)
    closer = threading.Thread(target=server.close)
    with LogEvent("netserve.limits", "(max_children)") as paused, Serving(server) as serving:
        clients = [connect(serving.address) for _ in range(3)]
        try:
            for client in clients[:2]:
                assert client.recv(100) == b"serving\n"
            assert paused.event.wait(10)
            assert paused.messages == ["accepting paused: 2 children running (max_children)"]
            assert server.statistics().at_limit
            # The first child's exit lets the third client in.
            clients[0].sendall(b"done\n")
            assert clients[0].recv(100) == b"done\n"
            assert clients[2].recv(100) == b"serving\n"
            # At the limit again: close() returns while both children serve.
            closer.start()
            closer.join(5)
            assert not closer.is_alive()
            assert len(server.active_children or ()) == 2
        finally:
            end_held(clients)
            if closer.ident is not None:
                closer.join(10)
        assert server.wait_closed(10)


def test_at_max_connections_a_child_exit_resumes_accepting_without_a_poll() -> None:
    # A child's connection is counted out when the child is reaped: at
    # max_connections the loop must be woken by the exit itself, or, with
    # poll_interval None, it would never accept again.
    class Server(netserve.ForkingTCPServer):
        max_connections = 2

    server = Server(("127.0.0.1", 0), ServesUntilTold)
    with Serving(server, poll_interval=None) as serving:
        clients = [connect(serving.address) for _ in range(3)]
        try:
            for client in clients[:2]:
                assert client.recv(100) == b"serving\n"
            clients[0].sendall(b"done\n")
            assert clients[0].recv(100) == b"done\n"
            clients[2].settimeout(10)
            assert clients[2].recv(100) == b"serving\n"
        finally:
            end_held(clients)
        assert server.wait_closed(10)


def _exited_child() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    return pid


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_watching_children_closes_every_pidfd_and_survives_a_foreign_reap() -> None:
    # The pidfds a serving loop watches at max_children (_children.Children):
    # a pid reaped by someone else is not watched (nothing would wake for it:
    # the loop must look again on its own), an exited child's pidfd is dropped
    # at the next watch, and unwatch() closes every pidfd, even against a
    # selector that never held it (a loop that left without unwatch()).
    from netserve._models._children import Children

    exits: list[tuple[int, int]] = []
    before = _open_fds()
    foreign, ours = _exited_child(), _exited_child()
    os.waitpid(foreign, 0)  # reaped behind the owner's back
    children = Children({foreign}, lambda pid, code: exits.append((pid, code)))
    with selectors.DefaultSelector() as selector:
        assert not children.watch(selector, "exit")
        children.reap()  # forgets it
        assert children.pids == set()
        children.add(ours)
        assert children.watch(selector, "exit")
        [(key, _)] = selector.select(10)  # the exit makes the pidfd readable
        children.exited(key.fd)
        assert exits == [(foreign, 0), (ours, 0)]
        assert children.watch(selector, "exit")  # drops the readable pidfd
        assert len(selector.get_map()) == 0
    other = _exited_child()
    children.add(other)
    with selectors.DefaultSelector() as first, selectors.DefaultSelector() as second:
        assert children.watch(first, "exit")
        children.unwatch(second)
    children.reap_all()
    assert _open_fds() - before == set()

"""GreenSocket, the hub's cooperative socket: a socket's behaviour, closing, peeks."""

from __future__ import annotations

import errno
import socket
import threading
import time
from typing import Any

import pytest

import netserve
from tests.conftest import Serving, connect, recv_all


def test_green_socket_behaves_like_a_socket() -> None:
    seen: dict[str, Any] = {}

    class Handler(netserve.BaseRequestHandler):
        def handle(self) -> None:
            sock = self.request
            seen["is_socket"] = isinstance(sock, socket.socket)
            seen["is_green"] = isinstance(sock, netserve.GreenSocket)
            seen["peer"] = sock.getpeername()
            seen["timeout"] = sock.gettimeout()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            seen["nodelay"] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            seen["recv"] = sock.recv(5)
            buffer = bytearray(5)
            seen["recv_into"] = (sock.recv_into(buffer, 5), bytes(buffer))
            sock.send(b"send;")
            sock.sendall(b"sendall;" * 10000)  # larger than the send buffer
            with sock.makefile("rwb") as f:
                seen["makefile"] = f.readline()
                f.write(b"via file\n")
                f.flush()
            sock.settimeout(0)
            seen["blocking"] = sock.getblocking()
            try:
                sock.recv(10)
            except BlockingIOError:
                seen["nonblocking"] = True
            sock.settimeout(0.05)
            try:
                sock.recv(10)
            except TimeoutError:
                seen["timeout_error"] = True
            with pytest.raises(ValueError, match="out of range"):
                sock.settimeout(-1)
            sock.shutdown(socket.SHUT_WR)

    with Serving(netserve.GreenTCPServer(("127.0.0.1", 0), Handler)) as serving:
        with connect(serving.address) as client:
            client.sendall(b"helloworld" + b"line\n")
            received = recv_all(client)
            assert seen["peer"] == client.getsockname()
    assert received == b"send;" + b"sendall;" * 10000 + b"via file\n"
    assert seen["is_socket"]
    assert seen["is_green"]
    assert seen["timeout"] is None
    assert seen["nodelay"] == 1
    assert seen["recv"] == b"hello"
    assert seen["recv_into"] == (5, b"world")
    assert seen["makefile"] == b"line\n"
    assert seen["blocking"] is False
    assert seen["nonblocking"]
    assert seen["timeout_error"]


@pytest.mark.parametrize("timeout", [None, 60.0])
def test_closing_a_socket_wakes_its_waiter(timeout: float | None) -> None:
    # A handler waits in recv() on its socket; another handler on the same hub
    # closes that socket. The waiter must wake with EBADF: the closed descriptor
    # has left epoll, so no event will ever wake it otherwise. (With a timeout
    # the wait goes through the hub's timed wait, without one it switches to
    # the hub directly: both must be woken.)
    outcome: list[Any] = []
    waiting = threading.Event()
    woken = threading.Event()

    class Handler(netserve.BaseRequestHandler):
        def handle(self) -> None:
            server: Any = self.server
            if self.request.recv(100) == b"wait":
                self.request.settimeout(timeout)
                server.waiter = self.request
                waiting.set()
                try:
                    # Its client sends nothing more: only the close can end this.
                    outcome.append(self.request.recv(100))
                except OSError as exc:
                    outcome.append(exc.errno)
                woken.set()
            else:
                server.waiter.close()
                self.request.sendall(b"closed")

    class Server(netserve.GreenTCPServer):
        # If the waiter is never woken, server_close() ends it rather than
        # waiting for it forever.
        block_on_close = False

    with Serving(Server(("127.0.0.1", 0), Handler)) as serving:
        with connect(serving.address) as first:
            first.sendall(b"wait")
            assert waiting.wait(10)
            # The hub runs one greenlet at a time: the next handler runs only
            # once the first is suspended in its recv().
            with connect(serving.address) as second:
                second.sendall(b"close it")
                assert recv_all(second) == b"closed"
            assert woken.wait(5), "the handler waiting on the closed socket was not woken"
    assert outcome == [errno.EBADF]


def test_green_makefile_modes() -> None:
    seen: dict[str, Any] = {}

    class Handler(netserve.BaseRequestHandler):
        def handle(self) -> None:
            sock = self.request
            with sock.makefile("rb", buffering=0) as raw:
                seen["raw"] = raw.read(3)  # unbuffered: reads no further
            with sock.makefile("r", encoding="ascii", newline="") as text:
                seen["text"] = text.readline()
            with sock.makefile("w", encoding="ascii") as out:
                out.write("text out\n")
            for bad in ("x", "rt", ""):
                try:
                    sock.makefile(bad)
                except ValueError:
                    seen.setdefault("refused", []).append(bad)
            try:
                sock.makefile("r", buffering=0)
            except ValueError:
                seen["unbuffered_text"] = "refused"

    with Serving(netserve.GreenTCPServer(("127.0.0.1", 0), Handler)) as serving:
        with connect(serving.address) as client:
            client.sendall(b"abca line\r\n")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"text out\n"
    assert seen == {
        "text": "a line\r\n",
        "raw": b"abc",
        "refused": ["x", "rt", ""],
        "unbuffered_text": "refused",
    }


# -- peeks -------------------------------------------------------------------------------

HEADER = 16


class PeekingServer(netserve.GreenTCPServer):
    """A handler that peeks until it has a whole header (a PROXY or TLS sniffer
    does), beside quick ones; ``events`` says in which order they finished."""

    block_on_close = False

    def __init__(self, *args: Any, max_peeks: int, until_served: bool = False) -> None:
        super().__init__(*args)
        self.max_peeks = max_peeks
        self.until_served = until_served  # stop peeking once a quick one is served
        self.events: list[str] = []
        self.peeks = 0
        self.cpu = 0.0
        self.peeking = threading.Event()


class Peeker(netserve.BaseRequestHandler):
    server: PeekingServer

    def handle(self) -> None:
        sock = self.request
        if sock.recv(1, socket.MSG_PEEK) == b"q":
            line = sock.recv(100)
            self.server.events.append("quick")
            sock.sendall(line.upper())
            return
        server = self.server
        start = time.thread_time()  # the hub's thread: this handler's CPU
        while server.peeks < server.max_peeks:
            data = sock.recv(HEADER, socket.MSG_PEEK)
            server.peeks += 1
            server.peeking.set()
            if len(data) >= HEADER or not data:
                break
            if server.until_served and server.events:
                break
        server.cpu = time.thread_time() - start
        server.events.append("header")
        sock.sendall(sock.recv(HEADER))


def test_a_peek_that_sees_nothing_new_waits_for_more() -> None:
    # The client trickles its header a few bytes per 100 ms. A peek that found
    # the same bytes as the last one used to return them at once: the handler
    # spun, never letting the hub serve anyone else, and burned a core. (Waiting,
    # it peeks about twice per piece; the bound ends a spin.)
    server = PeekingServer(("127.0.0.1", 0), Peeker, max_peeks=100_000)
    with Serving(server) as serving, connect(serving.address) as slow:
        slow.sendall(b"head")
        assert server.peeking.wait(10)
        with connect(serving.address) as quick:
            quick.sendall(b"quick\n")
            assert quick.recv(100) == b"QUICK\n"
        assert server.events == ["quick"], "the peeking handler did not wait"
        for piece in (b"er, i", b"n pie", b"ces"):
            time.sleep(0.1)  # the trickle's pace, not a wait for anything
            slow.sendall(piece)
        assert slow.recv(100) == b"header, in piece"
    assert server.events == ["quick", "header"]
    assert server.peeks <= 20
    # Spinning, the handler took about as much CPU as the 0.3 s it waited.
    assert server.cpu < 0.1


def test_a_peeks_wait_honours_the_timeout() -> None:
    outcome: list[Any] = []

    class Handler(netserve.BaseRequestHandler):
        def handle(self) -> None:
            sock = self.request
            sock.settimeout(0.2)
            outcome.append(sock.recv(HEADER, socket.MSG_PEEK))
            try:
                sock.recv(HEADER, socket.MSG_PEEK)  # nothing more comes
            except TimeoutError:
                outcome.append("timed out")
            # The bytes are still there, for a read at once.
            outcome.append(sock.recv(HEADER))

    with Serving(netserve.GreenTCPServer(("127.0.0.1", 0), Handler)) as serving:
        with connect(serving.address) as client:
            client.sendall(b"part")
            assert recv_all(client) == b""
    assert outcome == [b"part", "timed out", b"part"]


def test_reads_after_a_peek_take_the_bytes_at_once() -> None:
    outcome: list[Any] = []

    class Handler(netserve.StreamRequestHandler):
        def handle(self) -> None:
            sock = self.request
            sock.settimeout(10)  # a wrong wait fails the test instead of hanging it
            outcome.append(sock.recv(HEADER, socket.MSG_PEEK))
            outcome.append(sock.recv(3))  # part of what the peek saw
            sock.settimeout(None)
            outcome.append(sock.recv(HEADER, socket.MSG_PEEK))  # the rest: new to a peek
            outcome.append(self.rfile.readline())  # the file's path, after a peek
            self.wfile.write(b"more?\n")
            outcome.append(sock.recv(HEADER, socket.MSG_PEEK))

    with Serving(netserve.GreenTCPServer(("127.0.0.1", 0), Handler)) as serving:
        with connect(serving.address) as client:
            client.sendall(b"abcdef\n")
            assert client.recv(100) == b"more?\n"
            client.sendall(b"more\n")
            assert recv_all(client) == b""
    assert outcome == [b"abcdef\n", b"abc", b"def\n", b"def\n", b"more\n"]


def test_a_peek_after_the_peer_hung_up_returns_at_once_and_lets_others_run() -> None:
    # No more bytes can come: the peek returns what there is, as a plain
    # socket's would, but a handler that peeks in a loop must not stall the hub:
    # it peeks until the quick one is served (or a spin reaches the bound).
    server = PeekingServer(("127.0.0.1", 0), Peeker, max_peeks=100_000, until_served=True)
    with Serving(server) as serving, connect(serving.address) as slow:
        slow.sendall(b"head")
        assert server.peeking.wait(10)
        slow.shutdown(socket.SHUT_WR)
        with connect(serving.address) as quick:
            quick.sendall(b"quick\n")
            assert quick.recv(100) == b"QUICK\n"
        assert slow.recv(100) == b"head"
    assert server.events == ["quick", "header"]
    assert 1 < server.peeks < 100_000

"""Connection stages under every model: a PROXY-style stage and a TLS stage, each
written once as a mix-in, with stalls, failures and the stage deadline."""

from __future__ import annotations

import io
import socket
import ssl
import threading
from typing import Any

import pytest
import trustme

import netserve
from netserve._core._stages import DONE, READ, WRITE, Connection, Stage
from tests.conftest import Serving, connect, recv_all
from tests.models import MODELS

# -- a PROXY-style stage: "FROM host port\n" before the payload ----------------------------


class FromHeader(Stage):
    """Reads a header line in chunks, reading ahead on purpose, and gives the
    bytes past it back: the handler must still see them."""

    LIMIT = 64

    def __init__(self) -> None:
        self.buffer = b""

    def advance(self, conn: Connection) -> int:
        while b"\n" not in self.buffer:
            chunk = conn.recv(32)
            if chunk is None:
                return READ
            if not chunk:
                raise netserve.StageError("closed before the header")
            self.buffer += chunk
            if len(self.buffer) > self.LIMIT:
                raise netserve.StageError("header too long")
        line, _, rest = self.buffer.partition(b"\n")
        word, host, port = line.decode().split(" ")
        if word != "FROM":
            raise netserve.StageError(f"not a header: {line!r}")
        conn.client_address = (host, int(port))
        conn.pushback(rest)
        return DONE


class FromHeaderMixIn:
    def _netserve_stages(self) -> list[Stage]:
        return [FromHeader(), *super()._netserve_stages()]  # type: ignore[misc]


class Report(netserve.StreamRequestHandler):
    """Answers each line with the client address it sees and the line upper-cased."""

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(f"{self.client_address} ".encode() + line.upper())


class Quiet:
    errors: list[Any]

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.errors.append(client_address)


def server_with(mixin: type, model: str, handler: type, **attributes: Any) -> Any:
    cls = type("Server", (Quiet, mixin, MODELS[model].tcp), {"errors": [], **attributes})
    return cls(("127.0.0.1", 0), handler)


@pytest.fixture(params=sorted(MODELS))
def model(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_a_stage_replaces_the_client_address_and_its_read_ahead_reaches_the_handler(
    model: str,
) -> None:
    server = server_with(FromHeaderMixIn, model, Report)
    with Serving(server, close=False) as serving:
        with connect(serving.address) as client:
            # Header and payload in one write: the stage reads past the header.
            client.sendall(b"FROM 10.1.2.3 4444\nhello\nworld\n")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == (b"('10.1.2.3', 4444) HELLO\n('10.1.2.3', 4444) WORLD\n")
        with connect(serving.address) as client:
            for piece in (b"FR", b"OM 10.9.9.9 ", b"7\nab", b"c\n"):
                client.sendall(piece)
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"('10.9.9.9', 7) ABC\n"
    server.server_close()
    stats = server.statistics()
    assert (stats.handled, stats.stage_failures, stats.timeouts, stats.active) == (2, 0, 0, 0)
    assert server.errors == []


class Raw(netserve.BaseRequestHandler):
    """Reads with self.request.recv(): the pushed-back bytes come first there too."""

    def handle(self) -> None:
        data = b""
        while chunk := self.request.recv(3):
            data += chunk
        self.request.sendall(data.upper())


def test_pushed_back_bytes_reach_request_recv(model: str) -> None:
    server = server_with(FromHeaderMixIn, model, Raw)
    with Serving(server) as serving, connect(serving.address) as client:
        client.sendall(b"FROM 1.2.3.4 5\npayload after the header")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b"PAYLOAD AFTER THE HEADER"


def test_a_rejected_header_closes_the_connection_without_handle_error(model: str) -> None:
    server = server_with(FromHeaderMixIn, model, Report)
    with Serving(server, close=False) as serving:
        with connect(serving.address) as client:
            client.sendall(b"GET / HTTP/1.0\n")
            assert recv_all(client) == b""
    server.server_close()
    stats = server.statistics()
    assert (stats.stage_failures, stats.handled, stats.errors, stats.active) == (1, 0, 0, 0)
    assert server.errors == []


@pytest.mark.parametrize("model", ["threading", "forking", "pool", "hub"])
def test_a_stalled_stage_does_not_delay_another_client(model: str) -> None:
    server = server_with(FromHeaderMixIn, model, Report, max_workers=1)
    with Serving(server) as serving, connect(serving.address) as stalled:
        stalled.sendall(b"FROM 10.0.0")  # and nothing more
        with connect(serving.address) as client:
            client.settimeout(5)
            client.sendall(b"FROM 10.0.0.2 2\nhi\n")
            assert client.recv(100) == b"('10.0.0.2', 2) HI\n"
            # shutdown(), not only close(): a forked child holds copies of this
            # process's client sockets, which would keep the connections open.
            client.shutdown(socket.SHUT_WR)
        stalled.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("model", ["sync", "threading", "pool", "hub"])
def test_abort_connections_ends_a_connection_stalled_in_its_stage(model: str) -> None:
    # The hub ended its handlers' greenlets, but one in a stage was neither
    # closed nor counted out: it stayed open past server_close(), for good.
    # (Forking: the child runs the stage, and SIGTERM ends it: test_closing.)
    waiting = threading.Event()

    class Stalled(FromHeader):
        def advance(self, conn: Connection) -> int:
            outcome = super().advance(conn)
            if outcome == READ:
                waiting.set()
            return outcome

    class StalledMixIn:
        def _netserve_stages(self) -> list[Stage]:
            return [Stalled(), *super()._netserve_stages()]  # type: ignore[misc]

    server = server_with(StalledMixIn, model, Report)
    with Serving(server) as serving, connect(serving.address) as stalled:
        stalled.sendall(b"FROM 10.0.0")  # and nothing more: the stage waits
        assert waiting.wait(10)
        server.abort_connections()
        assert server.wait_closed(10), server.statistics()
        assert recv_all(stalled) == b""
        stats = server.statistics()
        assert (stats.stage_failures, stats.handled, stats.active) == (1, 0, 0), stats
    assert server.errors == []


@pytest.mark.parametrize("model", sorted(MODELS))
def test_the_stage_deadline_ends_a_stalled_stage(model: str) -> None:
    server = server_with(FromHeaderMixIn, model, Report, stage_timeout=0.3)
    with Serving(server, close=False) as serving:
        with connect(serving.address) as stalled:
            stalled.sendall(b"FROM 10.0.0")
            assert recv_all(stalled) == b""  # closed at the deadline
        # Served after it (sync: only after it).
        with connect(serving.address) as client:
            client.sendall(b"FROM 10.0.0.2 2\nhi\n")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"('10.0.0.2', 2) HI\n"
    server.server_close()
    stats = server.statistics()
    assert (stats.timeouts, stats.stage_failures, stats.handled) == (1, 0, 1)


def test_stalled_stages_take_no_pool_worker() -> None:
    server = server_with(FromHeaderMixIn, "pool", Report, max_workers=2)
    with Serving(server) as serving:
        stalled = [connect(serving.address) for _ in range(12)]
        try:
            for sock in stalled:
                sock.sendall(b"FROM 1")
            with connect(serving.address) as client:
                client.sendall(b"FROM 10.0.0.2 2\nhi\n")
                assert client.recv(100) == b"('10.0.0.2', 2) HI\n"
                stats = server.statistics()
                assert stats.parked == 12  # the stalled ones, in their stage
                assert stats.busy_workers == 1
        finally:
            for sock in stalled:
                sock.close()


# -- a TLS stage: the handshake as a stage, then a TLS stream as the request ------------------


class TLSHandshake(Stage):
    """A server-side TLS handshake on ssl.SSLObject and memory BIOs, driven by the
    stage's non-blocking calls; the request becomes a TLSStream."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.pending = b""

    def advance(self, conn: Connection) -> int:
        while True:
            if self.pending or self.outgoing.pending:
                self.pending += self.outgoing.read()
                sent = conn.send(self.pending)
                if sent is None:
                    return WRITE
                self.pending = self.pending[sent:]
                continue
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                if self.outgoing.pending:
                    continue
                data = conn.recv(65536)
                if data is None:
                    return READ
                if not data:
                    raise netserve.StageError("closed during the handshake") from None
                self.incoming.write(data)
                continue
            if self.outgoing.pending:
                continue
            conn.request = TLSStream(conn.request, self.tls, self.incoming, self.outgoing)
            return DONE


class TLSStream:
    """The handler's view of a TLS connection: socket-like, over the request's own
    (blocking, or cooperative on the hub) recv and sendall."""

    def __init__(
        self, sock: Any, tls: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO
    ) -> None:
        self._sock, self._tls, self._in, self._out = sock, tls, incoming, outgoing

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def recv(self, size: int, flags: int = 0) -> bytes:
        while True:
            try:
                return self._tls.read(size)
            except ssl.SSLWantReadError:
                data = self._sock.recv(65536)
                if not data:
                    return b""
                self._in.write(data)
            except ssl.SSLZeroReturnError:
                return b""

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        with memoryview(buffer) as view:
            data = self.recv(nbytes or view.nbytes)
            view[: len(data)] = data
        return len(data)

    def sendall(self, data: Any, flags: int = 0) -> None:
        self._tls.write(bytes(data))
        self._sock.sendall(self._out.read())

    def send(self, data: Any, flags: int = 0) -> int:
        self.sendall(data)
        return len(data)

    def makefile(self, mode: str = "r", buffering: int | None = None, **_: Any) -> Any:
        stream = self

        class Raw(io.RawIOBase):
            def readable(self) -> bool:
                return True

            def readinto(self, buffer: Any) -> int:
                return stream.recv_into(buffer)

        return io.BufferedReader(Raw())


@pytest.fixture(scope="module")
def certificates() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    return server_context, client_context


def tls_mixin(context: ssl.SSLContext) -> type:
    class TLSMixIn:
        def _netserve_stages(self) -> list[Stage]:
            return [*super()._netserve_stages(), TLSHandshake(context)]  # type: ignore[misc]

    return TLSMixIn


class TLSEcho(netserve.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line.upper())
            if line == b"bye\n":
                return


def test_a_tls_stage_serves_every_model(
    model: str, certificates: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_context, client_context = certificates
    server = server_with(tls_mixin(server_context), model, TLSEcho)
    forked = threading.Event()
    if model == "forking":
        # The client's handshake waits until the server has forked: a fork while
        # this process's thread is inside OpenSSL can copy a lock it holds into
        # the child, which then never gets it (a deadlock of fork and threads).
        fork = server.process_request

        def process_request(request: Any, client_address: Any) -> None:
            fork(request, client_address)
            forked.set()

        server.process_request = process_request
    else:
        forked.set()
    with Serving(server) as serving:
        for _ in range(2):
            with connect(serving.address) as raw:
                assert forked.wait(10)
                if model == "forking":
                    forked.clear()
                with client_context.wrap_socket(raw, server_hostname="localhost") as client:
                    client.sendall(b"secret\n")
                    assert client.recv(100) == b"SECRET\n"
                    client.sendall(b"bye\n")
                    assert client.recv(100) == b"BYE\n"


@pytest.mark.parametrize("model", ["threading", "pool", "hub"])
def test_a_stalled_handshake_does_not_delay_another_client(
    model: str, certificates: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_context, client_context = certificates
    server = server_with(tls_mixin(server_context), model, TLSEcho, max_workers=1)
    with Serving(server) as serving, connect(serving.address) as stalled:
        stalled.sendall(b"\x16\x03\x01\x00")  # the start of a ClientHello, no more
        done = threading.Event()
        with connect(serving.address) as raw:
            with client_context.wrap_socket(raw, server_hostname="localhost") as client:
                client.sendall(b"hi\n")
                assert client.recv(100) == b"HI\n"
                done.set()
                client.sendall(b"bye\n")
                assert client.recv(100) == b"BYE\n"
        assert done.is_set()

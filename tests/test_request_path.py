"""The template-method chain: order of hooks, error paths, what is closed when."""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest

import netserve
from tests.conftest import Serving, connect, recv_all
from tests.models import MODELS


class Recorder(netserve.TCPServer):
    """A TCP server that records every hook call in order."""

    def __init__(self, handler: type, **kwargs: Any) -> None:
        self.calls: list[str] = []
        super().__init__(("127.0.0.1", 0), handler, **kwargs)

    def server_bind(self) -> None:
        self.calls.append("server_bind")
        super().server_bind()

    def server_activate(self) -> None:
        self.calls.append("server_activate")
        super().server_activate()

    def get_request(self) -> Any:
        self.calls.append("get_request")
        return super().get_request()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.calls.append("verify_request")
        return super().verify_request(request, client_address)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.calls.append("process_request")
        super().process_request(request, client_address)

    def finish_request(self, request: Any, client_address: Any) -> None:
        self.calls.append("finish_request")
        super().finish_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.calls.append("shutdown_request")
        super().shutdown_request(request)

    def close_request(self, request: Any) -> None:
        self.calls.append("close_request")
        super().close_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.calls.append("handle_error")

    def handle_timeout(self) -> None:
        self.calls.append("handle_timeout")


class Echo(netserve.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.readline())


def test_hooks_run_in_documented_order() -> None:
    with Recorder(Echo) as server, connect(server.server_address) as client:
        client.sendall(b"hi\n")
        server.handle_request()
        assert recv_all(client) == b"hi\n"
    assert server.calls == [
        "server_bind",
        "server_activate",
        "get_request",
        "verify_request",
        "process_request",
        "finish_request",
        "shutdown_request",
        "close_request",
    ]


def test_bind_and_activate_false_defers_both() -> None:
    server = Recorder(Echo, bind_and_activate=False)
    try:
        assert server.calls == []
        assert server.server_address == ("127.0.0.1", 0)
        server.server_bind()
        server.server_activate()
        assert server.server_address[1] != 0
        assert server.server_address == server.socket.getsockname()
    finally:
        server.server_close()


def test_refused_request_is_shut_down_without_handling() -> None:
    handled = []

    class Handler(netserve.BaseRequestHandler):
        def handle(self) -> None:
            handled.append(True)

    class Refusing(Recorder):
        def verify_request(self, request: Any, client_address: Any) -> bool:
            super().verify_request(request, client_address)
            return False

    with Refusing(Handler) as server, connect(server.server_address) as client:
        server.handle_request()
        assert recv_all(client) == b""  # the server closed it
    assert handled == []
    assert server.calls[2:] == [
        "get_request",
        "verify_request",
        "shutdown_request",
        "close_request",
    ]


def test_exception_goes_to_handle_error_then_shutdown_request() -> None:
    class Failing(netserve.BaseRequestHandler):
        def handle(self) -> None:
            raise ValueError("boom")

    with Recorder(Failing) as server, connect(server.server_address):
        server.handle_request()
    assert server.calls[-3:] == ["handle_error", "shutdown_request", "close_request"]


class Stop(BaseException):
    """A non-Exception BaseException, like SystemExit or KeyboardInterrupt."""


def test_base_exception_shuts_request_down_then_propagates() -> None:
    class Exiting(netserve.BaseRequestHandler):
        def handle(self) -> None:
            raise Stop

    with Recorder(Exiting) as server, connect(server.server_address) as client:
        with pytest.raises(Stop):
            server.handle_request()
        assert recv_all(client) == b""
    assert "handle_error" not in server.calls
    assert server.calls[-2:] == ["shutdown_request", "close_request"]


def test_handler_system_exit_is_not_handled() -> None:
    class Exiting(netserve.BaseRequestHandler):
        def handle(self) -> None:
            raise SystemExit(3)

    with Recorder(Exiting) as server, connect(server.server_address):
        with pytest.raises(SystemExit):
            server.handle_request()
    assert "handle_error" not in server.calls
    # Counted as an error, as in every model.
    stats = server.statistics()
    assert (stats.handled, stats.errors, stats.active) == (1, 1, 0), stats


def test_get_request_oserror_skips_the_request() -> None:
    class Flaky(Recorder):
        def get_request(self) -> Any:
            conn, _ = self.socket.accept()
            conn.close()
            raise ConnectionAbortedError("gone before we got it")

    with Flaky(Echo) as server, connect(server.server_address):
        server.handle_request()  # does not raise
    assert server.calls[2:] == []  # nothing else ran


def test_verify_request_exception_reaches_handle_error_and_closes() -> None:
    # A deliberate difference: the stdlib lets this escape and leaks the socket.
    class Broken(Recorder):
        def verify_request(self, request: Any, client_address: Any) -> bool:
            raise RuntimeError("bad check")

    with Broken(Echo) as server, connect(server.server_address) as client:
        server.handle_request()
        assert recv_all(client) == b""
    assert server.calls[2:] == ["get_request", "handle_error", "shutdown_request", "close_request"]


def test_handle_request_times_out_on_server_timeout() -> None:
    class Quick(Recorder):
        timeout = 0.01

    with Quick(Echo) as server:
        server.handle_request()
    assert server.calls[-1] == "handle_timeout"
    assert "get_request" not in server.calls


def test_handle_request_uses_the_smaller_of_socket_and_server_timeouts() -> None:
    class Patient(Recorder):
        timeout = 3600.0

    with Patient(Echo) as server:
        server.socket.settimeout(0.01)
        server.handle_request()  # would hang for an hour on the server's timeout
    assert server.calls[-1] == "handle_timeout"


def test_failed_bind_leaks_no_descriptor() -> None:
    with netserve.TCPServer(("127.0.0.1", 0), Echo) as taken:
        for _ in range(50):
            with pytest.raises(OSError):
                netserve.TCPServer(taken.server_address, Echo)
        with pytest.raises(OverflowError):
            netserve.TCPServer(("127.0.0.1", -1), Echo)
    # The autouse leak check fails this test if any of those sockets stayed open.


def test_failed_activate_closes_the_socket() -> None:
    sockets: list[socket.socket] = []

    class NoListen(netserve.TCPServer):
        def server_activate(self) -> None:
            sockets.append(self.socket)
            raise OSError("cannot listen")

    with pytest.raises(OSError, match="cannot listen"):
        NoListen(("127.0.0.1", 0), Echo)
    assert sockets[0].fileno() == -1


def test_context_manager_closes_the_socket() -> None:
    with netserve.TCPServer(("127.0.0.1", 0), Echo) as server:
        assert server.fileno() == server.socket.fileno() >= 0
    assert server.socket.fileno() == -1


def test_server_address_is_the_bound_address() -> None:
    with netserve.TCPServer(("127.0.0.1", 0), Echo) as server:
        host, port = server.server_address
        assert host == "127.0.0.1"
        assert port > 0


def test_ipv6_server() -> None:
    class V6(netserve.TCPServer):
        address_family = socket.AF_INET6

    with V6(("::1", 0), Echo) as server, connect(server.server_address, socket.AF_INET6) as c:
        c.sendall(b"six\n")
        server.handle_request()
        assert recv_all(c) == b"six\n"


@pytest.mark.parametrize("reuse_port", [False, True])
@pytest.mark.parametrize("reuse_address", [False, True])
def test_reuse_options(reuse_address: bool, reuse_port: bool) -> None:
    class Server(netserve.TCPServer):
        allow_reuse_address = reuse_address
        allow_reuse_port = reuse_port

    with Server(("127.0.0.1", 0), Echo) as server:
        sock = server.socket
        assert bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)) == reuse_address
        assert bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)) == reuse_port


def test_reuse_port_is_not_applied_to_unix_sockets(unix_path: str) -> None:
    class Server(netserve.UnixStreamServer):
        allow_reuse_port = True

    with Server(unix_path, Echo) as server:
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0


def test_server_activate_listens_with_request_queue_size() -> None:
    class Server(netserve.TCPServer):
        request_queue_size = 3

    server = Server(("127.0.0.1", 0), Echo, bind_and_activate=False)
    real = server.socket
    backlogs: list[int] = []

    class ListenSpy:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def listen(self, backlog: int) -> None:
            backlogs.append(backlog)
            real.listen(backlog)

    server.socket = ListenSpy()  # type: ignore[assignment]
    try:
        server.server_bind()
        server.server_activate()
    finally:
        server.socket = real
        server.server_close()
    assert backlogs == [3]


def test_base_server_without_fileno_says_what_is_missing() -> None:
    server = netserve.BaseServer(("127.0.0.1", 0), Echo)
    with pytest.raises(NotImplementedError, match="fileno"):
        server.fileno()


def _handler_shapes(log: list[Any]) -> dict[str, type]:
    """Handler classes that calling a class treats differently."""

    class Plain(netserve.BaseRequestHandler):
        def handle(self) -> None:
            log.append(("handle", self.request, self.client_address))

    class OwnNew(netserve.BaseRequestHandler):
        def __new__(cls, *args: Any) -> Any:
            log.append(("new", args[:2]))
            return super().__new__(cls)

        def handle(self) -> None:
            log.append(("handle", self.request))

    class Meta(type):
        def __call__(cls, *args: Any) -> Any:
            log.append(("meta", args[:2]))
            return super().__call__(*args)

    class WithMeta(netserve.BaseRequestHandler, metaclass=Meta):
        def handle(self) -> None:
            log.append(("handle", self.request))

    class Elsewhere(netserve.BaseRequestHandler):
        def __new__(cls, *args: Any) -> Any:
            return Plain(*args)  # not an instance of cls: its __init__ is skipped

        def handle(self) -> None:
            log.append(("never",))

    class ReturnsValue(netserve.BaseRequestHandler):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            return 42  # type: ignore[return-value]  # noqa: PLE0101 (the point)

    return {
        "plain": Plain,
        "own __new__": OwnNew,
        "metaclass __call__": WithMeta,
        "__new__ of another class": Elsewhere,
        "__init__ returning a value": ReturnsValue,
    }


@pytest.mark.parametrize(
    "shape",
    [
        "plain",
        "own __new__",
        "metaclass __call__",
        "__new__ of another class",
        "__init__ returning a value",
    ],
)
def test_finish_request_instantiates_as_calling_the_class_does(shape: str) -> None:
    # netserve instantiates plain handler classes in two steps (see
    # finish_request); every other shape must see what the stdlib's call does.
    import socketserver

    outcomes = []
    for module in (netserve, socketserver):
        log: list[Any] = []
        handler_class = _handler_shapes(log)[shape]
        server = module.TCPServer(("127.0.0.1", 0), handler_class, bind_and_activate=False)
        try:
            server.finish_request("the request", ("127.0.0.1", 1))
        except TypeError as exc:
            log.append(("TypeError", str(exc)))
        finally:
            server.server_close()
        outcomes.append(log)
    assert outcomes[0] == outcomes[1]
    assert outcomes[0]  # something happened


@pytest.mark.parametrize("model", ["sync", "threading", "forking", "pool"])
def test_a_process_request_that_handles_the_request_itself_is_counted(model: str) -> None:
    # The stdlib documents process_request()'s body as finish_request() then
    # shutdown_request(); a mix-in that overrides it with that body, without
    # calling netserve's, must not leave the request counted as open for ever
    # (active stuck above zero, wait_closed() never true).
    class Echo(netserve.StreamRequestHandler):
        def handle(self) -> None:
            self.wfile.write(self.rfile.readline().upper())

    # The second request's process_request() is held after it closed the
    # connection: until it returns, the request is still the server's, and
    # wait_closed() says so (the client's end of stream comes first).
    held = threading.Event()
    release = threading.Event()

    class Inline:
        def process_request(self, request: Any, client_address: Any) -> None:
            self.finish_request(request, client_address)  # type: ignore[attr-defined]
            self.shutdown_request(request)  # type: ignore[attr-defined]
            if held.is_set():
                assert release.wait(10)
            held.set()

    base = MODELS[model].tcp
    server = type(f"Inline{base.__name__}", (Inline, base), {})(("127.0.0.1", 0), Echo)
    with Serving(server) as serving:
        try:
            for word in (b"one", b"two"):
                with connect(serving.address) as client:
                    client.sendall(word + b"\n")
                    assert recv_all(client) == word.upper() + b"\n"
            assert not server.wait_closed(0.2), server.statistics()
        finally:
            release.set()
        assert server.wait_closed(5), server.statistics()
        stats = server.statistics()
    assert (stats.accepted, stats.handled, stats.errors, stats.active) == (2, 2, 0, 0), stats

"""What handle_error receives and prints, compared with the stdlib's own output."""

from __future__ import annotations

import re
import socketserver  # the stdlib's, for differential checks only
import sys
from typing import Any

import pytest

import netserve
from tests.conftest import connect


def _failing_handler(base: type) -> type:
    class Failing(base):  # type: ignore[misc, valid-type]
        def handle(self) -> None:
            raise ValueError("handler failed")

    return Failing


def _run_failing_request(module: Any, capsys: pytest.CaptureFixture[str]) -> tuple[str, Any]:
    handler = _failing_handler(module.BaseRequestHandler)
    with module.TCPServer(("127.0.0.1", 0), handler) as server:
        with connect(server.server_address) as client:
            server.handle_request()
            address = client.getsockname()
    return capsys.readouterr().err, address


def _normalise(output: str, address: Any) -> list[str]:
    lines = output.replace(str(address), "<ADDR>").splitlines()
    # Tracebacks differ in the frames that belong to each library; keep the
    # frame lines out and compare the shape around them.
    return [line for line in lines if not line.startswith("  ")]


def test_default_handle_error_output_matches_the_stdlib(
    capsys: pytest.CaptureFixture[str],
) -> None:
    ours, our_address = _run_failing_request(netserve, capsys)
    theirs, their_address = _run_failing_request(socketserver, capsys)
    assert _normalise(ours, our_address) == _normalise(theirs, their_address)
    lines = ours.splitlines()
    assert lines[0] == "-" * 40
    assert lines[1] == f"Exception occurred during processing of request from {our_address}"
    assert lines[2] == "Traceback (most recent call last):"
    assert lines[-2] == "ValueError: handler failed"
    assert lines[-1] == "-" * 40


def test_handle_error_sees_the_exception_being_handled() -> None:
    seen: dict[str, Any] = {}

    class Server(netserve.TCPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            seen["exc"] = sys.exc_info()[1]
            seen["request"] = request
            seen["address"] = client_address
            seen["open"] = request.fileno() != -1

    handler = _failing_handler(netserve.BaseRequestHandler)
    with Server(("127.0.0.1", 0), handler) as server, connect(server.server_address) as c:
        server.handle_request()
        assert seen["address"] == c.getsockname()
    assert isinstance(seen["exc"], ValueError)
    # The request is still open while handle_error looks at it; closed after.
    assert seen["open"] is True
    assert seen["request"].fileno() == -1


def test_handle_error_is_not_called_for_keyboard_interrupt() -> None:
    called: list[bool] = []

    class Handler(netserve.BaseRequestHandler):
        def handle(self) -> None:
            raise KeyboardInterrupt

    class Server(netserve.TCPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            called.append(True)

    with Server(("127.0.0.1", 0), Handler) as server, connect(server.server_address):
        with pytest.raises(KeyboardInterrupt):
            server.handle_request()
    assert called == []


def test_handle_error_output_names_the_udp_client(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    handler = _failing_handler(netserve.DatagramRequestHandler)
    with netserve.UDPServer(("127.0.0.1", 0), handler) as server:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(10)
            client.sendto(b"x", server.server_address)
            server.handle_request()
            address = client.getsockname()
            # finish() still replied: an empty datagram
            assert client.recv(10) == b""
    err = capsys.readouterr().err
    assert re.search(rf"request from \('127\.0\.0\.1', {address[1]}\)\n", err)

"""Stdlib handler classes served by netserve servers, with real clients."""

from __future__ import annotations

import functools
import http.client
import http.server
from pathlib import Path

import pytest

import netserve
from tests.conftest import Serving


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "hello.txt").write_bytes(b"hello from netserve\n")
    return tmp_path


class QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass  # keep the test output to what fails


@pytest.mark.parametrize(
    "server_class", [netserve.TCPServer, netserve.ThreadingTCPServer, netserve.ForkingTCPServer]
)
def test_simple_http_request_handler(server_class: type, site: Path) -> None:
    handler = functools.partial(QuietFiles, directory=str(site))
    with Serving(server_class(("127.0.0.1", 0), handler)) as serving:
        host, port = serving.address
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            conn.request("GET", "/hello.txt")
            response = conn.getresponse()
            assert response.status == 200
            assert response.read() == b"hello from netserve\n"
            assert response.getheader("Content-Type") == "text/plain"
        finally:
            conn.close()
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            conn.request("GET", "/missing")
            response = conn.getresponse()
            assert response.status == 404
            response.read()
        finally:
            conn.close()


def test_http_keep_alive_on_a_threading_server(site: Path) -> None:
    class KeepAlive(QuietFiles):
        protocol_version = "HTTP/1.1"

    handler = functools.partial(KeepAlive, directory=str(site))
    with Serving(netserve.ThreadingTCPServer(("127.0.0.1", 0), handler)) as serving:
        conn = http.client.HTTPConnection(*serving.address, timeout=10)
        try:
            for _ in range(5):  # five requests on one connection
                conn.request("GET", "/hello.txt")
                response = conn.getresponse()
                assert response.read() == b"hello from netserve\n"
        finally:
            conn.close()


def test_http_server_over_a_unix_socket(site: Path, unix_path: str) -> None:
    import socket

    handler = functools.partial(QuietFiles, directory=str(site))
    with Serving(netserve.ThreadingUnixStreamServer(unix_path, handler)):
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(10)
            client.connect(unix_path)
            client.sendall(b"GET /hello.txt HTTP/1.0\r\n\r\n")
            reply = b""
            while chunk := client.recv(4096):
                reply += chunk
    assert reply.startswith(b"HTTP/1.0 200 OK\r\n")
    assert reply.endswith(b"\r\n\r\nhello from netserve\n")

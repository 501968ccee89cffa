"""TLS served by netserve to real clients: ``openssl s_client`` and ``curl`` (both on
Debian's image; scripts/test installs them where missing), in every model."""

from __future__ import annotations

import http.server
import subprocess
from typing import Any

import netserve
from tests.conftest import Serving, tool
from tests.test_tls import Certs, certs, make, model

__all__ = ["certs", "model"]


class LineOnce(netserve.StreamRequestHandler):
    """Answers one line with what it knows of the session, then returns: the server
    closes the connection (close_notify first)."""

    def handle(self) -> None:
        line = self.rfile.readline()
        version = self.request.version()
        self.wfile.write(b"tls=" + str(version).encode() + b" line=" + line)


def test_openssl_s_client_verifies_exchanges_and_sees_a_clean_close(
    model: str, certs: Certs
) -> None:
    server = make(model, certs)(("127.0.0.1", 0), LineOnce)
    with Serving(server, close=False) as serving:
        port = serving.address[1]
        # -ign_eof: its stdin's end does not end the session; the server's close does.
        done = subprocess.run(
            [tool("openssl"), "s_client", "-connect", f"127.0.0.1:{port}",
             "-CAfile", certs.cafile, "-servername", "localhost", "-verify_return_error",
             "-ign_eof"],
            input=b"hello\n",
            capture_output=True,
            check=False,
            timeout=30,
        )  # fmt: skip
    server.server_close()
    out = done.stdout.decode(errors="replace")
    err = done.stderr.decode(errors="replace")
    assert done.returncode == 0, (out, err)
    assert "Verify return code: 0 (ok)" in out
    assert "tls=TLSv1.3 line=hello\n" in out
    # A close without close_notify makes s_client say "unexpected eof" (on stderr)
    # and exit 1; a clean one ends in "closed".
    assert "unexpected eof" not in out + err
    assert out.rstrip().endswith("closed"), out[-300:]
    stats = server.statistics()
    assert (stats.handled, stats.stage_failures, stats.errors) == (1, 0, 0)
    assert server.errors == []


class Page(http.server.BaseHTTPRequestHandler):
    """The stdlib's HTTP handler, unchanged but for its page: the path, the TLS
    version, and how many requests this connection has carried."""

    protocol_version = "HTTP/1.1"  # keep-alive: curl sends both requests on one connection

    def setup(self) -> None:
        super().setup()
        self.count = 0

    def do_GET(self) -> None:
        self.count += 1
        body = f"{self.path} {self.request.version()} #{self.count}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the test output to what fails


def test_curl_against_the_stdlib_http_handler(model: str, certs: Certs) -> None:
    server = make(model, certs)(("127.0.0.1", 0), Page)
    with Serving(server, close=False) as serving:
        port = serving.address[1]
        url = f"https://localhost:{port}"
        # --resolve: "localhost" (the certificate's name, checked) at the server's
        # address, whatever the host's resolver says first (it may be ::1).
        done = subprocess.run(
            [tool("curl"), "--silent", "--show-error", "--max-time", "20",
             "--cacert", certs.cafile, "--resolve", f"localhost:{port}:127.0.0.1",
             "--write-out", "verify=%{ssl_verify_result} connects=%{num_connects}\n",
             f"{url}/one", f"{url}/two"],
            capture_output=True,
            check=False,
            timeout=30,
        )  # fmt: skip
    server.server_close()
    out = done.stdout.decode(errors="replace")
    assert done.returncode == 0, (out, done.stderr)
    assert done.stderr == b""
    # One connection (the second request reuses it), both pages, a verified session.
    assert out == "/one TLSv1.3 #1\nverify=0 connects=1\n/two TLSv1.3 #2\nverify=0 connects=0\n"
    stats = server.statistics()
    assert (stats.handled, stats.stage_failures, stats.errors) == (1, 0, 0)
    assert server.errors == []

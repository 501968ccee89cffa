"""PROXY protocol from a real HAProxy (Debian's haproxy package; scripts/test
installs it) in front of netserve: send-proxy (v1), send-proxy-v2 with TLVs,
send-proxy-v2-ssl-cn while HAProxy terminates TLS, check-send-proxy health
checks (LOCAL), and send-proxy-v2 before a TLS stream HAProxy passes through
to netserve (every model).

HAProxy's frontends listen on sockets the test binds to port 0 and hands over
(``bind fd@N``): no fixed port, and a client can connect before HAProxy is up
(the kernel's backlog holds it), so nothing waits for readiness.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import trustme

import netserve
from tests.conftest import Serving, tool
from tests.models import MODELS
from tests.test_tls import Certs, Report, ask, certs, make, tls_client

__all__ = ["certs"]

CONFIG = """\
global
    maxconn 64
    nbthread 1
defaults
    mode tcp
    timeout connect 5s
    timeout client 10s
    timeout server 10s
    unique-id-format %ci:%cp_%fi:%fp_%rt
listen v1
    bind fd@{v1}
    server netserve {backend} send-proxy
listen v2
    bind fd@{v2}
    server netserve {backend} send-proxy-v2 proxy-v2-options {options}
listen tls
    bind fd@{tls} ssl crt {pem} alpn h2,http/1.1 verify optional ca-file {ca}
    server netserve {backend} send-proxy-v2-ssl-cn proxy-v2-options {options}
listen health
    bind fd@{health}
    server netserve {backend} send-proxy-v2 check check-send-proxy inter 100ms
"""
# Every TLV HAProxy 2.6 can add to a v2 header.
OPTIONS = "ssl,ssl-cipher,cert-sig,cert-key,crc32c,unique-id,authority"


class Seen(netserve.StreamRequestHandler):
    """Reports the client and the header it saw, then echoes one line."""

    seen: queue.Queue[dict[str, Any]]

    def handle(self) -> None:
        header = netserve.proxy_header(self.request)
        assert header is not None
        ssl_info = header.ssl
        report = {
            "client": list(self.client_address),
            "version": header.version,
            "command": header.command.name,
            "authority": header.authority,
            "alpn": None if header.alpn is None else header.alpn.decode(),
            "unique_id": None if header.unique_id is None else header.unique_id.decode(),
            "crc32c": header.crc32c is not None,
            "ssl": None
            if ssl_info is None
            else {
                "used": ssl_info.client_used_ssl,
                "client_cert": ssl_info.client_cert,
                "verified": ssl_info.verified,
                "cn": ssl_info.cn,
                "verify": ssl_info.verify,
                "version": ssl_info.version,
                "cipher": ssl_info.cipher,
                "sig_alg": ssl_info.sig_alg,
                "key_alg": ssl_info.key_alg,
            },
        }
        self.seen.put(report)
        if header.command.name == "LOCAL":
            return  # a health check says nothing more
        line = self.rfile.readline()
        self.wfile.write(json.dumps(report).encode() + b"\n" + line)


@contextlib.contextmanager
def haproxy(config: str, names: list[str], **values: Any) -> Iterator[dict[str, Any]]:
    """HAProxy running ``config`` (a template), its frontends ``bind fd@{name}`` on
    sockets bound here to port 0; yields their addresses. ``values`` fill the rest."""
    binary = tool("haproxy")
    listeners: dict[str, socket.socket] = {}
    with tempfile.TemporaryDirectory(prefix="ns-haproxy-") as directory:
        try:
            for name in names:
                sock = listeners[name] = socket.socket()
                sock.bind(("127.0.0.1", 0))
                sock.listen(16)
            path = os.path.join(directory, "haproxy.cfg")
            with open(path, "w") as file:
                file.write(config.format(**values, **{n: s.fileno() for n, s in listeners.items()}))
            with open(os.path.join(directory, "haproxy.log"), "wb") as log:
                proxy = subprocess.Popen(
                    [binary, "-f", path, "-db"],
                    pass_fds=[sock.fileno() for sock in listeners.values()],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
                try:
                    yield {n: s.getsockname() for n, s in listeners.items()}
                finally:
                    proxy.terminate()
                    proxy.wait(timeout=10)
        finally:
            for sock in listeners.values():
                sock.close()


@pytest.fixture(params=["threading", "hub"])
def behind_haproxy(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    errors: list[Any] = []

    class Server(MODELS[request.param].tcp):  # type: ignore[misc, name-defined]
        proxy_protocol = "any"
        proxy_trusted = ["127.0.0.1"]

        def handle_error(self, request: Any, client_address: Any) -> None:
            errors.append((client_address, __import__("traceback").format_exc()))

    handler = type("Handler", (Seen,), {"seen": queue.Queue()})
    server = Server(("127.0.0.1", 0), handler)
    ca = trustme.CA()
    with tempfile.TemporaryDirectory(prefix="ns-haproxy-") as directory:
        pem = os.path.join(directory, "server.pem")
        ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(pem)
        ca_file = os.path.join(directory, "ca.pem")
        ca.cert_pem.write_to_path(ca_file)
        host, port = server.server_address
        with (
            Serving(server),
            haproxy(
                CONFIG,
                ["v1", "v2", "tls", "health"],
                backend=f"{host}:{port}",
                pem=pem,
                ca=ca_file,
                options=OPTIONS,
            ) as addresses,
        ):
            yield {
                "addresses": addresses,
                "seen": handler.seen,
                "errors": errors,
                "ca": ca,
                "server": server,
            }


def through(address: Any, line: bytes, context: ssl.SSLContext | None = None) -> Any:
    """Send one line through HAProxy; (what the handler reported, the echoed line, the
    client's own address)."""
    with socket.create_connection(address, timeout=10) as raw:
        local = raw.getsockname()
        sock: Any = (
            raw if context is None else context.wrap_socket(raw, server_hostname="localhost")
        )
        sock.sendall(line)
        reply = b""
        while reply.count(b"\n") < 2:  # the report, then the echoed line
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
        if context is not None:
            sock.close()
    report, _, echoed = reply.partition(b"\n")
    return json.loads(report), echoed, local


def test_send_proxy_v1(behind_haproxy: dict[str, Any]) -> None:
    report, echoed, local = through(behind_haproxy["addresses"]["v1"], b"hello\n")
    assert report["version"] == 1
    assert report["client"] == ["127.0.0.1", local[1]]  # the client, not HAProxy
    assert echoed == b"hello\n"
    assert behind_haproxy["errors"] == []


def test_send_proxy_v2_with_tlvs_from_a_plain_client(behind_haproxy: dict[str, Any]) -> None:
    report, echoed, local = through(behind_haproxy["addresses"]["v2"], b"plain\n")
    assert report["version"] == 2
    assert report["command"] == "PROXY"
    assert report["client"] == ["127.0.0.1", local[1]]
    assert report["crc32c"]
    assert f"127.0.0.1:{local[1]}" in report["unique_id"]
    # HAProxy sends the SSL TLV with zero flags and verify 0 to a plain client.
    assert report["ssl"] == {
        "used": False,
        "client_cert": False,
        "verified": False,
        "cn": None,
        "verify": 0,
        "version": None,
        "cipher": None,
        "sig_alg": None,
        "key_alg": None,
    }
    assert report["authority"] is None
    assert echoed == b"plain\n"
    assert behind_haproxy["errors"] == []


@pytest.mark.parametrize("client_cert", [False, True])
def test_send_proxy_v2_ssl_cn_while_haproxy_terminates_tls(
    behind_haproxy: dict[str, Any], client_cert: bool
) -> None:
    ca: trustme.CA = behind_haproxy["ca"]
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.set_alpn_protocols(["http/1.1"])
    if client_cert:
        ca.issue_cert("client.example", common_name="client.example").configure_cert(context)
    report, echoed, local = through(behind_haproxy["addresses"]["tls"], b"secret\n", context)
    # The client certificate's CN, and the verification HAProxy did.
    assert report["ssl"]["cn"] == ("client.example" if client_cert else None)
    assert report["ssl"]["client_cert"] is client_cert
    assert report["ssl"]["verified"] is client_cert
    assert report["client"] == ["127.0.0.1", local[1]]
    assert report["authority"] == "localhost"
    assert report["alpn"] == "http/1.1"
    assert report["crc32c"]
    assert report["ssl"]["used"] is True
    assert report["ssl"]["version"].startswith("TLSv1.")
    assert report["ssl"]["cipher"].startswith("TLS_")  # a TLS 1.3 suite
    # The server certificate's (trustme's: ECDSA P-256, signed with SHA-256).
    assert (report["ssl"]["sig_alg"], report["ssl"]["key_alg"]) == ("ecdsa-with-SHA256", "EC256")
    assert echoed == b"secret\n"
    assert behind_haproxy["errors"] == []


def test_check_send_proxy_health_checks_are_local(behind_haproxy: dict[str, Any]) -> None:
    seen: queue.Queue[dict[str, Any]] = behind_haproxy["seen"]
    checks = 0
    while checks < 3:  # every 100 ms: three within the timeout
        report = seen.get(timeout=10)
        assert report["command"] == "LOCAL"
        # The socket's own address (HAProxy's end) stands.
        assert report["client"][0] == "127.0.0.1"
        checks += 1
    assert behind_haproxy["errors"] == []
    stats = behind_haproxy["server"].statistics()
    assert stats.errors == 0
    assert stats.stage_failures == 0


PASSTHROUGH = """\
global
    maxconn 64
    nbthread 1
defaults
    mode tcp
    timeout connect 5s
    timeout client 10s
    timeout server 10s
listen passthrough
    bind fd@{passthrough}
    server netserve {backend} send-proxy-v2
"""


@pytest.mark.parametrize("model", sorted(MODELS))
def test_tls_passed_through_after_send_proxy_v2(model: str, certs: Certs) -> None:
    """HAProxy in TCP mode: its PROXY v2 header, then the client's own TLS stream,
    which netserve terminates: the handler sees the real client and the session."""
    server = make(
        model, certs, proxy_protocol="v2", proxy_trusted=["127.0.0.1"], tls_alpn=["h2", "http/1.1"]
    )(("127.0.0.1", 0), Report)
    host, port = server.server_address
    with (
        Serving(server, close=False),
        haproxy(PASSTHROUGH, ["passthrough"], backend=f"{host}:{port}") as addresses,
    ):
        context = certs.client_context()
        context.set_alpn_protocols(["http/1.1"])
        with tls_client(addresses["passthrough"], context) as client:
            local = client.getsockname()
            seen, rest = ask(client, b"through\n")
            # The certificate is netserve's own: HAProxy only relays the bytes.
            assert ("DNS", "localhost") in client.getpeercert()["subjectAltName"]
            client.unwrap().close()
    server.server_close()
    assert seen["client"] == repr(("127.0.0.1", local[1]))  # the client, not HAProxy
    assert seen["version"] == "TLSv1.3"
    assert seen["alpn"] == "http/1.1"  # from the ClientHello HAProxy passed on
    assert seen["kind"] == ("GreenTLSSocket" if model == "hub" else "TLSSocket")
    assert rest == b"through\n"
    stats = server.statistics()
    assert (stats.handled, stats.stage_failures, stats.errors) == (1, 0, 0)
    assert server.errors == []

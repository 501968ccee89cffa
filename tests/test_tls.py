"""TLS on stream servers (_tls), in every model, with Python ssl clients."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trustme

import netserve
from netserve._edges._tls import GreenTLSSocket, HandshakeGate
from tests.conftest import LogEvent, Serving, connect
from tests.models import CONCURRENT, MODELS


class Certs:
    """A CA and a server certificate for localhost, as files."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.ca = trustme.CA()
        self.cafile = os.path.join(directory, "ca.pem")
        self.ca.cert_pem.write_to_path(self.cafile)
        self.certfile, self.keyfile = self.issue("server", "localhost", "127.0.0.1")

    def issue(self, name: str, *hosts: str) -> tuple[str, str]:
        cert = self.ca.issue_cert(*hosts)
        certfile = os.path.join(self.directory, f"{name}.pem")
        keyfile = os.path.join(self.directory, f"{name}.key")
        cert.cert_chain_pems[0].write_to_path(certfile)
        cert.private_key_pem.write_to_path(keyfile)
        return certfile, keyfile

    def client_context(self, **kwargs: Any) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.cafile)
        for name, value in kwargs.items():
            setattr(context, name, value)
        return context


@pytest.fixture(scope="module")
def certs() -> Iterator[Certs]:
    with tempfile.TemporaryDirectory(prefix="ns-tls-") as directory:
        yield Certs(directory)


@pytest.fixture(params=sorted(MODELS))
def model(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Report(netserve.StreamRequestHandler):
    """Answers each line with what it knows of the session, then the line."""

    def handle(self) -> None:
        for line in self.rfile:
            request = self.request
            cert = request.getpeercert()
            subject = dict(item[0] for item in cert["subject"]) if cert else {}
            seen = {
                "kind": type(request).__name__,
                "ssl_socket": isinstance(request, ssl.SSLSocket),
                "version": request.version(),
                "alpn": request.selected_alpn_protocol(),
                "cipher": request.cipher()[0],
                "peer": subject.get("commonName"),
                "client": repr(self.client_address),
            }
            self.wfile.write(json.dumps(seen).encode() + b"\t" + line)


class Quiet:
    errors: list[Any]

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.errors.append(client_address)


def make(model: str, certs: Certs, kind: str = "tcp", **attributes: Any) -> Any:
    base = getattr(MODELS[model], kind)
    attributes.setdefault("tls_certfile", certs.certfile)
    attributes.setdefault("tls_keyfile", certs.keyfile)
    return type("Server", (Quiet, base), {"errors": [], **attributes})


def tls_client(
    address: Any,
    context: ssl.SSLContext,
    hostname: str = "localhost",
    family: int = socket.AF_INET,
) -> ssl.SSLSocket:
    raw = connect(address, family)
    try:
        # suppress_ragged_eofs=False: an EOF without close_notify raises.
        return context.wrap_socket(raw, server_hostname=hostname, suppress_ragged_eofs=False)
    except BaseException:
        raw.close()
        raise


def ask(client: ssl.SSLSocket, line: bytes) -> tuple[dict[str, Any], bytes]:
    client.sendall(line)
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = client.recv(4096)
        assert chunk, "the server closed before answering"
        reply += chunk
    seen, _, rest = reply.partition(b"\t")
    return json.loads(seen), rest


def served_and_closed_cleanly(address: Any, certs: Certs, **client: Any) -> dict[str, Any]:
    with tls_client(address, certs.client_context(**client.pop("context", {})), **client) as c:
        seen, rest = ask(c, b"hello\n")
        assert rest == b"hello\n"
        c.unwrap().close()  # close_notify both ways: the server sends its own
    return seen


def test_every_model_serves_tls_and_closes_with_close_notify(model: str, certs: Certs) -> None:
    server = make(model, certs)(("127.0.0.1", 0), Report)
    with Serving(server, close=False) as serving:
        context = certs.client_context()
        with tls_client(serving.address, context) as client:
            seen, rest = ask(client, b"one\n")
            assert rest == b"one\n"
            seen2, rest = ask(client, b"two\n")
            assert rest == b"two\n"
            # close_notify ends the handler's rfile; unwrap() returns only once
            # the server's own close_notify has come, then the connection ends.
            with client.unwrap() as plain:
                assert plain.recv(10) == b""
    server.server_close()
    assert seen["version"] == "TLSv1.3"
    assert seen == seen2
    if model == "hub":
        assert seen["kind"] == "GreenTLSSocket"
        assert not seen["ssl_socket"]
    else:
        assert seen["ssl_socket"]
    stats = server.statistics()
    assert (stats.handled, stats.stage_failures, stats.errors, stats.active) == (1, 0, 0, 0)
    assert server.errors == []


def test_unix_stream_server_with_tls(certs: Certs, unix_path: str) -> None:
    for model in ("threading", "hub"):
        server = make(model, certs, "unix_stream")(unix_path, Report)
        with Serving(server):
            seen = served_and_closed_cleanly(server.server_address, certs, family=socket.AF_UNIX)
        assert seen["version"] == "TLSv1.3"


def test_a_stalled_handshake_does_not_hold_up_others(model: str, certs: Certs) -> None:
    # Sync serves one connection at a time: there the other waits for the stall's
    # stage_timeout; every other model serves it meanwhile.
    server = make(model, certs, stage_timeout=2.0)(("127.0.0.1", 0), Report)
    with Serving(server, close=False) as serving:
        with connect(serving.address) as stalled:
            stalled.sendall(b"\x16\x03\x01\x02\x00")  # a ClientHello's record header, no more
            if model != "sync":
                served_and_closed_cleanly(serving.address, certs)
            stalled.settimeout(10)
            assert stalled.recv(100) == b""  # closed at stage_timeout
        if model == "sync":
            served_and_closed_cleanly(serving.address, certs)
    server.server_close()
    stats = server.statistics()
    assert (stats.handled, stats.timeouts, stats.errors) == (1, 1, 0)
    assert server.errors == []


def test_a_plain_text_client_is_counted_and_logged_not_a_traceback(
    model: str, certs: Certs
) -> None:
    server = make(model, certs)(("127.0.0.1", 0), Report)
    with (
        Serving(server, close=False) as serving,
        LogEvent("netserve.tls", "handshake") as logged,
    ):
        with connect(serving.address) as plain:
            plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
            try:
                while plain.recv(4096):
                    pass  # a TLS alert, perhaps, then the end
            except ConnectionResetError:
                pass
        served_and_closed_cleanly(serving.address, certs)
        if model != "forking":  # the child's log goes to the child's handlers
            assert logged.event.wait(10)
    server.server_close()
    stats = server.statistics()
    assert (stats.stage_failures, stats.handled, stats.errors) == (1, 1, 0)
    assert server.errors == []


def test_client_certificates_required(model: str, certs: Certs) -> None:
    server = make(model, certs, tls_ca_certs=certs.cafile, tls_cert_reqs="required")
    server = server(("127.0.0.1", 0), Report)
    with Serving(server, close=False) as serving:
        # Without one: refused (TLS 1.3 tells the client at its first read).
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            with tls_client(serving.address, certs.client_context()) as client:
                ask(client, b"x\n")
        # With one: the handler sees who it is.
        client_cert = certs.ca.issue_cert("alice@example.org", common_name="alice")
        context = certs.client_context()
        client_cert.configure_cert(context)
        with tls_client(serving.address, context) as client:
            seen, _ = ask(client, b"me\n")
            client.unwrap().close()
    server.server_close()
    assert seen["peer"] == "alice"
    stats = server.statistics()
    assert (stats.stage_failures, stats.handled, stats.errors) == (1, 1, 0)


def test_alpn_and_sni(certs: Certs) -> None:
    other_cert, other_key = certs.issue("other", "other.test")
    for model in ("threading", "pool", "hub"):
        server = make(
            model,
            certs,
            tls_alpn=["h2", "http/1.1"],
            tls_sni={"other.test": (other_cert, other_key)},
        )(("127.0.0.1", 0), Report)
        with Serving(server):
            context = certs.client_context()
            context.set_alpn_protocols(["http/1.1"])
            with tls_client(server.server_address, context, "other.test") as client:
                seen, _ = ask(client, b"x\n")
                names = client.getpeercert()["subjectAltName"]
                client.unwrap().close()
            assert names == (("DNS", "other.test"),)
            assert seen["alpn"] == "http/1.1"
            # An unknown name gets the default certificate (localhost's).
            context = certs.client_context(check_hostname=False)
            with tls_client(server.server_address, context, "unknown.test") as client:
                names = client.getpeercert()["subjectAltName"]
                client.unwrap().close()
            assert ("DNS", "localhost") in names


@pytest.mark.parametrize("model", CONCURRENT)
def test_reload_is_picked_up_by_the_next_handshake(model: str, certs: Certs) -> None:
    with tempfile.TemporaryDirectory(prefix="ns-tls-") as directory:
        certfile, keyfile = os.path.join(directory, "c.pem"), os.path.join(directory, "c.key")
        shutil.copy(certs.certfile, certfile)
        shutil.copy(certs.keyfile, keyfile)
        server = make(model, certs, tls_certfile=certfile, tls_keyfile=keyfile)
        server = server(("127.0.0.1", 0), Report)
        with Serving(server):
            with tls_client(server.server_address, certs.client_context()) as old:
                ask(old, b"before\n")
                before = old.getpeercert(binary_form=True)
                new_cert, new_key = certs.issue("renewed", "localhost")
                shutil.copy(new_cert, certfile)
                shutil.copy(new_key, keyfile)
                server.reload_certificates()
                with tls_client(server.server_address, certs.client_context()) as new:
                    ask(new, b"after\n")
                    after = new.getpeercert(binary_form=True)
                    new.unwrap().close()
                # The open connection keeps its session.
                _, rest = ask(old, b"still\n")
                assert rest == b"still\n"
                old.unwrap().close()
        assert before != after
        with open(new_cert, "rb") as pem:
            assert ssl.PEM_cert_to_DER_cert(pem.read().decode()) == after


@pytest.mark.parametrize("model", ["threading", "pool", "hub"])
def test_clients_stalled_mid_handshake_hold_no_slot(model: str, certs: Certs) -> None:
    # One slot, and more stalled handshakes than that: a slot is held only
    # while the server works on a message, so the next client is served while
    # they all still wait (before: the first stall kept everyone waiting until
    # its stage_timeout).
    server = make(model, certs, tls_max_handshakes=1)(("127.0.0.1", 0), Report)
    with Serving(server, close=False) as serving:
        stalled = [connect(serving.address) for _ in range(3)]
        try:
            stalled[0].sendall(b"\x16\x03\x01\x02\x00")  # a ClientHello's first bytes
            stalled[1].sendall(b"\x16")
            served_and_closed_cleanly(serving.address, certs)
            assert server.statistics().active == 3  # they are still there
        finally:
            for client in stalled:
                client.close()
        assert server.wait_closed(10)
    server.server_close()
    stats = server.statistics()
    assert (stats.handled, stats.stage_failures, stats.errors) == (1, 3, 0)


class _HeldSlot:
    """The gate's only slot, taken by the test as a handshake step would."""

    def __init__(self, server: Any) -> None:
        self.gate = server._netserve_tls.gate
        assert self.gate.enter() is None
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.gate.leave()


def test_handshakes_over_the_cap_wait_for_a_slot(certs: Certs) -> None:
    # The thread models bound the steps computing at once (the pool's loop and
    # the hub's thread run one at a time anyway).
    server = make("threading", certs, tls_max_handshakes=1)(("127.0.0.1", 0), Report)
    served: list[float] = []

    def legit() -> None:
        served_and_closed_cleanly(server.server_address, certs)
        served.append(time.monotonic())

    with (
        Serving(server, close=False),
        LogEvent("netserve.tls", "waits for a slot") as queued,
    ):
        slot = _HeldSlot(server)
        waiter = threading.Thread(target=legit)
        try:
            waiter.start()
            assert queued.event.wait(10)
            released = time.monotonic()
            slot.release()
            waiter.join(10)
        finally:
            slot.release()
            waiter.join(10)
        assert served
        assert served[0] >= released
    server.server_close()
    stats = server.statistics()
    assert (stats.handled, stats.stage_failures, stats.errors) == (1, 0, 0)


def test_a_connection_waiting_for_a_slot_times_out(certs: Certs) -> None:
    server = make("threading", certs, tls_max_handshakes=1, stage_timeout=1.0)
    server = server(("127.0.0.1", 0), Report)
    with Serving(server, close=False) as serving:
        slot = _HeldSlot(server)
        try:
            with connect(serving.address) as waiting:
                waiting.sendall(b"\x16\x03\x01\x02\x00")
                assert waiting.recv(100) == b""  # closed at the stage deadline
        finally:
            slot.release()
        served_and_closed_cleanly(serving.address, certs)  # the slot is free again
    server.server_close()
    stats = server.statistics()
    assert (stats.handled, stats.timeouts, stats.errors) == (1, 1, 0)
    assert stats.timeouts_by_kind == {"stage_timeout": 1}


def test_an_idle_tls_client_is_closed_at_idle_timeout(model: str, certs: Certs) -> None:
    server = make(model, certs, idle_timeout=0.5)(("127.0.0.1", 0), Report)
    with Serving(server, close=False) as serving:
        with tls_client(serving.address, certs.client_context()) as client:
            ask(client, b"first\n")
            client.settimeout(10)
            assert client.recv(10) == b""  # the server's close_notify, then its close
    server.server_close()
    stats = server.statistics()
    assert (stats.timeouts, stats.errors) == (1, 0)
    assert server.errors == []


def test_configuration_errors(certs: Certs) -> None:
    class KeyOnly(netserve.ThreadingTCPServer):
        tls_keyfile = certs.keyfile

    class Missing(netserve.ThreadingTCPServer):
        tls_certfile = "/nonexistent/cert.pem"

    class Datagram(netserve.ThreadingUDPServer):
        tls_certfile = certs.certfile
        tls_keyfile = certs.keyfile

    class BadReqs(netserve.ThreadingTCPServer):
        tls_certfile = certs.certfile
        tls_keyfile = certs.keyfile
        tls_cert_reqs = "maybe"

    for cls, text in [
        (KeyOnly, "without tls_certfile"),
        (Missing, "not found"),
        (Datagram, "DTLS"),
        (BadReqs, "tls_cert_reqs"),
    ]:
        with pytest.raises(netserve.ConfigurationError, match=text):
            cls(("127.0.0.1", 0), Report, bind_and_activate=False)
    plain = netserve.ThreadingTCPServer(("127.0.0.1", 0), Report, bind_and_activate=False)
    with plain, pytest.raises(netserve.ConfigurationError, match="TLS"):
        plain.reload_certificates()


def test_an_application_context_is_used_and_replaced(certs: Certs) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.certfile, certs.keyfile)
    server = make("threading", certs, tls_context=context, tls_certfile=None, tls_keyfile=None)
    server = server(("127.0.0.1", 0), Report)
    with Serving(server):
        served_and_closed_cleanly(server.server_address, certs)
        with pytest.raises(netserve.ConfigurationError):
            server.reload_certificates()
        server.reload_certificates(context)
        served_and_closed_cleanly(server.server_address, certs)


def test_the_hub_request_is_cooperative(certs: Certs) -> None:
    """Two clients on one hub: one handler waiting in a TLS read does not stop the other."""
    server = make("hub", certs)(("127.0.0.1", 0), Report)
    with Serving(server):
        with tls_client(server.server_address, certs.client_context()) as first:
            ask(first, b"a\n")  # its handler now waits for the next line
            served_and_closed_cleanly(server.server_address, certs)
            first.unwrap().close()
    assert GreenTLSSocket.__name__ == "GreenTLSSocket"


def test_failures_are_logged_at_info(certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    server = make("threading", certs)(("127.0.0.1", 0), Report)
    with caplog.at_level(logging.DEBUG, "netserve.tls"), Serving(server):
        for _ in range(3):
            with connect(server.server_address) as plain:
                plain.sendall(b"hello\r\n")
                try:
                    while plain.recv(4096):
                        pass
                except ConnectionResetError:
                    pass
    records = [r for r in caplog.records if r.name == "netserve.tls"]
    # Rate-limited: the first at once, the rest summed up later.
    assert [r.levelno for r in records] == [logging.INFO]


def test_proxy_protocol_then_tls(model: str, certs: Certs) -> None:
    """A PROXY v1 header in clear, then the TLS session: the stage reads exactly
    the header, so the handshake finds the ClientHello where the peer sent it."""
    server = make(model, certs, proxy_protocol="any", proxy_trusted=["127.0.0.0/8"])
    server = server(("127.0.0.1", 0), Report)
    with Serving(server, close=False) as serving:
        raw = connect(serving.address)
        raw.sendall(b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 443\r\n")
        context = certs.client_context()
        with context.wrap_socket(raw, server_hostname="localhost") as client:
            seen, rest = ask(client, b"hi\n")
            client.unwrap().close()
    server.server_close()
    assert seen["client"] == "('203.0.113.7', 5555)"
    assert seen["version"] == "TLSv1.3"
    assert rest == b"hi\n"
    stats = server.statistics()
    assert (stats.handled, stats.stage_failures, stats.errors) == (1, 0, 0)


def test_a_slot_given_to_a_connection_that_gave_up_passes_on() -> None:
    # leave() hands the slot to the first waiting ticket; a cancel() from that
    # connection (its stage time-out, on another thread) right after must pass
    # the slot on, never lose it (the cap would shrink for good).
    gate = HandshakeGate(1)
    assert gate.enter() is None
    ticket = gate.enter()
    assert ticket is not None
    gate.leave()  # the slot is the ticket's now
    assert ticket.granted
    gate.cancel(ticket)  # ... but its connection is gone
    assert gate.busy == 0
    assert gate.enter() is None  # a slot is free
    waiting = gate.enter()
    assert waiting is not None
    gate.cancel(waiting)  # gave up while still waiting: simply out of the queue
    assert (gate.busy, list(gate.waiting)) == (1, [])


def test_a_client_context_is_refused_at_construction(certs: Certs) -> None:
    context = ssl.create_default_context()  # a client's: check_hostname
    context.load_cert_chain(certs.certfile, certs.keyfile)
    server_class = type("Server", (netserve.ThreadingTCPServer,), {"tls_context": context})
    with pytest.raises(netserve.ConfigurationError, match="client's context"):
        server_class(("127.0.0.1", 0), Report)

"""The PROXY protocol on a server (_proxy): the stage and the trusted-peer policy,
in every model, with a raw socket client sending v1 and v2 headers."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
from typing import Any

import pytest

import netserve
from netserve._edges._proxy import proxy_policy
from netserve._edges._proxyproto import V2_SIGNATURE
from tests.conftest import Serving, connect, recv_all
from tests.models import MODELS
from tests.proxy_fuzz import (
    CI_CONNECTIONS,
    Quiet,
    Report,
    exchange,
    make,
    run_fuzz,
    v2,
    v2_inet6_with_tlvs,
)


@pytest.fixture(params=sorted(MODELS))
def model(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def closed_unheard(address: Any, data: bytes) -> bool:
    """Whether the server closes a connection that sent ``data`` without a word."""
    with connect(address) as client:
        try:
            client.sendall(data)
            return recv_all(client) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True  # closed before (or as) the data arrived


def test_v1_and_v2_headers_give_the_handler_the_original_client(model: str) -> None:
    server = make(model)(("127.0.0.1", 0), Report)
    with Serving(server, close=False) as serving:
        # A v1 header and the payload in one write: the payload reaches the handler.
        got, rest = exchange(serving.address, b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 80\r\nhi\n")
        assert got[0] == {"client": "('203.0.113.7', 5555)", "command": "PROXY", "authority": None}
        assert rest == b"hi\n"
        # A v2 header with TLVs, one byte at a time, the payload after it.
        data = v2_inet6_with_tlvs() + b"after\n"
        got, rest = exchange(serving.address, *(data[i : i + 1] for i in range(len(data))))
        assert got[0] == {
            "client": "('2001:db8::7', 40000, 0, 0)",
            "command": "PROXY",
            "authority": "example.org",
        }
        assert rest == b"after\n"
        # HAProxy's health check (LOCAL): the socket's own address stands.
        got, rest = exchange(serving.address, v2(0, 0x00, b"") + b"check\n")
        assert got[0] == {"client": repr(got[1]), "command": "LOCAL", "authority": None}
        assert rest == b"check\n"
    server.server_close()
    stats = server.statistics()
    assert (stats.handled, stats.stage_failures, stats.refused, stats.active) == (3, 0, 0, 0)
    assert server.errors == []


def test_a_bad_header_closes_the_connection_without_a_handler(model: str) -> None:
    server = make(model, proxy_protocol="v2")(("127.0.0.1", 0), Report)
    with Serving(server, close=False) as serving:
        # A v1 header where v2 is expected: no guessing.
        assert closed_unheard(serving.address, b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nx\n")
        assert closed_unheard(serving.address, b"GET / HTTP/1.0\r\n\r\n")
        bad_crc = bytearray(v2_inet6_with_tlvs())
        bad_crc[-1] ^= 1
        assert closed_unheard(serving.address, bytes(bad_crc))
        # Closed before the header is complete.
        assert exchange(serving.address, V2_SIGNATURE) == (None, b"")
    server.server_close()
    stats = server.statistics()
    assert (stats.stage_failures, stats.handled, stats.errors, stats.active) == (4, 0, 0, 0)
    assert server.errors == []


def test_a_peer_outside_proxy_trusted_is_refused_before_its_stage(model: str) -> None:
    calls: list[Any] = []
    cls = make(model, proxy_trusted=["10.0.0.0/8", "192.0.2.1"])
    cls.verify_request = lambda self, request, address: calls.append(address) or True
    server = cls(("127.0.0.1", 0), Report)
    with Serving(server, close=False) as serving:
        assert closed_unheard(serving.address, b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 80\r\n")
    server.server_close()
    stats = server.statistics()
    assert (stats.refused, stats.handled, stats.stage_failures, stats.errors) == (1, 0, 0, 0)
    assert calls == []  # refused in verify_request's place, before it
    assert server.errors == []


def test_unix_stream_servers_trust_unix_peers(model: str, unix_path: str) -> None:
    server = make(model, "unix_stream", proxy_trusted="unix")(unix_path, Report)
    with Serving(server, close=False) as serving:
        block = b"/run/client.sock".ljust(108, b"\0") + unix_path.encode().ljust(108, b"\0")
        got, rest = exchange(serving.address, v2(1, 0x31, block) + b"x\n", family=socket.AF_UNIX)
        assert got[0] == {"client": "'/run/client.sock'", "command": "PROXY", "authority": None}
        assert rest == b"x\n"
    server.server_close()
    assert server.statistics().handled == 1


def test_verify_request_still_sees_the_proxys_address() -> None:
    seen: list[Any] = []
    cls = make("threading")
    cls.verify_request = lambda self, request, address: seen.append(address) or True
    server = cls(("127.0.0.1", 0), Report)
    with Serving(server) as serving:
        got, _ = exchange(serving.address, b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 80\r\nhi\n")
        assert got[0]["client"] == "('203.0.113.7', 5555)"
    assert seen == [got[1]]


def test_without_the_protocol_there_is_no_header() -> None:
    class NoProxy(netserve.StreamRequestHandler):
        def handle(self) -> None:
            self.wfile.write(repr(netserve.proxy_header(self.request)).encode())

    server = netserve.ThreadingTCPServer(("127.0.0.1", 0), NoProxy)
    with Serving(server) as serving, connect(serving.address) as client:
        client.sendall(b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 80\r\n")
        assert recv_all(client) == b"None"
    assert netserve.proxy_header(object()) is None


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"proxy_trusted": None}, "proxy_trusted is not"),
        ({"proxy_trusted": []}, "proxy_trusted is not"),
        ({"proxy_protocol": "v3"}, "must be None"),
        ({"proxy_trusted": ["10.0.0.0/33"]}, "not an address"),
        ({"proxy_trusted": ["localhost"]}, "not an address"),
    ],
)
def test_contradictory_attributes_fail_at_construction(
    attributes: dict[str, Any], message: str
) -> None:
    cls = make("threading", **attributes)
    with pytest.raises(netserve.ConfigurationError, match=message):
        cls(("127.0.0.1", 0), Report)


def test_a_unix_server_without_unix_trusted_says_what_is_wrong(unix_path: str) -> None:
    with pytest.raises(netserve.ConfigurationError, match="'unix'"):
        make("threading", "unix_stream")(unix_path, Report)


class ReadsALine(netserve.StreamRequestHandler):
    def handle(self) -> None:
        self.rfile.readline()
        self.wfile.write(b"unbounded\n")  # only if the line had no bound


def test_max_line_size_bounds_the_bytes_a_stage_read_ahead(model: str) -> None:
    server = make(model, max_line_size=64)(("127.0.0.1", 0), ReadsALine)
    header = b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 80\r\n"
    with Serving(server, close=False) as serving:
        # Past the limit within what the stage read with the header (one write).
        assert closed_unheard(serving.address, header + b"z" * 200)
        # An endless line: the header, then a megabyte without a newline.
        with connect(serving.address) as client:
            try:
                client.sendall(header + b"z" * 1_000_000)
                client.shutdown(socket.SHUT_WR)  # an unbounded readline() ends here
                reply = recv_all(client)
            except OSError:  # the server closed (and reset) before it all went
                reply = b""
        assert reply == b""
    server.server_close()
    stats = server.statistics()
    assert (stats.lines_too_long, stats.handled, stats.stage_failures) == (2, 2, 0)


# -- datagrams: a v2 header on each ------------------------------------------------------


class DatagramReport(netserve.DatagramRequestHandler):
    """Replies, through the stdlib's reply path, with what it saw and the payload."""

    def handle(self) -> None:
        header = netserve.proxy_header(self.request)
        assert header is not None
        seen = {"client": repr(self.client_address), "command": header.command.name}
        self.wfile.write(json.dumps(seen).encode() + b"\n" + self.rfile.read())


def dgram_header(command: int = 1) -> bytes:
    block = socket.inet_aton("198.51.100.4") + socket.inet_aton("192.0.2.1") + b"\x13\x88\x00\x35"
    return v2(command, 0x12, block)


def ask_datagram(address: Any, data: bytes) -> tuple[Any, bytes, Any]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as proxy:
        proxy.settimeout(10)
        proxy.bind(("127.0.0.1", 0))
        proxy.sendto(data, address)
        reply, source = proxy.recvfrom(65536)
        assert source == address  # the reply comes back to the proxy, from the server
        seen, _, rest = reply.partition(b"\n")
        return json.loads(seen), rest, proxy.getsockname()


def test_datagrams_each_carry_a_header_and_replies_go_back_through_the_proxy(model: str) -> None:
    server = make(model, "udp")(("127.0.0.1", 0), DatagramReport)
    with Serving(server, close=False) as serving:
        seen, rest, _ = ask_datagram(serving.address, dgram_header() + b"query")
        assert seen == {"client": "('198.51.100.4', 5000)", "command": "PROXY"}
        assert rest == b"query"
        seen, rest, proxy = ask_datagram(serving.address, dgram_header(0) + b"check")
        assert seen == {"client": repr(proxy), "command": "LOCAL"}
        assert rest == b"check"
        # Without a header: dropped and counted (then one more that is answered,
        # so that the drop has been counted before the server closes).
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"no header", serving.address)
        ask_datagram(serving.address, dgram_header() + b"again")
    server.server_close()
    stats = server.statistics()
    assert (stats.handled, stats.stage_failures, stats.errors) == (3, 1, 0)
    assert server.errors == []


def ask_datagram_from(source: str, address: Any, data: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as proxy:
        proxy.settimeout(10)
        proxy.bind((source, 0))
        proxy.sendto(data, address)
        return proxy.recv(65536)


def test_a_datagram_from_an_untrusted_peer_is_refused(model: str) -> None:
    server = make(model, "udp", proxy_trusted=["127.0.0.2"])(("127.0.0.1", 0), DatagramReport)
    with Serving(server, close=False) as serving:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as untrusted:
            untrusted.bind(("127.0.0.1", 0))
            untrusted.sendto(dgram_header() + b"x", serving.address)
        # Datagrams are taken in order: once the trusted one is answered, the
        # other has been refused.
        reply = ask_datagram_from("127.0.0.2", serving.address, dgram_header() + b"y")
        assert reply.endswith(b"\ny")
    server.server_close()
    stats = server.statistics()
    assert (stats.refused, stats.handled, stats.stage_failures) == (1, 1, 0)


# -- verify_client(): the hook after the stages, with the original client -----------------

ALLOWED = [ipaddress.ip_network("203.0.113.0/24"), ipaddress.ip_network("127.0.0.2/32")]


class AllowList:
    """verify_client() as an allow-list of the original clients."""

    def verify_client(self, request: Any, client_address: Any) -> bool:
        return any(ipaddress.ip_address(client_address[0]) in net for net in ALLOWED)


def exchange_from(source: str, address: Any, data: bytes) -> bytes:
    with socket.socket() as client:
        client.settimeout(10)
        client.bind((source, 0))
        client.connect(address)
        try:
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)
            return recv_all(client)
        except OSError:  # reset, a broken pipe, or (shutdown) no longer connected
            return b""


def test_verify_client_sees_the_original_client_of_a_stream(model: str) -> None:
    # Behind a proxy: the header's source decides, not the proxy's address.
    proxied = type("Server", (AllowList, make(model)), {})(("127.0.0.1", 0), Report)
    with Serving(proxied, close=False) as serving:
        allowed = b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 80\r\nhi\n"
        got, rest = exchange(serving.address, allowed)
        assert (got[0]["client"], rest) == ("('203.0.113.7', 5555)", b"hi\n")
        refused = v2(1, 0x11, socket.inet_aton("198.51.100.4") + bytes(8)) + b"hi\n"
        assert closed_unheard(serving.address, refused)
    proxied.server_close()
    stats = proxied.statistics()
    assert (stats.handled, stats.refused, stats.stage_failures, stats.errors) == (1, 1, 0, 0)
    assert (stats.active, proxied.errors) == (0, [])
    # Without the protocol: the peer's own address.
    plain = type("Server", (AllowList, Quiet, MODELS[model].tcp), {"errors": []})
    server = plain(("127.0.0.1", 0), Report)
    with Serving(server, close=False) as serving:
        seen, _, rest = exchange_from("127.0.0.2", serving.address, b"hi\n").partition(b"\n")
        assert json.loads(seen)["client"].startswith("('127.0.0.2', ")
        assert rest == b"hi\n"
        assert exchange_from("127.0.0.3", serving.address, b"hi\n") == b""
    server.server_close()
    stats = server.statistics()
    assert (stats.handled, stats.refused, stats.errors, stats.active) == (1, 1, 0, 0)
    assert server.errors == []


class Echo(netserve.DatagramRequestHandler):
    def handle(self) -> None:
        self.wfile.write(repr(self.client_address).encode() + b"\n" + self.rfile.read())


def test_verify_client_sees_the_original_client_of_a_datagram(model: str) -> None:
    def header(source: str) -> bytes:
        return v2(1, 0x12, socket.inet_aton(source) + bytes(4) + b"\x13\x88\x00\x35")

    proxied = type("Server", (AllowList, make(model, "udp")), {})(("127.0.0.1", 0), Echo)
    with Serving(proxied, close=False) as serving:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as proxy:
            proxy.bind(("127.0.0.1", 0))
            proxy.sendto(header("198.51.100.4") + b"refused", serving.address)
        # Datagrams are taken in order: once this one is answered, the other
        # was taken (and server_close() waits for its request).
        reply = ask_datagram_from("127.0.0.1", serving.address, header("203.0.113.9") + b"ok")
        assert reply == b"('203.0.113.9', 5000)\nok"
    proxied.server_close()
    stats = proxied.statistics()
    assert (stats.handled, stats.refused, stats.stage_failures, stats.errors) == (1, 1, 0, 0)
    assert proxied.errors == []
    # Without the protocol: the peer's own address.
    plain = type("Server", (AllowList, Quiet, MODELS[model].udp), {"errors": []})
    server = plain(("127.0.0.1", 0), Echo)
    with Serving(server, close=False) as serving:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.bind(("127.0.0.3", 0))
            client.sendto(b"refused", serving.address)
        assert ask_datagram_from("127.0.0.2", serving.address, b"ok").endswith(b"\nok")
    server.server_close()
    stats = server.statistics()
    assert (stats.handled, stats.refused, stats.errors) == (1, 1, 0)
    assert server.errors == []


def test_an_exception_in_verify_client_is_handle_errors() -> None:
    class Failing(Quiet, netserve.ThreadingTCPServer):
        errors: list[Any] = []
        proxy_protocol = "v1"
        proxy_trusted = "127.0.0.1"

        def verify_client(self, request: Any, client_address: Any) -> bool:
            raise ValueError("a bug in the allow-list")

    server = Failing(("127.0.0.1", 0), Report)
    with Serving(server, close=False) as serving:
        assert closed_unheard(serving.address, b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 80\r\n")
    server.server_close()
    stats = server.statistics()
    assert (stats.handled, stats.errors, stats.refused) == (1, 1, 0)
    assert server.errors == [("203.0.113.7", 5555)]


class Policy:
    proxy_protocol = "any"
    socket_type = socket.SOCK_STREAM
    address_family = socket.AF_INET6

    def __init__(self, trusted: Any) -> None:
        self.proxy_trusted = trusted


def test_trusted_forms() -> None:
    policy = proxy_policy(
        Policy(
            [
                "10.0.0.0/8",
                "192.0.2.9",
                ipaddress.ip_address("2001:db8::1"),
                ipaddress.ip_network("fd00::/8"),
            ]
        )
    )
    assert policy is not None
    assert policy.trusts(("10.200.0.1", 1))
    assert policy.trusts(("192.0.2.9", 1))
    assert not policy.trusts(("192.0.2.10", 1))
    assert policy.trusts(("2001:db8::1", 1, 0, 0))
    assert policy.trusts(("fd12::1%eth0", 1, 0, 3))
    assert policy.trusts(("::ffff:10.1.2.3", 1, 0, 0))  # a dual-stack listener's IPv4 peer
    assert not policy.trusts(("::1", 1, 0, 0))
    assert not policy.trusts("")  # no address at all
    single = proxy_policy(Policy("127.0.0.1"))  # one entry as a string, not its characters
    assert single is not None
    assert single.trusts(("127.0.0.1", 1))
    assert proxy_policy(object()) is None  # proxy_protocol unset: off


# -- a live fuzz: random and mutated headers against real servers (tests/proxy_fuzz.py) ----


@pytest.mark.timeout(240)
@pytest.mark.parametrize("model", ["threading", "hub"])
def test_a_live_fuzz_of_headers_leaves_the_server_serving(model: str) -> None:
    run = run_fuzz(model, CI_CONNECTIONS)
    assert run.failures == []
    stats = run.stats
    assert stats.handled == run.answered + 1
    assert stats.handled + stats.stage_failures == CI_CONNECTIONS + 1
    assert (stats.errors, stats.active, stats.refused) == (0, 0, 0)
    assert run.errors == []
    assert 0 < run.answered < CI_CONNECTIONS


@pytest.mark.parametrize("model", ["threading", "pool", "hub"])
def test_a_header_that_never_completes_ends_at_the_stage_deadline(model: str) -> None:
    server = make(model, stage_timeout=0.3)(("127.0.0.1", 0), Report)
    with Serving(server, close=False) as serving, connect(serving.address) as client:
        client.sendall(b"PROXY TCP4 203.0.113.7 ")  # and nothing more
        assert recv_all(client) == b""  # closed by the server, within the test's timeout
    server.server_close()
    stats = server.statistics()
    assert (stats.timeouts, stats.stage_failures, stats.handled, stats.errors) == (1, 0, 0, 0)
    assert stats.timeouts_by_kind == {"stage_timeout": 1}


class Holds(netserve.StreamRequestHandler):
    """Greets the client by the address it sees, then holds the connection."""

    def handle(self) -> None:
        self.rfile.readline()
        self.wfile.write(f"hello {self.client_address[0]}\n".encode())
        self.rfile.readline()


@pytest.mark.parametrize("model", ["threading", "forking", "pool", "hub"])  # sync: one at a time
def test_the_per_client_limit_counts_the_original_client_behind_a_proxy(model: str) -> None:
    # Every connection comes from the proxy's address; the limit is per client
    # (issue 11: "the real one once PROXY is in place"). A forking server's
    # children read the header, so it can only count the proxy's address.
    server = make(model, max_connections_per_client=2)(("127.0.0.1", 0), Holds)
    clients: list[socket.socket] = []
    replies: list[bytes] = []
    with Serving(server, close=False) as serving:
        try:
            for source in ("1.2.3.4", "1.2.3.4", "1.2.3.4", "5.6.7.8"):
                clients.append(connect(serving.address))
                clients[-1].sendall(f"PROXY TCP4 {source} 10.0.0.1 1111 80\r\nhi\n".encode())
                clients[-1].settimeout(5)
                replies.append(clients[-1].recv(100))
        finally:
            for client in clients:
                # The held ones end on their second line: a forked child holds
                # copies of the clients made before it, so a close alone would
                # never reach it as an end of stream.
                with contextlib.suppress(OSError):
                    client.sendall(b"bye\n")
                client.close()
    server.server_close()
    stats = server.statistics()
    if model == "forking":
        assert replies == [b"hello 1.2.3.4\n", b"hello 1.2.3.4\n", b"", b""]
        assert (stats.limited, stats.refused) == (2, 2), stats
    else:
        assert replies == [b"hello 1.2.3.4\n", b"hello 1.2.3.4\n", b"", b"hello 5.6.7.8\n"]
        assert (stats.limited, stats.refused) == (1, 1), stats
    assert (stats.active, server.errors) == (0, []), stats

"""The PROXY protocol on a server (_proxy): the stage and the trusted-peer policy,
in every model, with a raw socket client sending v1 and v2 headers."""

from __future__ import annotations

import errno
import ipaddress
import json
import random
import socket
import struct
import threading
from typing import Any

import pytest

import netserve
from netserve._proxy import proxy_policy
from netserve._proxyproto import V2_SIGNATURE, crc32c, parse_header
from tests.conftest import Serving, connect, recv_all
from tests.models import MODELS


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def v2_inet6_with_tlvs() -> bytes:
    src = ipaddress.IPv6Address("2001:db8::7").packed
    dst = ipaddress.IPv6Address("2001:db8::1").packed
    body = src + dst + struct.pack("!HH", 40000, 443) + tlv(0x02, b"example.org")
    header = bytearray(v2(1, 0x21, body + tlv(0x03, b"\0\0\0\0")))
    header[-4:] = struct.pack("!I", crc32c(bytes(header)))
    return bytes(header)


class Report(netserve.StreamRequestHandler):
    """Answers one line with what it knows of the client, then the line."""

    def handle(self) -> None:
        header = netserve.proxy_header(self.request)
        seen = {
            "client": repr(self.client_address),
            "command": None if header is None else header.command.name,
            "authority": None if header is None else header.authority,
        }
        line = self.rfile.readline()
        self.wfile.write(json.dumps(seen).encode() + b"\n" + line)


class Quiet:
    errors: list[Any]

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.errors.append(client_address)


def make(model: str, kind: str = "tcp", **attributes: Any) -> Any:
    base = getattr(MODELS[model], kind)
    attributes.setdefault("proxy_protocol", "any")
    attributes.setdefault("proxy_trusted", ["127.0.0.0/8"])
    return type("Server", (Quiet, base), {"errors": [], **attributes})


@pytest.fixture(params=sorted(MODELS))
def model(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def exchange(address: Any, *pieces: bytes, family: int = socket.AF_INET) -> tuple[Any, bytes]:
    """Send the pieces one write each, then read the reply: (what the handler saw, the rest)."""
    with connect(address, family) as client:
        if family != socket.AF_UNIX:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in pieces:
            client.sendall(piece)
        client.shutdown(socket.SHUT_WR)
        reply = recv_all(client)
        local = client.getsockname()
    if not reply:
        return None, b""
    seen, _, rest = reply.partition(b"\n")
    return (json.loads(seen), local), rest


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


# -- a live fuzz: random and mutated headers against real servers --------------------------

FUZZ_CONNECTIONS = 10_000  # CI scale (issue 13)
FUZZ_CLIENTS = 4


def fuzz_inputs(rng: random.Random, count: int) -> list[bytes]:
    """Valid headers, mutated ones and noise, each followed by a payload line."""
    valid = [
        b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 80\r\n",
        b"PROXY TCP6 2001:db8::7 2001:db8::1 1 2\r\n",
        b"PROXY UNKNOWN\r\n",
        v2(1, 0x11, bytes(range(12))),
        v2(0, 0x00, b""),
        v2_inet6_with_tlvs(),
    ]
    inputs = []
    for _ in range(count):
        choice = rng.random()
        data = bytearray(rng.choice(valid))
        if choice < 0.6:  # mutated
            for _ in range(rng.randint(1, 3)):
                at = rng.randrange(len(data))
                if rng.random() < 0.5:
                    data[at] ^= 1 << rng.randrange(8)
                else:
                    del data[at:]
                    if not data:
                        break
        elif choice < 0.8:  # noise
            data = bytearray(rng.randbytes(rng.randint(0, 64)))
        inputs.append(bytes(data) + b"line\n")
    return inputs


def fuzz_client(address: Any, inputs: list[bytes], first_host: int, answered: list[int]) -> None:
    for n, data in enumerate(inputs):
        # Rotated over 127.0.0.x: 10,000 connections from one address would
        # crowd the ephemeral port range with TIME_WAIT.
        source = f"127.0.0.{(first_host + n) % 250 + 2}"
        with socket.socket() as client:
            client.settimeout(10)
            client.bind((source, 0))
            client.connect(address)
            try:
                client.sendall(data)
                try:
                    client.shutdown(socket.SHUT_WR)
                except OSError as exc:
                    # The stage reads exactly the header, so a refused one may
                    # leave bytes unread: its close is then a reset, which can
                    # come before this shutdown (a reset socket is not connected).
                    if exc.errno != errno.ENOTCONN:
                        raise
                reply = recv_all(client)
            except (ConnectionResetError, BrokenPipeError):
                reply = b""
        try:
            result = parse_header(data)
        except netserve.ProxyProtocolError:
            result = None
        if result is None:  # the parser refuses it, or it stops short: no handler
            assert reply == b"", (data, reply)
        else:
            seen, _, rest = reply.partition(b"\n")
            expected = result[0].source or (source, client_port(seen))
            assert json.loads(seen)["client"] == repr(expected), (data, reply)
            assert rest == data[result[1] :], (data, reply)
            answered.append(1)


def client_port(seen: bytes) -> int:
    return int(json.loads(seen)["client"].rsplit(", ", 1)[1].rstrip(")"))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("model", ["threading", "hub"])
def test_a_live_fuzz_of_headers_leaves_the_server_serving(model: str) -> None:
    rng = random.Random(13)
    inputs = fuzz_inputs(rng, FUZZ_CONNECTIONS)
    server = make(model, proxy_trusted=["127.0.0.0/8"])(("127.0.0.1", 0), Report)
    answered: list[int] = []
    with Serving(server, close=False) as serving:
        share = len(inputs) // FUZZ_CLIENTS
        failures: list[BaseException] = []

        def run(index: int) -> None:
            try:
                part = inputs[index * share : (index + 1) * share]
                fuzz_client(serving.address, part, index * 61, answered)
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(FUZZ_CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        # Still serving.
        got, rest = exchange(serving.address, b"PROXY TCP4 203.0.113.9 192.0.2.1 9 80\r\nok\n")
        assert (got[0]["client"], rest) == ("('203.0.113.9', 9)", b"ok\n")
    server.server_close()
    stats = server.statistics()
    assert stats.handled == len(answered) + 1
    assert stats.handled + stats.stage_failures == FUZZ_CONNECTIONS + 1
    assert (stats.errors, stats.active, stats.refused) == (0, 0, 0)
    assert server.errors == []
    assert 0 < len(answered) < FUZZ_CONNECTIONS


@pytest.mark.parametrize("model", ["threading", "pool", "hub"])
def test_a_header_that_never_completes_ends_at_the_stage_deadline(model: str) -> None:
    server = make(model, stage_timeout=0.3)(("127.0.0.1", 0), Report)
    with Serving(server, close=False) as serving, connect(serving.address) as client:
        client.sendall(b"PROXY TCP4 203.0.113.7 ")  # and nothing more
        assert recv_all(client) == b""  # closed by the server, within the test's timeout
    server.server_close()
    stats = server.statistics()
    assert (stats.timeouts, stats.stage_failures, stats.handled, stats.errors) == (1, 0, 0, 0)

"""The live PROXY protocol fuzz (issue 13): random and mutated headers, and
noise, each on its own connection from a rotating 127.0.0.x source, against a
real server; each reply is checked against what the parser makes of the input.

tests/test_proxy.py runs it at CI scale (``CI_CONNECTIONS``) and asserts;
scripts/soak runs it at ``FULL_CONNECTIONS`` and prints the figures. Also the
header builders, the reporting handler and the server maker test_proxy.py uses.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import netserve
from netserve._edges._proxyproto import V2_SIGNATURE, crc32c, parse_header
from tests.abuse import Probe
from tests.conftest import Serving, connect, recv_all
from tests.models import MODELS

CI_CONNECTIONS = 10_000  # issue 13's CI scale
FULL_CONNECTIONS = 100_000  # and scripts/soak's
CLIENTS = 4


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
            # Report echoes one line: the bytes after the header up to the first
            # newline (a mutated header's last bytes may hold one), or up to
            # the end (a mutated length may take the payload into the header).
            after = data[result[1] :]
            end = after.find(b"\n") + 1
            assert rest == (after[:end] if end else after), (data, reply)
            answered.append(1)


def client_port(seen: bytes) -> int:
    return int(json.loads(seen)["client"].rsplit(", ", 1)[1].rstrip(")"))


@dataclass
class FuzzRun:
    """What one fuzz run saw."""

    model: str
    connections: int
    #: Connections whose header the parser takes, answered as expected.
    answered: int = 0
    #: What stopped a client (an unexpected reply, a failed connect).
    failures: list[BaseException] = field(default_factory=list)
    #: handle_error() calls.
    errors: list[Any] = field(default_factory=list)
    stats: Any = None
    seconds: float = 0.0
    #: The process before the server was made and after it was closed.
    before: Probe | None = None
    after: Probe | None = None


def run_fuzz(model: str, connections: int, *, clients: int = CLIENTS, seed: int = 13) -> FuzzRun:
    """``connections`` fuzz connections against a ``model`` server from
    ``clients`` threads; then a valid one, which must be served."""
    inputs = fuzz_inputs(random.Random(seed), connections)
    run = FuzzRun(model, connections, before=Probe.now())
    server = make(model, proxy_trusted=["127.0.0.0/8"])(("127.0.0.1", 0), Report)
    answered: list[int] = []
    started = time.monotonic()
    with Serving(server, close=False) as serving:
        share = -(-connections // clients)

        def client(index: int) -> None:
            try:
                part = inputs[index * share : (index + 1) * share]
                fuzz_client(serving.address, part, index * 61, answered)
            except BaseException as exc:
                run.failures.append(exc)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        run.seconds = time.monotonic() - started
        # Still serving.
        got, rest = exchange(serving.address, b"PROXY TCP4 203.0.113.9 192.0.2.1 9 80\r\nok\n")
        if got is None or (got[0]["client"], rest) != ("('203.0.113.9', 9)", b"ok\n"):
            run.failures.append(AssertionError(f"not served after the fuzz: {got!r} {rest!r}"))
    server.server_close()
    run.answered = len(answered)
    run.stats = server.statistics()
    run.errors = server.errors
    run.after = Probe.now()
    return run

"""PROXY protocol v2 over UDP from a real dnsdist (Debian's dnsdist package;
scripts/test installs it) in front of a netserve datagram server, in every
model: dnsdist puts a v2 header (DGRAM) on each query it forwards, the
handler, an ordinary ``DatagramRequestHandler``, answers through the stdlib's
reply path, and the answer goes back through dnsdist to the client.

The answer carries, in a TXT record, the client address the handler saw: each
client (several 127.0.0.x sources) checks that it is its own.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import netserve
from tests.conftest import Serving
from tests.models import MODELS

CONFIG = """\
setSecurityPollSuffix("")
setLocal("{listen}")
newServer{{address="{backend}", useProxyProtocol=true}}
getServer(0):setUp()
"""
# What dnsdist prints once its listening sockets are bound (queries sent from
# then on wait in the socket's buffer until its threads run).
READY = b"Listening on "
CLIENTS = 5  # sources 127.0.0.2 to 127.0.0.6
QUERIES_PER_CLIENT = 4


def dnsdist_binary() -> str:
    path = shutil.which("dnsdist")
    if path is None:
        # No skip (the suite's rule, as for haproxy): scripts/test installs it.
        pytest.fail("dnsdist is missing: apt-get install -y --no-install-recommends dnsdist")
    return path


def question_end(query: bytes) -> int:
    """The offset just past a query's first question (a name, QTYPE, QCLASS)."""
    at = 12
    while query[at]:
        at += 1 + query[at]
    return at + 1 + 4


class Answer(netserve.DatagramRequestHandler):
    """A minimal DNS answer: the query's id, QR set, the question echoed, and
    one TXT record saying the client address this handler saw."""

    def handle(self) -> None:
        query = self.rfile.read()
        (ident, flags) = struct.unpack("!HH", query[:4])
        question = query[12 : question_end(query)]
        host, port = self.client_address[:2]
        text = f"{host} {port}".encode()
        record = struct.pack("!HHHIH", 0xC00C, 16, 1, 0, len(text) + 1) + bytes([len(text)]) + text
        # QR, the query's opcode and RD; RA.
        reply_flags = 0x8000 | (flags & 0x7900) | 0x0080
        header = struct.pack("!HHHHHH", ident, reply_flags, 1, 1, 0, 0)
        self.wfile.write(header + question + record)


def query(ident: int, name: str) -> bytes:
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 16, 1)


def parse_answer(reply: bytes) -> tuple[int, int, bytes, str]:
    """(id, flags, the question, the TXT record's text)."""
    ident, flags, qdcount, ancount = struct.unpack("!HHHH", reply[:8])
    assert (qdcount, ancount) == (1, 1), reply
    end = question_end(reply)
    rdlength = struct.unpack("!H", reply[end + 10 : end + 12])[0]
    rdata = reply[end + 12 : end + 12 + rdlength]
    return ident, flags, reply[12:end], rdata[1 : 1 + rdata[0]].decode()


def free_port(host: str) -> int:
    """A port free for both TCP and UDP on ``host`` now (dnsdist binds both)."""
    for _ in range(20):
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind((host, 0))
            port: int = tcp.getsockname()[1]
            try:
                udp.bind((host, port))
            except OSError:
                continue
            return port
    raise AssertionError("no port free for both TCP and UDP in 20 tries")


class Dnsdist:
    """dnsdist as a child process, in front of ``backend``."""

    def __init__(self, directory: str, backend: Any) -> None:
        self.directory = directory
        self.backend = backend
        self.address: tuple[str, int] = ("127.0.0.1", 0)
        self.proc: subprocess.Popen[bytes] | None = None
        self.output = b""
        self._drain: threading.Thread | None = None

    def start(self) -> None:
        # The port is free when chosen; another process may take it before
        # dnsdist binds it, which dnsdist then says at once (it exits): retry.
        for _ in range(3):
            self.address = ("127.0.0.1", free_port("127.0.0.1"))
            config = os.path.join(self.directory, "dnsdist.conf")
            with open(config, "w") as f:
                host, port = self.backend[:2]
                f.write(
                    CONFIG.format(listen=f"127.0.0.1:{self.address[1]}", backend=f"{host}:{port}")
                )
            self.proc = subprocess.Popen(
                [dnsdist_binary(), "-C", config, "--supervised", "--disable-syslog"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            if self._wait_ready(deadline=time.monotonic() + 20):
                # Whatever it says from now on is read, so that it never blocks on a
                # full pipe; the thread ends with the process.
                self._drain = threading.Thread(target=self._read_rest, name="dnsdist-output")
                self._drain.start()
                return
            self.stop()
            if b"Address already in use" not in self.output:
                break
        raise AssertionError(f"dnsdist did not start:\n{self.output.decode(errors='replace')}")

    def _wait_ready(self, deadline: float) -> bool:
        assert self.proc is not None
        assert self.proc.stdout is not None
        out = self.proc.stdout.fileno()
        while READY not in self.output:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([out], [], [], remaining)[0]:
                return False
            chunk = os.read(out, 65536)
            if not chunk:
                return False  # it exited
            self.output += chunk
        return True

    def _read_rest(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            self.output += chunk

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self._drain is not None:
            self._drain.join(10)
            self._drain = None
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture
def dnsdist_dir() -> Iterator[str]:
    dnsdist_binary()
    with tempfile.TemporaryDirectory(prefix="ns-dnsdist-") as directory:
        yield directory


def ask(source: str, address: Any, count: int, first_id: int) -> list[tuple[str, str]]:
    """``count`` queries from ``source`` through dnsdist: (whom the handler saw,
    who asked) for each."""
    seen = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(10)
        client.bind((source, 0))
        host, port = client.getsockname()
        me = f"{host} {port}"
        for n in range(count):
            ident = first_id + n
            sent = query(ident, f"q{ident}.example.org")
            client.sendto(sent, address)
            reply, origin = client.recvfrom(4096)
            assert origin == address  # through dnsdist
            got_id, flags, question, text = parse_answer(reply)
            assert (got_id, question) == (ident, sent[12:])
            assert flags & 0x8000  # QR
            seen.append((text, me))
    return seen


@pytest.mark.parametrize("model", sorted(MODELS))
def test_dnsdist_sends_each_query_with_its_client_and_gets_the_answer(
    model: str, dnsdist_dir: str
) -> None:
    errors: list[Any] = []

    class Server(MODELS[model].udp):  # type: ignore[misc, name-defined]
        proxy_protocol = "v2"
        proxy_trusted = ["127.0.0.1"]

        def handle_error(self, request: Any, client_address: Any) -> None:
            errors.append(client_address)

    server = Server(("127.0.0.1", 0), Answer)
    dnsdist = Dnsdist(dnsdist_dir, server.server_address)
    with Serving(server, close=False):
        try:
            dnsdist.start()
            results: list[tuple[str, str]] = []
            failures: list[BaseException] = []

            def client(index: int) -> None:
                try:
                    source = f"127.0.0.{index + 2}"
                    ids = 1000 * (index + 1)
                    results.extend(ask(source, dnsdist.address, QUERIES_PER_CLIENT, ids))
                except BaseException as exc:
                    failures.append(exc)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            dnsdist.stop()
        assert failures == [], dnsdist.output.decode(errors="replace")
        # The handler saw each query's original client: its address and port.
        assert len(results) == CLIENTS * QUERIES_PER_CLIENT
        assert all(seen == asked for seen, asked in results), results
        assert {asked.split()[0] for _, asked in results} == {
            f"127.0.0.{i + 2}" for i in range(CLIENTS)
        }
    server.server_close()
    stats = server.statistics()
    # dnsdist's own health checks may add answered queries of their own.
    assert stats.handled >= CLIENTS * QUERIES_PER_CLIENT
    assert (stats.errors, stats.stage_failures, stats.refused) == (0, 0, 0)
    assert errors == []

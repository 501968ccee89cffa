"""Peers for scripts/soak (never part of CI): the stdlib's socketserver
(threading), asyncio and gevent serving tests/abuse_scenarios.py's line protocol
(``big N``, ``raise``, echo), each in a process of its own, so that the same
clients run the same faults against them and the figures read beside
netserve's.

``python -m tests.reliability.peers KIND`` prints ``PORT n`` once it listens on
127.0.0.1 and serves until its stdin ends. What each peer does with a raising
handler or a reset is its own default: the stdlib's and gevent's servers close
the connection and print a traceback; asyncio's handler closes its writer in a
``finally`` (the idiom), and asyncio reports the exception as it does.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

PEERS = ("stdlib-threading", "asyncio", "gevent")
_ZEROS = bytes(16 * 1024 * 1024)


class PeerBugError(Exception):
    pass


def _answer(line: bytes) -> bytes:
    if line.startswith(b"big "):
        return _ZEROS[: int(line[4:])]
    if line == b"raise\n":
        raise PeerBugError("the handler's bug")
    return line


def _say_port(port: int) -> None:
    sys.stdout.write(f"PORT {port}\n")
    sys.stdout.flush()


def _stdlib() -> None:
    import socketserver

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for _ in range(1_000_000):
                line = self.rfile.readline()
                if not line:
                    return
                self.wfile.write(_answer(line))

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        # As netserve's threading row is given (tests/abuse_scenarios.limits): the
        # stdlib's backlog of 5 drops handshakes, which is not the fault under test.
        request_queue_size = socket.SOMAXCONN

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _say_port(server.server_address[1])
    sys.stdin.read()
    server.shutdown()
    server.server_close()


def _asyncio() -> None:
    import asyncio

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(1_000_000):
                line = await reader.readline()
                if not line:
                    return
                writer.write(_answer(line))
                await writer.drain()
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=socket.SOMAXCONN)
        _say_port(server.sockets[0].getsockname()[1])
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)
        server.close()

    asyncio.run(main())


def _gevent() -> None:
    from gevent.server import StreamServer

    def handle(sock: Any, address: Any) -> None:
        reader = sock.makefile("rb")
        try:
            for _ in range(1_000_000):
                line = reader.readline()
                if not line:
                    return
                sock.sendall(_answer(line))
        finally:
            reader.close()

    server = StreamServer(("127.0.0.1", 0), handle, backlog=socket.SOMAXCONN)
    server.start()
    _say_port(server.server_port)
    import gevent

    gevent.get_hub().threadpool.spawn(sys.stdin.read).get()
    server.stop()


def available(kind: str) -> str | None:
    """None when the peer can run here, else why not."""
    if kind == "gevent":
        try:
            import gevent  # noqa: F401
        except ImportError:
            return "gevent is not installed (pip install -e '.[bench]')"
    return None


@dataclass(frozen=True)
class PeerProbe:
    fds: int
    threads: int
    rss_kib: int


class Peer:
    """A peer server in a child process; its stderr goes to a file."""

    def __init__(self, kind: str, stderr_path: str) -> None:
        self.stderr_path = stderr_path
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with open(stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.reliability.peers", kind],
                cwd=root,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("PORT "):
            self.close()
            raise RuntimeError(f"peer {kind} did not start: {self.stderr()[-2000:]}")
        self.address = ("127.0.0.1", int(line.split()[1]))

    def probe(self) -> PeerProbe:
        pid = self.proc.pid
        status = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                status[key] = value.split()
        return PeerProbe(
            len(os.listdir(f"/proc/{pid}/fd")), int(status["Threads"][0]), int(status["VmRSS"][0])
        )

    def settle(self, fds: int, timeout: float = 10.0) -> PeerProbe:
        """The probe once the peer holds no more than ``fds`` descriptors (its
        connections closed), or at ``timeout``: a peer has no wait_closed(), so
        this looks every 50 ms (soak only)."""
        deadline = time.monotonic() + timeout
        probe = self.probe()
        while probe.fds > fds and time.monotonic() < deadline:
            time.sleep(0.05)
            probe = self.probe()
        return probe

    def ping(self) -> bool:
        with socket.create_connection(self.address, timeout=5) as sock:
            sock.sendall(b"ping\n")
            return sock.recv(100) == b"ping\n"

    def stderr(self) -> str:
        with open(self.stderr_path, errors="replace") as f:
            return f.read()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@contextlib.contextmanager
def peer(kind: str, stderr_path: str) -> Iterator[Peer]:
    p = Peer(kind, stderr_path)
    try:
        yield p
    finally:
        p.close()


def main(argv: list[str]) -> int:
    runs = {"stdlib-threading": _stdlib, "asyncio": _asyncio, "gevent": _gevent}
    if len(argv) != 1 or argv[0] not in runs:
        raise SystemExit(f"usage: python -m tests.reliability.peers ({'|'.join(runs)})")
    runs[argv[0]]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Bounded abusive clients: slowloris, silent, non-reader, long line, resetters, and a
legitimate client that measures its round trips.

tests/abuse_scenarios.py runs them against a server of each model; tests/test_abuse.py
(CI scale) and scripts/soak (full counts) run those scenarios.

Every client here
- connects to loopback only: legitimate clients from 127.0.0.1, abusive ones from
  their own addresses (127.0.1.1 ... 127.0.1.64, see ``ABUSERS``), as a crowd of hosts
  would, so that a per-client limit sized for one host does not turn the crowd away
  (and never turns the legitimate clients away);
- is bounded in count (every loop has a fixed number of rounds) and in time (each
  runner has a window, and ``Runner.result()`` a hard deadline), and closes every
  socket it opened, whatever happens.

Theory of operation
-------------------
One thread drives thousands of connections: a runner (``Runner``) is an asyncio
event loop (a selector loop, epoll on Linux) on a thread of its own, running one
coroutine per connection over non-blocking sockets. Only the loop's low-level calls
are used (``sock_connect``, ``sock_recv``, ``sock_sendall``): nothing reads or
buffers on a client's behalf, which a non-reader and a slow client need. A runner
sets ``ready`` (a ``threading.Event``) once every connection it opens has been
tried, so that a test starts its measurement on an event, never after a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import math
import os
import resource
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")

KiB = 1024
MiB = 1024 * KiB

# Abusive clients come from these source addresses, round-robin (Linux routes all of
# 127.0.0.0/8 to the loopback device). 64 of them keep each one's share of 3,000
# connections (47) under the pool's default per-client limit (100).
ABUSERS = tuple(f"127.0.1.{i}" for i in range(1, 65))
LEGITIMATE = "127.0.0.1"

# How long a client waits for a connection to be set up: a full listen backlog
# drops SYNs, and the first retransmission comes a second later.
CONNECT_TIMEOUT = 3.0
# What a thread that runs a runner, or a server, may take beyond its window before
# the harness calls it hung.
HARD_GRACE = 20.0

# The long line is sent from one buffer, over and over (no allocation per send).
_LINE_CHUNK = memoryview(b"a" * (256 * KiB))


# -- the process: descriptors, threads, greenlets, memory ------------------------------------


@contextlib.contextmanager
def raised_fd_limit() -> Iterator[int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit, and restore it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        yield wanted
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def greenlet_count() -> int:
    """Greenlets alive in this process (0 without greenlet)."""
    try:
        import greenlet
    except ImportError:
        return 0
    return sum(isinstance(o, greenlet.greenlet) for o in gc.get_objects())


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise LookupError(field_name)


def rss_kib() -> int:
    return _status_kib("VmRSS")


def reset_peak_rss() -> None:
    """Start VmHWM (the peak RSS) afresh from the current RSS (Linux 4.0+)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_kib() -> int:
    return _status_kib("VmHWM")


@dataclass(frozen=True)
class Probe:
    """What the process holds at one moment."""

    fds: int
    threads: int
    greenlets: int
    rss_kib: int
    #: The interpreter's allocated memory blocks (``sys.getallocatedblocks()``):
    #: Python objects kept, whatever the allocator does with its pages.
    blocks: int = 0

    @classmethod
    def now(cls) -> Probe:
        gc.collect()
        return cls(
            fd_count(),
            threading.active_count(),
            greenlet_count(),
            rss_kib(),
            sys.getallocatedblocks(),
        )


@dataclass
class Captured:
    text: str = ""


@contextlib.contextmanager
def captured_stderr() -> Iterator[Captured]:
    """Everything written to stderr meanwhile, by ``sys.stderr`` or to descriptor 2
    (forked children's included); not shown."""
    captured = Captured()
    with tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved_fd = os.dup(2)
        saved_stream = sys.stderr
        stream = io.TextIOWrapper(os.fdopen(os.dup(tmp.fileno()), "wb"), line_buffering=True)
        os.dup2(tmp.fileno(), 2)
        sys.stderr = stream
        try:
            yield captured
        finally:
            sys.stderr = saved_stream
            stream.close()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            tmp.seek(0)
            captured.text = tmp.read().decode(errors="replace")


# -- blocking clients (one or a few connections) ---------------------------------------------


def _client_socket(source: str | None, rcvbuf: int | None, blocking: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if source is not None:
            # The port is chosen at connect(), per destination, not at bind(), so that
            # thousands of connections from one source address do not run out of ports.
            sock.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24), 1)
            sock.bind((source, 0))
        if rcvbuf is not None:
            # Before connect(): the window offered in the handshake follows it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(blocking)
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def blocking_connection(
    address: tuple[str, int],
    *,
    source: str | None = LEGITIMATE,
    rcvbuf: int | None = None,
    timeout: float = 5.0,
) -> Iterator[socket.socket]:
    sock = _client_socket(source, rcvbuf, blocking=True)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
        yield sock
    finally:
        sock.close()


def read_line(sock: socket.socket, limit: int = 4 * KiB) -> bytes:
    """Bytes up to and including a newline (or what came before the end of the stream)."""
    data = b""
    while b"\n" not in data and len(data) < limit:
        chunk = sock.recv(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data


def read_to_end(sock: socket.socket, limit: int = 64 * KiB) -> bytes:
    """Bytes until the peer's end of the stream (a reset counts as the end)."""
    data = b""
    try:
        while len(data) < limit and (chunk := sock.recv(limit - len(data))):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def reset(sock: socket.socket) -> None:
    """Close with a reset (RST) instead of a FIN: SO_LINGER on, with a zero timeout."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@contextlib.contextmanager
def non_reader(
    address: tuple[str, int], reply_size: int, *, rcvbuf: int = 4 * KiB
) -> Iterator[socket.socket]:
    """A client that asks for ``reply_size`` bytes and never reads them: its receive
    buffer is small, so the server's send stops making progress once the kernel's
    buffers are full. Entered once the reply has begun; closed with a reset (unread
    data makes the close one anyway)."""
    sock = _client_socket(ABUSERS[0], rcvbuf, blocking=True)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        sock.connect(address)
        sock.sendall(b"big %d\n" % reply_size)
        # The reply has begun (the handler is writing) once its first byte is here.
        # A peek takes nothing from the buffer, so the window stays shut.
        if not sock.recv(1, socket.MSG_PEEK):
            raise ConnectionResetError("the server closed before replying")
        yield sock
    finally:
        reset(sock)


# -- one thread, many connections: the runner -------------------------------------------------


class Control:
    """What a runner's coroutine is given: its progress signal and its stop request."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ready_event = threading.Event()
        self.stopping = asyncio.Event()

    def ready(self) -> None:
        self.ready_event.set()


class Runner(Generic[T]):
    """Runs ``make(control)`` on an event loop of its own, on a thread of its own.

    ``with Runner(...) as r:`` starts it; leaving the block asks it to stop and joins
    it. ``result(timeout)`` joins it and returns what the coroutine returned (or
    raises what it raised); a runner still going after ``timeout`` is a hang, and an
    ``AssertionError``."""

    def __init__(self, make: Callable[[Control], Coroutine[Any, Any, T]], name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self.control = Control(self._loop)
        self._make = make
        self._lock = threading.Lock()
        self._closed = False
        self._result: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"abuse-{name}", daemon=True)

    @property
    def ready(self) -> threading.Event:
        return self.control.ready_event

    def _run(self) -> None:
        try:
            self._result = self._loop.run_until_complete(self._make(self.control))
        except BaseException as exc:
            self._error = exc
        finally:
            self.control.ready_event.set()  # a waiter never waits for a runner that ended
            with self._lock:
                self._closed = True
                self._loop.close()

    def start(self) -> Runner[T]:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            if not self._closed:
                self._loop.call_soon_threadsafe(self.control.stopping.set)

    def result(self, timeout: float) -> T:
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.stop()
            self._thread.join(HARD_GRACE)
            raise AssertionError(f"{self._thread.name} still running after {timeout:g} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def __enter__(self) -> Runner[T]:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._thread.join(HARD_GRACE)
        if not self._thread.is_alive():
            self._loop.close()  # never started: close() releases its selector


def run(make: Callable[[Control], Coroutine[Any, Any, T]], timeout: float, name: str) -> T:
    """Run a client coroutine on its runner's thread and wait for its result."""
    with Runner(make, name) as runner:
        return runner.result(timeout)


async def _open(
    address: tuple[str, int], source: str | None, rcvbuf: int | None = None
) -> socket.socket:
    """A non-blocking connected socket (``CONNECT_TIMEOUT`` at most)."""
    loop = asyncio.get_running_loop()
    sock = _client_socket(source, rcvbuf, blocking=False)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


async def _run_all(control: Control, window: float, coros: list[Coroutine[Any, Any, None]]) -> None:
    """Run the coroutines (one per connection) until all have ended, the window
    has passed, or the runner is asked to stop; then cancel those left (each closes
    its socket as it ends). An unexpected exception in one is raised here."""
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(c) for c in coros]
    left = len(tasks)
    all_done = asyncio.Event()

    def one_done(_: asyncio.Task[None]) -> None:
        nonlocal left
        left -= 1
        if not left:
            all_done.set()

    for task in tasks:
        task.add_done_callback(one_done)
    if not tasks:
        all_done.set()
    waiters = [loop.create_task(all_done.wait()), loop.create_task(control.stopping.wait())]
    try:
        await asyncio.wait(waiters, timeout=window, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (*tasks, *waiters):
            task.cancel()
        await asyncio.gather(*tasks, *waiters, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


class _Settled:
    """Counts connections whose setting-up is over; ``control.ready()`` after the last."""

    def __init__(self, control: Control, count: int) -> None:
        self.control = control
        self.left = count
        if not count:
            control.ready()

    def one(self) -> None:
        self.left -= 1
        if not self.left:
            self.control.ready()


_GONE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


# -- slowloris --------------------------------------------------------------------------------


@dataclass
class SlowlorisResult:
    connected: int = 0
    connect_failures: int = 0
    bytes_sent: int = 0
    #: Connections the server ended (end of stream or reset), and each one's life (s,
    #: from before its connect to the client seeing the end: never shorter than the
    #: server's accept to its close).
    closed_by_server: int = 0
    lifetimes: list[float] = field(default_factory=list)


async def slowloris(
    control: Control,
    address: tuple[str, int],
    *,
    count: int,
    interval: float,
    window: float,
    spread: bool = True,
    sources: tuple[str, ...] = ABUSERS,
) -> SlowlorisResult:
    """``count`` connections, each sending one byte (never a newline) at once and then
    every ``interval`` seconds, for ``window`` seconds at most. Ready once every
    connection has been tried and has sent its first byte."""
    loop = asyncio.get_running_loop()
    result = SlowlorisResult()
    settled = _Settled(control, count)
    rounds = math.ceil(window / interval) + 1

    async def one(i: int) -> None:
        # A life is timed from before the connect: the server accepts after it,
        # so the time the server kept the connection is never longer than this.
        opened = time.monotonic()
        try:
            sock = await _open(address, sources[i % len(sources)])
        except (OSError, TimeoutError):
            result.connect_failures += 1
            settled.one()
            return
        result.connected += 1
        first = True
        try:
            await loop.sock_sendall(sock, b"x")
            result.bytes_sent += 1
            first = False
            settled.one()
            # With ``spread``, each connection keeps a phase of its own (a crowd of
            # clients): its second byte comes 0 to 1 interval after the first, then
            # one every interval. Without, they all send at once (one tool's burst).
            due = loop.time() + interval * (i / count if spread else 1.0)
            for _ in range(rounds):
                # Wait for the next byte's turn, or for the server to end it.
                try:
                    async with asyncio.timeout_at(due):
                        data = await loop.sock_recv(sock, 4096)
                except TimeoutError:
                    await loop.sock_sendall(sock, b"x")
                    result.bytes_sent += 1
                    due += interval
                    continue
                if not data:
                    raise ConnectionResetError  # the server's end of the stream
        except _GONE:
            result.closed_by_server += 1
            result.lifetimes.append(time.monotonic() - opened)
        finally:
            if first:
                settled.one()
            sock.close()

    await _run_all(control, window, [one(i) for i in range(count)])
    return result


# -- silent connections -----------------------------------------------------------------------


@dataclass
class SilentResult:
    connected: int = 0
    connect_failures: int = 0
    #: Connections the server closed, and when (s from before their connect: never
    #: shorter than the server's accept to its close).
    closed_by_server: int = 0
    close_times: list[float] = field(default_factory=list)
    #: Bytes the server sent to a connection that never spoke (it should send none).
    bytes_received: int = 0


async def silent(
    control: Control,
    address: tuple[str, int],
    *,
    count: int,
    window: float,
    sources: tuple[str, ...] = ABUSERS,
    concurrency: int = 512,
) -> SilentResult:
    """``count`` connections that send nothing and wait for the server to close them,
    ``window`` seconds at most. Ready once every connection has been tried."""
    loop = asyncio.get_running_loop()
    result = SilentResult()
    settled = _Settled(control, count)
    # A bounded number of handshakes in flight: a SYN flood from one process into
    # a backlog of 5 (the sync server's) only measures SYN retransmissions.
    connecting = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        try:
            async with connecting:
                # Timed from before the connect, as in slowloris().
                opened = time.monotonic()
                sock = await _open(address, sources[i % len(sources)])
        except (OSError, TimeoutError):
            result.connect_failures += 1
            settled.one()
            return
        result.connected += 1
        settled.one()
        try:
            for _ in range(64):  # a server that talks first gets a few reads, no more
                data = await loop.sock_recv(sock, 4096)
                if not data:
                    break
                result.bytes_received += len(data)
            else:
                return
            result.closed_by_server += 1
            result.close_times.append(time.monotonic() - opened)
        except _GONE:
            result.closed_by_server += 1
            result.close_times.append(time.monotonic() - opened)
        finally:
            sock.close()

    await _run_all(control, window, [one(i) for i in range(count)])
    return result


# -- the legitimate client --------------------------------------------------------------------


@dataclass
class LatencyResult:
    #: Round trips of the requests answered (s), from the first send to the whole reply.
    latencies: list[float] = field(default_factory=list)
    #: Requests not answered within the reply timeout.
    failures: int = 0
    #: Connections the server ended under a client (each followed by a fresh one).
    reconnects: int = 0

    def percentile(self, p: float) -> float:
        """The ``p``-th percentile (nearest rank) of the latencies; inf without any."""
        if not self.latencies:
            return math.inf
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p99(self) -> float:
        return self.percentile(99)


async def _read_line(sock: socket.socket, limit: int = 4 * KiB) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while b"\n" not in data and len(data) < limit:
        chunk = await loop.sock_recv(sock, limit - len(data))
        if not chunk:
            raise ConnectionResetError("the server ended the stream")
        data += chunk
    return data


async def legitimate(
    control: Control,
    address: tuple[str, int],
    *,
    connections: int = 4,
    period: float = 0.02,
    window: float,
    reply_timeout: float = 1.0,
    source: str = LEGITIMATE,
) -> LatencyResult:
    """``connections`` clients, each sending a short line every ``period`` seconds
    on one connection for ``window`` seconds, and timing the echo.

    A request is answered when its echo comes within ``reply_timeout`` of its first
    send. When the server ends a connection (an age limit, say) the client connects
    again and sends the request again, its clock still running, as a real client
    would; a request not answered in time counts as a failure, and the client goes
    on with a fresh connection."""
    loop = asyncio.get_running_loop()
    result = LatencyResult()
    control.ready()
    end = time.monotonic() + window
    rounds = math.ceil(window / period) + 1

    async def one(n: int) -> None:
        sock: socket.socket | None = None
        try:
            for i in range(rounds):
                started = time.monotonic()
                if started >= end:
                    return
                request = b"ping %d %d\n" % (n, i)
                try:
                    async with asyncio.timeout(reply_timeout):
                        for _ in range(16):  # the server ends at most a few in a row
                            if sock is None:
                                sock = await _open(address, source)
                            try:
                                await loop.sock_sendall(sock, request)
                                reply = await _read_line(sock)
                                break
                            except _GONE:
                                sock.close()
                                sock = None
                                result.reconnects += 1
                        else:
                            raise TimeoutError
                    assert reply == request, (reply, request)
                    result.latencies.append(time.monotonic() - started)
                except (TimeoutError, OSError):
                    result.failures += 1
                    if sock is not None:
                        sock.close()
                        sock = None
                await asyncio.sleep(max(0.0, started + period - time.monotonic()))
        finally:
            if sock is not None:
                sock.close()

    await _run_all(control, window + reply_timeout + 1.0, [one(n) for n in range(connections)])
    return result


# -- a long line ------------------------------------------------------------------------------


@dataclass
class LongLineResult:
    bytes_sent: int = 0
    #: "peer-closed": the server ended the connection before the whole line was sent;
    #: "sent": all of it went; "window": the time ran out first.
    outcome: str = "window"
    #: What the server answered (read after the line, up to its end of the stream).
    reply: bytes = b""
    elapsed: float = 0.0


async def long_line(
    control: Control, address: tuple[str, int], *, size: int, window: float
) -> LongLineResult:
    """Send a line of ``size`` bytes with no newline (then end the stream), and read
    what the server answers. Stops early when the server closes the connection."""
    loop = asyncio.get_running_loop()
    result = LongLineResult()
    control.ready()
    started = time.monotonic()
    sock = await _open(address, ABUSERS[0])
    try:
        async with asyncio.timeout(window):
            try:
                for _ in range(math.ceil(size / len(_LINE_CHUNK))):
                    chunk = _LINE_CHUNK[: size - result.bytes_sent]
                    await loop.sock_sendall(sock, chunk)
                    result.bytes_sent += len(chunk)
                result.outcome = "sent"
                sock.shutdown(socket.SHUT_WR)
            except _GONE:
                result.outcome = "peer-closed"
            for _ in range(64):  # a short answer, then the end of the stream
                data = await loop.sock_recv(sock, 4096)
                if not data:
                    break
                result.reply += data
    except _GONE:
        pass  # a reset after (or instead of) the answer
    except TimeoutError:
        result.outcome = "window"
    finally:
        sock.close()
        result.elapsed = time.monotonic() - started
    return result


# -- resetters --------------------------------------------------------------------------------


@dataclass
class ResetResult:
    #: Connections reset by the client after the first byte of their reply came.
    reset: int = 0
    #: Connections that failed before that (connect, or no reply in time).
    failed: int = 0


async def resetters(
    control: Control,
    address: tuple[str, int],
    *,
    count: int,
    reply_size: int = MiB,
    concurrency: int = 64,
    window: float,
    sources: tuple[str, ...] = ABUSERS,
) -> ResetResult:
    """``count`` clients, ``concurrency`` at a time, each asking for ``reply_size``
    bytes with a small receive buffer, reading the first byte (so the server is in
    the middle of its reply), then resetting the connection."""
    loop = asyncio.get_running_loop()
    result = ResetResult()
    control.ready()
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with slots:
            try:
                sock = await _open(address, sources[i % len(sources)], rcvbuf=4 * KiB)
            except (OSError, TimeoutError):
                result.failed += 1
                return
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await loop.sock_sendall(sock, b"big %d\n" % reply_size)
                    if not await loop.sock_recv(sock, 1):
                        raise ConnectionResetError
            except (OSError, TimeoutError):
                result.failed += 1
                sock.close()
                return
            reset(sock)
            result.reset += 1

    await _run_all(control, window, [one(i) for i in range(count)])
    return result


# -- one request each, answered by a close (a handler that raises) ----------------------------


@dataclass
class OneShotResult:
    #: Connections whose request was sent and which the server then ended.
    ended: int = 0
    #: Bytes the server sent before ending them (a raising handler sends none).
    bytes_received: int = 0
    #: Connections that failed (connect, send, or no end within the timeout).
    failed: int = 0


async def one_shot(
    control: Control,
    address: tuple[str, int],
    *,
    count: int,
    request: bytes,
    concurrency: int = 32,
    window: float,
    sources: tuple[str, ...] = ABUSERS,
) -> OneShotResult:
    """``count`` clients, ``concurrency`` at a time, each sending ``request`` on a
    connection of its own and reading until the server ends it."""
    loop = asyncio.get_running_loop()
    result = OneShotResult()
    control.ready()
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with slots:
            try:
                sock = await _open(address, sources[i % len(sources)])
            except (OSError, TimeoutError):
                result.failed += 1
                return
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await loop.sock_sendall(sock, request)
                    for _ in range(64):  # a short answer at most, then the end
                        data = await loop.sock_recv(sock, 4096)
                        if not data:
                            break
                        result.bytes_received += len(data)
                    else:
                        raise TimeoutError
                result.ended += 1
            except _GONE:
                result.ended += 1
            except (OSError, TimeoutError):
                result.failed += 1
            finally:
                sock.close()

    await _run_all(control, window, [one(i) for i in range(count)])
    return result

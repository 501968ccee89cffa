"""Issue 11's abuse scenarios: a server of each model under one fault, and its figures.

Each ``run_*`` function starts a server of the model (``Harness``, in this
process, so that its ``statistics()``, its ``handle_error()`` calls and the
process's descriptors, threads, greenlets and RSS can be read), runs one of the
bounded abusive clients of tests/abuse.py against it, checks that the server
still answers a fresh client afterwards, and returns what it saw.
tests/test_abuse.py runs them at CI scale (``CI``) and asserts each model's
goals; scripts/soak runs them at the issue's full counts (``FULL``) and prints
the figures. The clients' own share of what the process holds is small and
accounted for: their sockets are closed before anything is compared, and the
bytes they send come from one shared buffer.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import netserve
from tests.abuse import (
    CONNECT_TIMEOUT,
    HARD_GRACE,
    LEGITIMATE,
    KiB,
    LatencyResult,
    LongLineResult,
    MiB,
    Probe,
    ResetResult,
    Runner,
    SilentResult,
    SlowlorisResult,
    blocking_connection,
    captured_stderr,
    legitimate,
    long_line,
    non_reader,
    one_shot,
    peak_rss_kib,
    read_line,
    read_to_end,
    reset_peak_rss,
    resetters,
    rss_kib,
    run,
    silent,
    slowloris,
)
from tests.models import MODELS

# One buffer the big replies are sliced from (no allocation per reply).
_ZEROS = bytes(16 * MiB)


# -- the server --------------------------------------------------------------------------


class HandlerBugError(Exception):
    """The bug in a handler that raises (the ``raise`` request)."""


class LineService(netserve.StreamRequestHandler):
    """The handler of every scenario, a line protocol:
    ``big N`` is answered with N bytes; ``raise`` raises ``HandlerBugError`` (a bug
    in the handler); a line over 1 KiB with ``line LENGTH``; any other line is
    echoed."""

    def handle(self) -> None:
        for _ in range(1_000_000):  # far more lines than any client here sends
            line = self.rfile.readline()
            if not line:
                return
            if line.startswith(b"big "):
                self.wfile.write(memoryview(_ZEROS)[: int(line[4:])])
            elif line == b"raise\n":
                raise HandlerBugError("the handler's bug")
            elif len(line) > KiB:
                self.wfile.write(b"line %d\n" % len(line))
            else:
                self.wfile.write(line)


class _Recording:
    """Keeps the type of every exception that reaches ``handle_error()`` (in the
    server's process: a forked child's calls are not seen), then reports it as usual."""

    handle_errors: list[type[BaseException]]

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.handle_errors.append(sys.exc_info()[0] or BaseException)
        super().handle_error(request, client_address)  # type: ignore[misc]


def make_server(model: str, attrs: dict[str, Any] | None = None) -> Any:
    """A TCP server of the model on 127.0.0.1, with these class attributes."""
    base = MODELS[model].tcp
    cls = type(f"Abuse{base.__name__}", (_Recording, base), dict(attrs or {}))
    server = cls((LEGITIMATE, 0), LineService)
    server.handle_errors = []
    return server


def _child_pid_count() -> int:
    """Processes whose parent is this one, zombies included."""
    me = os.getpid()
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            count += int(stat.rpartition(b")")[2].split()[1]) == me
    return count


class _LogCount(logging.Handler):
    """Counts the records netserve's loggers emit, by level name (formats nothing)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.counts: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.levelname] = self.counts.get(record.levelname, 0) + 1


@dataclass
class _Failure:
    """A command that raised in the server's process, with its traceback."""

    text: str


class _ServerSide:
    """The server's process: the server serving on a thread, and the commands the
    harness sends it over a pipe, each answered in turn."""

    def __init__(self, model: str, attrs: dict[str, Any] | None) -> None:
        # What netserve logs, at every level (its package logger has only a
        # NullHandler: nothing is printed either way). Not passed on to the root
        # logger: there, pytest's capturing handlers, copied with the process,
        # would keep every record (thousands per run) for a report nobody reads.
        self.logs = _LogCount()
        logger = logging.getLogger("netserve")
        logger.setLevel(logging.DEBUG)
        logger.addHandler(self.logs)
        logger.propagate = False
        self.server = make_server(model, attrs)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.threads_before: set[threading.Thread] = set()

    def address(self) -> Any:
        return self.server.server_address

    def stats(self) -> Any:
        return self.server.statistics()

    def wait_closed(self, timeout: float) -> bool:
        return bool(self.server.wait_closed(timeout))

    def handle_errors(self) -> list[type[BaseException]]:
        return list(self.server.handle_errors)

    def baseline(self) -> Probe:
        self.threads_before = set(threading.enumerate())
        return Probe.now()

    def settle(self, timeout: float, keep: tuple[str, ...] = ()) -> int:
        """Join the threads started since the baseline; how many still run after
        ``timeout`` (the serving loop's own thread excepted, and threads named in
        ``keep``, which the model keeps by design: the pool's workers)."""
        deadline = time.monotonic() + timeout
        alive = 0
        started = set(threading.enumerate()) - self.threads_before - {self.thread}
        for thread in (t for t in started if t.name not in keep):
            thread.join(max(0.0, deadline - time.monotonic()))
            alive += thread.is_alive()
        return alive

    def probe(self) -> Probe:
        return Probe.now()

    def log_counts(self) -> dict[str, int]:
        return dict(self.logs.counts)

    def reset_peak(self) -> int:
        gc.collect()
        reset_peak_rss()
        return rss_kib()

    def peak(self) -> int:
        return peak_rss_kib()

    def children(self) -> int:
        return _child_pid_count()

    def stop(self) -> bool:
        server = self.server
        server.shutdown()
        self.thread.join(HARD_GRACE)
        # Nothing that a scenario left connected may hold up the close.
        server.close()
        if not server.wait_closed(HARD_GRACE):
            server.abort_connections()
            server.wait_closed(HARD_GRACE)
        server.server_close()
        return not self.thread.is_alive()


def _server_process(model: str, attrs: dict[str, Any] | None, conn: Connection) -> None:
    """The forked server process's whole life; it never returns (a copy of the
    parent, pytest and all, must not run on)."""
    status = 1
    try:
        try:
            side = _ServerSide(model, attrs)
        except Exception:
            conn.send(_Failure(traceback.format_exc()))  # the harness raises it
            return
        conn.send(side.address())
        for _ in range(1_000_000):  # far more commands than a scenario sends
            try:
                name, *args = conn.recv()
            except EOFError:  # the harness is gone
                side.stop()
                break
            try:
                reply = getattr(side, name)(*args)
            except Exception:
                reply = _Failure(traceback.format_exc())
            conn.send(reply)
            if name == "stop":
                break
        status = 0
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status)


class Harness:
    """A server of one model, serving in a process of its own; stopped, closed and
    reaped on exit.

    The process is forked before any client socket exists. In the same process as
    the clients, a forking server's children would inherit the clients' ends of
    their connections and never see them close; and apart, the server's figures
    (descriptors, threads, greenlets, RSS) are its own, and its GIL is not the
    clients'. Its stderr is the harness's (``captured_stderr()`` started before
    the harness captures the server's too)."""

    def __init__(self, model: str, attrs: dict[str, Any] | None = None) -> None:
        self.model = model
        ours, theirs = multiprocessing.Pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        with warnings.catch_warnings():
            # Forking beside threads: the child only serves, with threads of its own.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            ours.close()
            _server_process(model, attrs, theirs)
        theirs.close()
        self.pid = pid
        self._conn = ours
        try:
            self.address: tuple[str, int] = self._reply("starting")
        except BaseException:
            self._end(kill=True)
            raise

    def _reply(self, what: str, timeout: float = HARD_GRACE) -> Any:
        if not self._conn.poll(timeout):
            raise AssertionError(f"{self.model} server: no answer to {what} in {timeout:g} s")
        try:
            reply = self._conn.recv()
        except EOFError:
            raise AssertionError(f"{self.model} server: its process ended ({what})") from None
        if isinstance(reply, _Failure):
            raise AssertionError(f"{self.model} server, {what}:\n{reply.text}")
        return reply

    def call(self, name: str, *args: Any, timeout: float = HARD_GRACE) -> Any:
        """Run one of ``_ServerSide``'s commands in the server's process."""
        self._conn.send((name, *args))
        return self._reply(name, timeout)

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        stopped = False
        try:
            stopped = self.call("stop", timeout=4 * HARD_GRACE)
        finally:
            self._end(kill=not stopped)
        if not stopped:
            raise AssertionError(f"{self.model}: serve_forever() still running after shutdown()")

    def _end(self, kill: bool) -> None:
        self._conn.close()
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)

    # -- what the scenarios ask -----------------------------------------------------------

    def statistics(self) -> Any:
        return self.call("stats")

    def wait_closed(self, timeout: float) -> bool:
        """Whether every connection the server accepted is gone within ``timeout``."""
        return bool(self.call("wait_closed", timeout, timeout=timeout + HARD_GRACE))

    def handle_errors(self) -> list[type[BaseException]]:
        return list(self.call("handle_errors"))

    def ping(self, timeout: float = 5.0, source: str = LEGITIMATE) -> float:
        """One request on a fresh connection, closed cleanly; its round trip (s).

        The close is a half-close, then the server's end of the stream: the server
        counts a request out before its peer can see the close, so when this returns
        the request is no longer active."""
        with blocking_connection(self.address, source=source, timeout=timeout) as sock:
            started = time.perf_counter()
            sock.sendall(b"ping\n")
            assert read_line(sock) == b"ping\n"
            elapsed = time.perf_counter() - started
            sock.shutdown(socket.SHUT_WR)
            assert read_to_end(sock) == b""
        return elapsed


# -- the scenarios: scale, limits per model, runs ---------------------------------------------


@dataclass(frozen=True)
class Scale:
    """Counts and timeouts of one run of the scenarios."""

    name: str
    slowloris: int
    legitimate: int
    silent: int
    reply_size: int
    line_size: int
    resetters: int
    #: Requests to a handler that raises (per run).
    raising: int
    #: The abusive count for sync and forking, whose rows only report: the sync
    #: server holds one connection at a time, and forking forks one child per
    #: connection (a copy of the whole test process).
    report_count: int
    park_timeout: float
    idle_timeout: float
    write_timeout: float
    #: The pool's slowloris run sets this max_connection_age (the slowloris rule).
    max_connection_age: float
    #: How long the legitimate clients measure beside the slowloris.
    window: float


CI = Scale(
    name="ci",
    slowloris=200,
    legitimate=4,
    silent=300,
    reply_size=10 * MiB,
    line_size=20 * MiB,
    resetters=200,
    raising=1000,
    report_count=20,
    park_timeout=0.5,
    idle_timeout=1.0,
    write_timeout=0.5,
    max_connection_age=1.0,
    window=2.0,
)

FULL = Scale(
    name="full",
    slowloris=1000,
    legitimate=4,
    silent=3000,
    reply_size=10 * MiB,
    line_size=200 * MiB,
    resetters=5000,
    raising=10000,
    report_count=100,
    park_timeout=1.0,
    idle_timeout=2.0,
    write_timeout=1.0,
    max_connection_age=2.0,
    window=5.0,
)

# The line limit the new models default to (and threading is given explicitly).
LINE_LIMIT = 64 * KiB


def limits(model: str, scale: Scale) -> dict[str, Any]:
    """The attributes each model's server gets in the scenarios.

    The pool and the hub keep their defaults (limits included) and get short
    timeouts, so that a run takes seconds; threading, a stdlib class whose limits
    are all off by default, gets every limit explicitly; sync and forking keep the
    stdlib's defaults (their rows report)."""
    timeouts = {
        "park_timeout": scale.park_timeout,
        "idle_timeout": scale.idle_timeout,
        "write_timeout": scale.write_timeout,
    }
    if model == "threading":
        return {
            **timeouts,
            # The stdlib's backlog of 5 drops handshakes whenever connections
            # arrive faster than the loop accepts them (each drop costs the client
            # a second): not the fault under test. The new models use this too.
            "request_queue_size": socket.SOMAXCONN,
            # Room for every silent connection at once (a thread each).
            "max_connections": scale.silent + 1000,
            "max_connections_per_client": 100,
            "max_line_size": LINE_LIMIT,
            "client_faults_are_errors": False,
        }
    if model in ("pool", "hub"):
        return timeouts
    return {}


@dataclass
class Outcome:
    """What a scenario saw on the server's side."""

    stats: Any = None
    handle_errors: list[type[BaseException]] = field(default_factory=list)
    stderr: str = ""
    #: The server still answered a fresh client after the scenario (round trip, s).
    served_after: float = math.nan


def _finish(h: Harness, outcome: Outcome, settle: float) -> None:
    """Wait (bounded, on the server's own condition) until no connection is left,
    then check the server still serves, and snapshot its figures."""
    h.wait_closed(settle)
    outcome.served_after = h.ping()
    h.wait_closed(settle)
    outcome.stats = h.statistics()
    outcome.handle_errors = h.handle_errors()


@dataclass
class SlowlorisFigures(Outcome):
    slow: SlowlorisResult = field(default_factory=SlowlorisResult)
    legit: LatencyResult = field(default_factory=LatencyResult)
    count: int = 0


def run_slowloris(
    model: str,
    scale: Scale,
    attrs: dict[str, Any] | None = None,
    *,
    count: int | None = None,
    interval: float | None = None,
    reply_timeout: float = 1.0,
    until_closed: bool = False,
    spread: bool = True,
) -> SlowlorisFigures:
    """``count`` slow connections, each sending a byte at once and then one every
    ``interval`` seconds (by default 0.6 idle timeouts: never idle long enough to
    be closed; ``spread``: each at a phase of its own, else all at once), then
    ``scale.legitimate`` legitimate clients for ``scale.window``
    seconds beside them. The slow clients are then stopped, or with
    ``until_closed`` left until the server has closed them all (bounded)."""
    attrs = limits(model, scale) if attrs is None else attrs
    count = scale.slowloris if count is None else count
    if interval is None:
        interval = 0.6 * (attrs.get("idle_timeout") or scale.idle_timeout)
    figures = SlowlorisFigures(count=count)
    slow_window = scale.window + reply_timeout + 2 * CONNECT_TIMEOUT + 10.0
    with captured_stderr() as err, Harness(model, attrs) as h:
        h.ping()
        with Runner(
            lambda c: slowloris(
                c, h.address, count=count, interval=interval, window=slow_window, spread=spread
            ),
            "slowloris",
        ) as slow:
            if not slow.ready.wait(2 * CONNECT_TIMEOUT + 10.0):
                raise AssertionError("the slow clients never got connected")
            figures.legit = run(
                lambda c: legitimate(
                    c,
                    h.address,
                    connections=scale.legitimate,
                    # 800 requests in 2 s: one stall of the whole server (every
                    # client waits at once) is not yet the 99th percentile.
                    period=0.01,
                    window=scale.window,
                    reply_timeout=reply_timeout,
                ),
                scale.window + reply_timeout + HARD_GRACE,
                "legitimate",
            )
            if not until_closed:
                slow.stop()
            figures.slow = slow.result(slow_window + HARD_GRACE)
        _finish(h, figures, 10.0)
    figures.stderr = err.text
    return figures


@dataclass
class SilentRun:
    result: SilentResult
    elapsed: float
    after: Probe
    threads_left: int
    all_closed: bool


@dataclass
class SilentFigures(Outcome):
    baseline: Probe | None = None
    runs: list[SilentRun] = field(default_factory=list)
    count: int = 0


def run_silent(
    model: str,
    scale: Scale,
    attrs: dict[str, Any] | None = None,
    *,
    count: int | None = None,
    runs: int = 2,
    window: float | None = None,
) -> SilentFigures:
    """``count`` connections that never speak, ``runs`` times over; after each run,
    what the process holds compared with before the first."""
    attrs = limits(model, scale) if attrs is None else attrs
    count = scale.silent if count is None else count
    park = attrs.get("park_timeout")
    if window is None:
        # With park_timeout, every connection is closed by the server well within
        # this (max_connections may make some wait their turn in the backlog).
        # Without it (the stdlib's default) none is: the clients give up after a
        # second, a report.
        window = 1.0 if park is None else 3 * park + 10.0
    figures = SilentFigures(count=count)
    with captured_stderr() as err, Harness(model, attrs) as h:
        h.ping()  # the model's threads (hub, first pool worker) exist before the baseline
        figures.baseline = h.call("baseline")
        for _ in range(runs):
            started = time.monotonic()
            result = run(
                lambda c: silent(c, h.address, count=count, window=window),
                window + HARD_GRACE,
                "silent",
            )
            elapsed = time.monotonic() - started
            all_closed = h.wait_closed(10.0)
            threads_left = h.call("settle", 5.0, timeout=5.0 + HARD_GRACE)
            figures.runs.append(
                SilentRun(result, elapsed, h.call("probe"), threads_left, all_closed)
            )
        _finish(h, figures, 10.0)
    figures.stderr = err.text
    return figures


@dataclass
class NonReaderFigures(Outcome):
    #: From the request to the server's close of the connection (s).
    closed_after: float = math.nan
    closed: bool = False


def run_non_reader(
    model: str, scale: Scale, attrs: dict[str, Any] | None = None
) -> NonReaderFigures:
    """One client asks for a ``scale.reply_size`` reply and never reads it."""
    attrs = {**limits(model, scale), "write_timeout": scale.write_timeout, **(attrs or {})}
    figures = NonReaderFigures()
    with captured_stderr() as err, Harness(model, attrs) as h:
        h.ping()
        with non_reader(h.address, scale.reply_size):
            started = time.monotonic()
            figures.closed = h.wait_closed(scale.write_timeout + 10.0)
            figures.closed_after = time.monotonic() - started
        _finish(h, figures, 10.0)
    figures.stderr = err.text
    return figures


@dataclass
class LongLineFigures(Outcome):
    client: LongLineResult = field(default_factory=LongLineResult)
    #: Peak RSS of the process during the line, over its RSS before (KiB).
    rss_growth_kib: int = 0


def run_long_line(model: str, scale: Scale, attrs: dict[str, Any] | None = None) -> LongLineFigures:
    """One client sends a ``scale.line_size`` line without a newline."""
    attrs = limits(model, scale) if attrs is None else attrs
    figures = LongLineFigures()
    with captured_stderr() as err, Harness(model, attrs) as h:
        h.ping()
        before = h.call("reset_peak")
        window = 10.0 + scale.line_size / (50 * MiB)  # far slower than loopback
        figures.client = run(
            lambda c: long_line(c, h.address, size=scale.line_size, window=window),
            window + HARD_GRACE,
            "long-line",
        )
        h.wait_closed(10.0)
        figures.rss_growth_kib = h.call("peak") - before
        _finish(h, figures, 10.0)
    figures.stderr = err.text
    return figures


# Threads a model keeps after the requests that started them, by design: the
# pool's workers (at most max_workers), which wait for the next request.
KEPT_THREADS = ("netserve-pool-worker",)


@dataclass
class FaultRun:
    """One run of a fault, and what the server's process held after it."""

    result: Any
    elapsed: float
    all_closed: bool
    threads_left: int
    after: Probe
    children: int
    log_counts: dict[str, int]


@dataclass
class RepeatedFigures(Outcome):
    """A fault run ``runs`` times in one server process, with its baseline."""

    count: int = 0
    baseline: Probe | None = None
    baseline_children: int = 0
    runs: list[FaultRun] = field(default_factory=list)

    @property
    def rss_growth_kib(self) -> int:
        """The last run's RSS growth over the run before it (KiB)."""
        return self.runs[-1].after.rss_kib - self.runs[-2].after.rss_kib

    @property
    def block_growth(self) -> int:
        """The last run's growth in allocated Python blocks over the run before it."""
        return self.runs[-1].after.blocks - self.runs[-2].after.blocks


def _repeat(
    h: Harness, figures: RepeatedFigures, runs: int, make: Any, *, window: float, name: str
) -> None:
    """Run the client ``make(control)`` ``runs`` times, and after each, once no
    connection is left and the threads started since the baseline have ended,
    snapshot what the process holds."""
    h.ping()  # the model's threads (hub, first pool worker) exist before the baseline
    figures.baseline = h.call("baseline")
    figures.baseline_children = h.call("children")
    for _ in range(runs):
        started = time.monotonic()
        result = run(make, window + HARD_GRACE, name)
        elapsed = time.monotonic() - started
        all_closed = h.wait_closed(10.0)
        threads_left = h.call("settle", 5.0, KEPT_THREADS, timeout=5.0 + HARD_GRACE)
        figures.runs.append(
            FaultRun(
                result,
                elapsed,
                all_closed,
                threads_left,
                h.call("probe"),
                h.call("children"),
                h.call("log_counts"),
            )
        )


@dataclass
class ResetFigures(RepeatedFigures):
    client: ResetResult = field(default_factory=ResetResult)
    elapsed: float = 0.0


def run_resetters(
    model: str,
    scale: Scale,
    attrs: dict[str, Any] | None = None,
    *,
    count: int | None = None,
    runs: int = 1,
) -> ResetFigures:
    """``count`` clients reset their connections in the middle of a 1 MiB reply,
    ``runs`` times over in the same server (``client`` and ``elapsed``: the first)."""
    attrs = limits(model, scale) if attrs is None else attrs
    count = scale.resetters if count is None else count
    figures = ResetFigures(count=count)
    window = 10.0 + count / 100  # 100 a second is far slower than any model here
    with captured_stderr() as err, Harness(model, attrs) as h:
        _repeat(
            h,
            figures,
            runs,
            lambda c: resetters(c, h.address, count=count, window=window),
            window=window,
            name="resetters",
        )
        figures.client = figures.runs[0].result
        figures.elapsed = figures.runs[0].elapsed
        _finish(h, figures, 10.0)
    figures.stderr = err.text
    return figures


@dataclass
class RaisingFigures(RepeatedFigures):
    pass


def run_raising(
    model: str,
    scale: Scale,
    attrs: dict[str, Any] | None = None,
    *,
    count: int | None = None,
    runs: int = 1,
) -> RaisingFigures:
    """``count`` requests, each on a connection of its own, to a handler that
    raises (``HandlerBugError``), ``runs`` times over in the same server."""
    attrs = limits(model, scale) if attrs is None else attrs
    count = scale.raising if count is None else count
    figures = RaisingFigures(count=count)
    window = 10.0 + count / 50  # 50 a second is far slower than any model here
    with captured_stderr() as err, Harness(model, attrs) as h:
        _repeat(
            h,
            figures,
            runs,
            lambda c: one_shot(c, h.address, count=count, request=b"raise\n", window=window),
            window=window,
            name="raising",
        )
        _finish(h, figures, 10.0)
    figures.stderr = err.text
    return figures

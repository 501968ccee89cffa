"""Issue 11's table of faults, per model, at CI scale (scripts/soak runs the full counts).

- slowloris beside 4 legitimate connections: hub and threading, legitimate p99 under
  50 ms and no failure; pool, the wait under the rule stated below; sync and forking,
  report.
- silent connections: all closed by park_timeout, then descriptors, threads and
  greenlets back to the baseline, and a second run's RSS growth bounded (hub,
  threading, pool); sync and forking, report.
- a peer that never reads a 10 MB reply: closed by write_timeout, every model.
- a long line: LineTooLong with the server's RSS bounded (hub, threading, pool); the
  stdlib's behaviour in sync and forking.
- max_connections and the per-client limit: enforced, and accepting resumes below
  (hub, threading, pool); forking, within min(max_children, max_connections).
- resetters: counted as disconnects, no traceback (hub, threading, pool); sync and
  forking, report.

"Report" rows run the fault and assert only that nothing hangs or leaks and that the
server still serves afterwards. Threading is a stdlib class (no limit by default), so
it gets every limit explicitly; the pool and the hub keep their defaults with short
timeouts (``tests.abuse_scenarios.limits``). The clients are in tests/abuse.py, the
scenarios in tests/abuse_scenarios.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.abuse import (
    ABUSERS,
    blocking_connection,
    raised_fd_limit,
    read_line,
    read_to_end,
)
from tests.abuse_scenarios import (
    CI,
    Harness,
    limits,
    run_long_line,
    run_non_reader,
    run_resetters,
    run_silent,
    run_slowloris,
)
from tests.reliability.common import BLOCKS_BOUND

NEW = ["hub", "threading", "pool"]
REPORT = ["sync", "forking"]

# Figures a loaded 2-core machine still meets with a wide margin: these bound
# promptness ("closed within its timeout, give or take scheduling"), not speed.
SLACK = 2.0

# A second run of 300 silent connections may grow the server's RSS by less than
# this: what a run costs (sockets, their Python objects, the table's entries) is
# freed after it, so the second run reuses the first run's memory. Measured: 0 to
# 16 KiB (pool, hub), 0.3 MiB (threading: 300 thread stacks came and went; the
# first run grew 2 MiB); the bound leaves room for the allocator's arenas. The
# allocated Python blocks are checked too (tests/reliability/common.py).
SILENT_RSS_BOUND_KIB = 4 * 1024

# The server's memory while a 20 MiB line arrives with max_line_size 64 KiB: a
# bounded buffer, not the line (the stdlib's readline() holds all of it, twice).
# Measured: 0.1 MiB in every new model (sync, the stdlib: 40 MiB).
LONG_LINE_RSS_BOUND_KIB = 8 * 1024

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _fd_limit() -> Iterator[None]:
    # Hundreds of connections, both of their ends in this process.
    with raised_fd_limit():
        yield


def assert_balanced(stats: Any) -> None:
    """The connection table's invariant: every accepted connection is somewhere."""
    assert stats.accepted == (
        stats.handled + stats.refused + stats.timeouts + stats.stage_failures + stats.active
    ), stats


def assert_quiet(figures: Any) -> None:
    """Nothing reached handle_error(), and nothing printed a traceback (a forked
    child's handle_error() included: it prints to the same stderr)."""
    assert figures.handle_errors == []
    assert "Traceback" not in figures.stderr, figures.stderr[-4000:]
    assert figures.stats.errors == 0


# -- slowloris --------------------------------------------------------------------------------


@pytest.mark.timeout(45)
@pytest.mark.parametrize("model", ["hub", "threading"])
def test_slowloris_leaves_legitimate_clients_prompt(model: str) -> None:
    figures = run_slowloris(model, CI)
    slow, legit = figures.slow, figures.legit
    assert slow.connected == CI.slowloris, slow
    # The rule: idle_timeout bounds each read, so a byte every 0.6 idle timeouts
    # keeps a connection open; what it costs is one greenlet or one thread.
    assert slow.closed_by_server == 0, slow
    assert legit.failures == 0
    # 4 clients, one request each 10 ms for 2 s: 800 if nothing waits.
    assert len(legit.latencies) >= 400
    assert legit.p99 < 0.050, (legit.p50, legit.p99, max(legit.latencies))
    assert_quiet(figures)
    assert_balanced(figures.stats)


# The pool's rule, as the contract implies it. A connection holds a worker from its
# first byte until its handler returns; netserve ends a handler at the first read
# that waits idle_timeout for nothing, and at max_connection_age after the accept.
# A client beyond the workers holds none: it waits, parked with its bytes in the
# kernel, queued, or (while every worker is busy and the queue is full, when the
# pool stops accepting) not yet accepted, in the listen backlog, where even its
# age has not begun. Nothing bounds a client that trickles but the age limit. So,
# with W = max_workers:
# - a client trickling a byte every < idle_timeout keeps its worker until
#   max_connection_age A; without an age limit (the default), W such clients keep
#   every worker for as long as they like, and nobody else is served;
# - with A set, each worker is freed at least once every A, so a legitimate client
#   that connects behind N slow ones (and beside L - 1 other legitimate ones, whose
#   connections the age limit ends too) waits at most ceil((N + L) / W) * A;
# - a client that speaks once and stalls holds a worker for idle_timeout: behind N
#   of them a legitimate client waits at most ceil(N / W) idle timeouts.
# That is the figure scripts/soak reports. For untrusted clients, choose the hub or
# threading.


@pytest.mark.timeout(45)
def test_pool_slowloris_wait_is_bounded_by_max_connection_age() -> None:
    age = CI.max_connection_age
    attrs = {**limits("pool", CI), "max_connection_age": age}
    workers = 32  # the default
    bound = math.ceil((CI.slowloris + CI.legitimate) / workers) * age + SLACK
    figures = run_slowloris("pool", CI, attrs, reply_timeout=bound, until_closed=True)
    slow, legit = figures.slow, figures.legit
    assert slow.connected == CI.slowloris, slow
    # Every slow connection, with a worker or waiting for one, ended by its age.
    assert slow.closed_by_server == CI.slowloris, slow
    assert min(slow.lifetimes) >= age - 0.05
    assert max(slow.lifetimes) < bound
    assert legit.failures == 0
    assert legit.latencies
    assert max(legit.latencies) < bound
    assert_quiet(figures)
    assert_balanced(figures.stats)
    assert figures.stats.timeouts >= CI.slowloris


@pytest.mark.timeout(30)
def test_pool_slow_clients_hold_every_worker_without_an_age_limit() -> None:
    workers = 4
    attrs = {**limits("pool", CI), "max_workers": workers, "queue_size": 1}
    scale = dataclasses.replace(CI, window=1.0)
    figures = run_slowloris("pool", scale, attrs, count=2 * workers, reply_timeout=0.5)
    # Trickling under idle_timeout, and no age limit: none is closed, and the
    # legitimate clients get nothing while the slow ones hold the workers.
    assert figures.slow.connected == 2 * workers
    assert figures.slow.closed_by_server == 0
    assert figures.legit.latencies == []
    assert figures.legit.failures > 0
    assert_quiet(figures)  # and it serves again once they have gone (_finish)


@pytest.mark.timeout(45)
def test_pool_stalled_clients_lose_their_workers_after_idle_timeout() -> None:
    workers, stalled = 4, 8
    idle = CI.idle_timeout
    attrs = {**limits("pool", CI), "max_workers": workers, "queue_size": 1}
    # One legitimate connection: it keeps its worker once it has one (it never
    # idles), so more of them would also wait for each other.
    scale = dataclasses.replace(CI, legitimate=1)
    bound = math.ceil(stalled / workers) * idle + SLACK
    figures = run_slowloris(
        "pool", scale, attrs, count=stalled, interval=60.0, reply_timeout=bound, until_closed=True
    )
    slow, legit = figures.slow, figures.legit
    assert slow.closed_by_server == stalled, slow
    # Closed by idle_timeout, not park_timeout (they spoke): never before it.
    assert min(slow.lifetimes) >= idle - 0.05
    assert legit.failures == 0
    assert max(legit.latencies) < bound
    assert_quiet(figures)
    assert_balanced(figures.stats)


@pytest.mark.timeout(45)
@pytest.mark.parametrize("model", REPORT)
def test_slowloris_report(model: str) -> None:
    figures = run_slowloris(model, CI, count=CI.report_count)
    slow = figures.slow
    assert slow.connected + slow.connect_failures == CI.report_count
    assert figures.served_after < 5.0
    assert_balanced(figures.stats)


# -- silent connections -----------------------------------------------------------------------


@pytest.mark.timeout(45)
@pytest.mark.parametrize("model", NEW)
def test_silent_connections_are_closed_by_park_timeout(model: str) -> None:
    park = CI.park_timeout
    figures = run_silent(model, CI)
    base = figures.baseline
    assert base is not None
    for n, run in enumerate(figures.runs):
        result = run.result
        assert result.connected == CI.silent, (n, result.connect_failures)
        assert result.closed_by_server == CI.silent, (n, result)
        assert result.bytes_received == 0
        assert min(result.close_times) >= park - 0.05
        assert max(result.close_times) < park + SLACK
        assert run.all_closed
        # Back to the baseline: each connection's descriptor, thread or greenlet
        # went with it.
        assert run.threads_left == 0
        assert run.after.fds <= base.fds, (n, run.after, base)
        assert run.after.threads <= base.threads, (n, run.after, base)
        assert run.after.greenlets <= base.greenlets, (n, run.after, base)
    first, second = figures.runs
    assert second.after.rss_kib - first.after.rss_kib < SILENT_RSS_BOUND_KIB
    assert second.after.blocks - first.after.blocks < BLOCKS_BOUND
    assert figures.stats.timeouts == 2 * CI.silent
    assert_quiet(figures)
    assert_balanced(figures.stats)


@pytest.mark.timeout(45)
@pytest.mark.parametrize("model", REPORT)
def test_silent_connections_report(model: str) -> None:
    figures = run_silent(model, CI, count=CI.report_count, runs=1)
    (run,) = figures.runs
    # Sync's backlog (5) drops the handshakes of the rest while it holds the first.
    assert 0 < run.result.connected <= CI.report_count
    assert run.all_closed
    assert figures.served_after < 5.0
    assert_balanced(figures.stats)


# -- a peer that never reads ------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("model", NEW + REPORT)
def test_a_peer_that_never_reads_is_closed_by_write_timeout(model: str) -> None:
    # Every model, the stdlib's classes given write_timeout explicitly.
    figures = run_non_reader(model, CI)
    assert figures.closed
    # The send stops making progress once the kernel's buffers are full (a few
    # MiB of the 10): write_timeout later, the server gives up.
    assert figures.closed_after >= CI.write_timeout - 0.05
    assert figures.closed_after < CI.write_timeout + SLACK
    assert figures.stats.timeouts == 1
    assert_quiet(figures)
    assert_balanced(figures.stats)


# -- a long line ------------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("model", NEW)
def test_a_long_line_stops_at_max_line_size(model: str) -> None:
    figures = run_long_line(model, CI)
    # LineTooLong escaped the handler: the connection is closed with the rest of
    # the line unread, which the client sees before it has sent it all.
    assert figures.client.outcome == "peer-closed", figures.client
    assert figures.client.bytes_sent < CI.line_size
    assert figures.stats.lines_too_long == 1
    assert figures.rss_growth_kib < LONG_LINE_RSS_BOUND_KIB
    assert_quiet(figures)
    assert_balanced(figures.stats)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("model", REPORT)
def test_a_long_line_keeps_the_stdlib_behaviour(model: str) -> None:
    # max_line_size is None in the stdlib's classes: readline() takes it all.
    figures = run_long_line(model, CI)
    assert figures.client.outcome == "sent", figures.client
    assert figures.client.reply == b"line %d\n" % CI.line_size
    assert figures.stats.lines_too_long == 0
    assert_balanced(figures.stats)


# -- connection limits ------------------------------------------------------------------------


@contextlib.contextmanager
def holder(address: Any, source: str = "127.0.0.1") -> Iterator[Any]:
    """A connection whose handler has answered once (so it is accepted and held)."""
    with blocking_connection(address, source=source) as sock:
        sock.sendall(b"hold\n")
        assert read_line(sock) == b"hold\n"
        yield sock


def close_cleanly(sock: Any) -> None:
    """End a held connection and wait for the server's end: by then the server has
    counted it out (it counts a request out before its peer can see the close)."""
    sock.shutdown(socket.SHUT_WR)
    assert read_to_end(sock) == b""


def assert_unanswered(sock: Any, wait: float = 0.3) -> None:
    sock.settimeout(wait)
    with pytest.raises(TimeoutError):
        sock.recv(100)
    sock.settimeout(5.0)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("model", NEW)
def test_max_connections_pauses_accepting_and_resumes_below(model: str) -> None:
    limit = 4
    with Harness(model, {**limits(model, CI), "max_connections": limit}) as h:
        with contextlib.ExitStack() as stack:
            held = [stack.enter_context(holder(h.address)) for _ in range(limit)]
            accepted = h.statistics().accepted
            # The next one waits in the listen backlog, not accepted.
            extra = stack.enter_context(blocking_connection(h.address))
            extra.sendall(b"extra\n")
            assert_unanswered(extra)
            stats = h.statistics()
            # (The loop pauses when it next looks at the listener, a moment after
            # its last accept: read at_limit only once the extra one has waited.)
            assert (stats.accepted, stats.active, stats.at_limit) == (accepted, limit, True)
            close_cleanly(held[0])
            assert read_line(extra) == b"extra\n"  # accepted once below the limit
        assert h.wait_closed(5.0)
        stats = h.statistics()
        assert stats.at_limit is False
        assert_balanced(stats)
        assert h.handle_errors() == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("max_children", "max_connections"), [(3, None), (40, 3)], ids=["children", "connections"]
)
def test_forking_holds_min_of_max_children_and_max_connections(
    max_children: int, max_connections: int | None
) -> None:
    bound = 3
    attrs = {"max_children": max_children, "max_connections": max_connections}
    with Harness("forking", attrs) as h:
        with contextlib.ExitStack() as stack:
            held = [stack.enter_context(holder(h.address)) for _ in range(bound)]
            extra = stack.enter_context(blocking_connection(h.address))
            extra.sendall(b"extra\n")
            assert_unanswered(extra)
            assert h.call("children") <= bound
            close_cleanly(held[0])
            assert read_line(extra) == b"extra\n"
            assert h.call("children") <= bound
        assert h.wait_closed(10.0)
        assert_balanced(h.statistics())


@pytest.mark.timeout(30)
@pytest.mark.parametrize("model", NEW)
def test_max_connections_per_client_refuses_only_that_client(model: str) -> None:
    limit = 3
    greedy, other = ABUSERS[0], ABUSERS[1]
    with Harness(model, {**limits(model, CI), "max_connections_per_client": limit}) as h:
        with contextlib.ExitStack() as stack:
            held = [stack.enter_context(holder(h.address, greedy)) for _ in range(limit)]
            # One more from the same address: accepted and closed at once.
            with blocking_connection(h.address, source=greedy) as refused:
                started = time.monotonic()
                assert read_to_end(refused) == b""
                assert time.monotonic() - started < SLACK
            stats = h.statistics()
            assert (stats.limited, stats.refused) == (1, 1)
            # Everyone else is served as before, up to the same limit.
            for _ in range(limit):
                stack.enter_context(holder(h.address, other))
            # Below the limit again, the greedy address is served again.
            close_cleanly(held[0])
            stack.enter_context(holder(h.address, greedy))
        assert h.wait_closed(5.0)
        stats = h.statistics()
        assert (stats.limited, stats.refused) == (1, 1)
        assert_balanced(stats)
        assert h.handle_errors() == []


# -- resetters --------------------------------------------------------------------------------


@pytest.mark.timeout(45)
@pytest.mark.parametrize("model", NEW)
def test_resetting_clients_are_counted_not_reported(model: str) -> None:
    figures = run_resetters(model, CI)
    assert (figures.client.reset, figures.client.failed) == (CI.resetters, 0)
    # Every one of them reset its connection in the middle of a 1 MiB reply.
    assert figures.stats.disconnects == CI.resetters
    assert_quiet(figures)
    assert_balanced(figures.stats)


@pytest.mark.timeout(30)
def test_resetting_clients_reach_handle_error_where_client_faults_are_errors() -> None:
    # threading's stdlib default: client_faults_are_errors = True.
    attrs = {k: v for k, v in limits("threading", CI).items() if k != "client_faults_are_errors"}
    count = CI.report_count
    figures = run_resetters("threading", CI, attrs, count=count)
    assert figures.client.reset == count
    assert figures.stats.disconnects == count
    assert len(figures.handle_errors) == count
    assert all(issubclass(e, ConnectionError) for e in figures.handle_errors)
    assert figures.stderr.count("Traceback") == count


@pytest.mark.timeout(45)
@pytest.mark.parametrize("model", REPORT)
def test_resetting_clients_report(model: str) -> None:
    figures = run_resetters(model, CI, count=CI.report_count)
    assert figures.client.reset + figures.client.failed == CI.report_count
    assert figures.served_after < 5.0
    assert_balanced(figures.stats)

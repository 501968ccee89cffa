"""What the reliability suite's modules share: the scales, the cached runs of the
faults (each fault runs twice in one server process, once per model, and several
tests read its figures), and the baseline checks.

The faults themselves are tests/abuse_scenarios.py's (``run_raising``,
``run_resetters``: a ``Harness`` serving in a process of its own, the clients of
tests/abuse.py), and tests/reliability/faults.py's (descriptor exhaustion, a hub
held by a handler). scripts/soak runs the same functions at full counts.
"""

from __future__ import annotations

import functools
from typing import Any

from tests.abuse import raised_fd_limit
from tests.abuse_scenarios import (
    CI,
    RaisingFigures,
    RepeatedFigures,
    ResetFigures,
    run_raising,
    run_resetters,
)
from tests.models import MODELS

ALL = ["hub", "threading", "pool", "sync", "forking"]
# The models whose limits and client-fault rules are netserve's (tests/test_abuse.py).
NEW = ["hub", "threading", "pool"]

# Each fault runs twice in the same server: the memory check compares the runs.
RUNS = 2

# Requests to a raising handler per run: forking forks a child per request (a
# copy of the whole test process), so it gets fewer.
RAISING = {"forking": 100}
# Resetters per run: sync and forking only report (tests/test_abuse.py).
RESETTERS = {"sync": CI.report_count, "forking": CI.report_count}

# netserve's own log records at INFO and above during one run (what the CLI
# shows): none is expected (a handler's exception goes to handle_error(), a
# reset is counted and logged at DEBUG); a rate-limited episode (saturation,
# say) is a few lines, never one per request.
LOG_RECORDS_BOUND = 10

# The second run of a fault may grow the server's RSS by less than this. What
# a run costs (sockets, their objects, handler threads or greenlets, the
# tracebacks' frames) is freed after it, so the second run reuses the first
# run's memory. Measured on the development machine (2 cores, CPython 3.11):
# 0 to 64 KiB for 1,000 raising requests and for 200 resetters, every model;
# the bound is 16 times that, room for the allocator's arenas and pages that a
# busier run touches. A leak of one object per request (a traceback kept, a
# socket object) is 1,000 of them: well over it. (The server process is a fork
# of pytest's: netserve's records must not reach pytest's capturing handlers
# there, which keep every one: abuse_scenarios._ServerSide.)
RSS_BOUND_KIB = 1024

# ... and may hold at most this many more allocated Python blocks
# (``sys.getallocatedblocks()``: objects kept, whatever the allocator does
# with its pages). Measured: within 100 of the first run, every model, but the
# pool's: within 450 (its kept workers follow each run's peak concurrency, and
# its deadline heap keeps up to 64 stale entries). Before the heap dropped its
# stale entries it held every parked connection's socket until the park
# deadline, and this bound caught it (2,104 under load). One traceback kept
# per raising request is 1,000 tracebacks of several frames each: well over it.
BLOCKS_BOUND = 2_000


@functools.cache
def raising(model: str) -> RaisingFigures:
    with raised_fd_limit():
        return run_raising(model, CI, count=RAISING.get(model, CI.raising), runs=RUNS)


@functools.cache
def resets(model: str) -> ResetFigures:
    with raised_fd_limit():
        return run_resetters(model, CI, count=RESETTERS.get(model, CI.resetters), runs=RUNS)


def info_and_above(counts: dict[str, int]) -> int:
    return sum(n for level, n in counts.items() if level != "DEBUG")


def assert_back_to_baseline(model: str, figures: RepeatedFigures) -> None:
    """After each run: every connection closed, descriptors at the baseline,
    threads and greenlets at most what the model keeps by design (the pool's
    workers, the hub's spare greenlets), no child left, and the second run held
    no more descriptors than the first."""
    base = figures.baseline
    assert base is not None
    cls: Any = MODELS[model].tcp
    kept_threads = cls.max_workers if model == "pool" else 0
    kept_greenlets = cls.spare_greenlets if model == "hub" else 0
    for n, run in enumerate(figures.runs):
        where = (model, n, run.after, base)
        assert run.all_closed, where
        assert run.threads_left == 0, where
        assert run.after.fds <= base.fds, where
        assert run.after.threads <= base.threads + kept_threads, where
        assert run.after.greenlets <= base.greenlets + kept_greenlets, where
        assert run.children == 0, (where, run.children)
    # (The pool's workers and the hub's spares follow each run's peak
    # concurrency, so they may differ between runs, within their caps.)
    first, second = figures.runs
    assert second.after.fds <= first.after.fds

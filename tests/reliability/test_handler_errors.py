"""A handler that raises on every request (issue 14 §4): 1,000 requests per run
at CI scale (10,000 in scripts/soak), twice in one server, every model.

Every request is counted in ``statistics().errors`` and reported once through
``handle_error()`` (the stdlib's default output: a rule, the client's address,
the traceback, a rule, on stderr: one block per error, and nothing else on
stderr); netserve's own loggers stay quiet (``LOG_RECORDS_BOUND``); the server
serves afterwards; descriptors, threads, greenlets and children are back to the
baseline. The memory figure is tests/reliability/test_memory.py's.
"""

from __future__ import annotations

import pytest

from tests.abuse_scenarios import HandlerBugError
from tests.reliability.common import (
    ALL,
    LOG_RECORDS_BOUND,
    RUNS,
    assert_back_to_baseline,
    info_and_above,
    raising,
)

pytestmark = pytest.mark.slow

# handle_error()'s rule, before and after each report (the stdlib's).
RULE = "-" * 40
HEADER = "Exception occurred during processing of request from "
LAST = "tests.abuse_scenarios.HandlerBugError: the handler's bug"
# The longest report: the traceback's depth differs by model (about 14 lines).
REPORT_LINES_BOUND = 30


def report_lines(stderr: str) -> dict[str, int]:
    """stderr's lines by kind. Threads' reports interleave line by line (as the
    stdlib's do), so lines are counted, not reports parsed."""
    kinds = {"rule": 0, "header": 0, "traceback": 0, "frame": 0, "last": 0, "other": 0}
    for line in stderr.splitlines():
        if line == RULE:
            kinds["rule"] += 1
        elif line.startswith(HEADER):
            kinds["header"] += 1
        elif line == "Traceback (most recent call last):":
            kinds["traceback"] += 1
        elif line.startswith("  "):  # a frame, its code line, its ^^^ marker
            kinds["frame"] += 1
        elif line == LAST:
            kinds["last"] += 1
        else:
            kinds["other"] += 1
    return kinds


@pytest.mark.timeout(60)
@pytest.mark.parametrize("model", ALL)
def test_every_request_is_counted_and_reported_once(model: str) -> None:
    figures = raising(model)
    total = RUNS * figures.count
    for run in figures.runs:
        assert run.result.ended == figures.count, run.result
        assert (run.result.failed, run.result.bytes_received) == (0, 0), run.result
    assert figures.stats.errors == total, figures.stats
    # Every accepted connection was handled (the pings included) and none is left.
    assert figures.stats.handled == figures.stats.accepted, figures.stats
    assert figures.stats.active == 0
    if model != "forking":  # a forked child's handle_error() runs in the child
        assert figures.handle_errors == [HandlerBugError] * total
    # One report per error, all of stderr (log volume: the stdlib's, no more).
    kinds = report_lines(figures.stderr)
    assert kinds["other"] == 0, figures.stderr[-3000:]
    assert (kinds["rule"], kinds["header"], kinds["traceback"], kinds["last"]) == (
        2 * total,
        total,
        total,
        total,
    ), kinds
    # Each report alike: its frames are the same few for every error.
    assert kinds["frame"] % total == 0, kinds
    assert sum(kinds.values()) <= REPORT_LINES_BOUND * total, kinds


@pytest.mark.timeout(60)
@pytest.mark.parametrize("model", ALL)
def test_netserve_logs_nothing_per_error(model: str) -> None:
    figures = raising(model)
    for run in figures.runs:
        assert info_and_above(run.log_counts) <= LOG_RECORDS_BOUND, run.log_counts
    # Not even at DEBUG: the report is handle_error()'s alone.
    assert figures.runs[-1].log_counts.get("DEBUG", 0) == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("model", ALL)
def test_the_server_serves_afterwards_with_nothing_left_over(model: str) -> None:
    figures = raising(model)
    assert figures.served_after < 5.0
    assert_back_to_baseline(model, figures)

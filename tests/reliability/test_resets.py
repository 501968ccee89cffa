"""Clients resetting in the middle of a 1 MiB reply (issue 14 §4): 200 per run
at CI scale (5,000 in scripts/soak), twice in one server, every model.

In the new models (hub, threading with ``client_faults_are_errors`` off, pool)
each reset is a normal event: counted in ``statistics().disconnects``, logged at
DEBUG, no ``handle_error()`` and no traceback. Sync and forking keep the
stdlib's rule (a reset reaches ``handle_error()``) and report. In every model
the server serves afterwards and descriptors, threads, greenlets and children
are back to the baseline. tests/test_abuse.py has the single-run assertions of
issue 11's table; the memory figure is tests/reliability/test_memory.py's.
"""

from __future__ import annotations

import pytest

from tests.reliability.common import (
    ALL,
    LOG_RECORDS_BOUND,
    NEW,
    RUNS,
    assert_back_to_baseline,
    info_and_above,
    resets,
)

pytestmark = pytest.mark.slow


@pytest.mark.timeout(60)
@pytest.mark.parametrize("model", NEW)
def test_every_reset_is_a_counted_disconnect(model: str) -> None:
    figures = resets(model)
    for run in figures.runs:
        assert (run.result.reset, run.result.failed) == (figures.count, 0), run.result
        assert info_and_above(run.log_counts) <= LOG_RECORDS_BOUND, run.log_counts
    assert figures.stats.disconnects == RUNS * figures.count, figures.stats
    assert figures.stats.errors == 0
    assert figures.handle_errors == []
    assert figures.stderr == ""
    # One DEBUG record per disconnect, by the end of the second run.
    assert figures.runs[-1].log_counts.get("DEBUG", 0) == RUNS * figures.count


@pytest.mark.timeout(60)
@pytest.mark.parametrize("model", ["sync", "forking"])
def test_resets_report(model: str) -> None:
    figures = resets(model)
    for run in figures.runs:
        assert run.result.reset + run.result.failed == figures.count, run.result
        assert run.result.reset > 0
    # The stdlib's rule: each reset the server saw reaches handle_error() (in a
    # forked child, whose report goes to the same stderr).
    assert figures.stats.errors == figures.stats.disconnects
    assert figures.stderr.count("Traceback") == figures.stats.errors


@pytest.mark.timeout(60)
@pytest.mark.parametrize("model", ALL)
def test_the_server_serves_afterwards_with_nothing_left_over(model: str) -> None:
    figures = resets(model)
    assert figures.served_after < 5.0
    assert figures.stats.active == 0
    assert_back_to_baseline(model, figures)

"""A handler that blocks the hub (issue 14 §4): under the supervisor, the hub's
watchdog logs the stall with the handler's name and the line that blocks, and
the worker, silent past the supervisor's ``timeout``, is replaced; the
replacement serves. tests/test_hub_limits.py checks the watchdog in-process,
tests/test_supervisor.py the replacement of a blocked worker per model."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.faults import run_stall

pytestmark = pytest.mark.slow

TIMEOUT_S = 1.0
# Silence is noticed within the timeout, and the replacement starts at once:
# a worker's start-up on a loaded machine is the rest.
REPLACED_BOUND_S = TIMEOUT_S + 5.0


@pytest.mark.timeout(60)
def test_a_blocked_hub_is_named_and_its_worker_replaced(tmp_path: Path) -> None:
    figures = run_stall(tmp_path, TIMEOUT_S)
    tail = figures.stderr[-3000:]
    # Logged once per stalled pass (the blocked pass never ends).
    assert figures.warnings == 1, tail
    assert figures.named, tail
    assert figures.replaced_after < REPLACED_BOUND_S, figures.replaced_after
    assert figures.served_after
    assert figures.blocked_connection_ended
    assert figures.old_worker_gone
    assert figures.supervisor_exit == 0, tail

"""Descriptor exhaustion (issue 14 §4), every model: while the server's table
is full and clients wait, it spends almost no CPU (it backs off instead of
retrying accept() in a loop), and once descriptors are free a new client is
answered promptly. tests/test_accept.py checks the policy itself (one warning,
the back-off schedule, shedding with the reserved descriptor)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.common import ALL
from tests.reliability.faults import run_emfile

pytestmark = pytest.mark.slow

# Near 0: a server that backs off (10 ms doubling to 1 s) wakes a few times in
# the window; one that retries accept() in a loop spends all of it.
CPU_WINDOW_S = 2.0
CPU_BOUND_S = 0.3
# The back-off's longest pause is 1 s: a server retries accept() within it.
RECOVERY_BOUND_S = 5.0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("model", ALL)
def test_a_full_descriptor_table_costs_no_cpu_and_the_server_recovers(
    model: str, tmp_path: Path
) -> None:
    figures = run_emfile(model, tmp_path, CPU_WINDOW_S)
    tail = figures.stderr[-3000:]
    assert figures.cpu_s < CPU_BOUND_S, (figures.cpu_s, tail)
    assert figures.recovered, (figures.attempts, tail)
    assert figures.recovery_s < RECOVERY_BOUND_S, figures
    assert figures.stats.get("accept_errors", 0) > 0, figures.stats
    assert figures.exit_status == 0, tail

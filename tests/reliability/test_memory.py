"""Memory under repeated faults (issue 14 §4): each fault runs twice in the same
server process, and the second run may grow its RSS by less than
``RSS_BOUND_KIB`` and its allocated Python blocks by less than ``BLOCKS_BOUND``
(tests/reliability/common.py says how those bounds were set).
tests/test_abuse.py does the same for 300 silent connections."""

from __future__ import annotations

import pytest

from tests.reliability.common import ALL, BLOCKS_BOUND, RSS_BOUND_KIB, raising, resets

pytestmark = pytest.mark.slow


@pytest.mark.timeout(60)
@pytest.mark.parametrize("model", ALL)
def test_a_second_run_of_raising_requests_stays_within_the_bound(model: str) -> None:
    figures = raising(model)
    assert figures.rss_growth_kib < RSS_BOUND_KIB
    assert figures.block_growth < BLOCKS_BOUND


@pytest.mark.timeout(60)
@pytest.mark.parametrize("model", ALL)
def test_a_second_run_of_resetters_stays_within_the_bound(model: str) -> None:
    figures = resets(model)
    assert figures.rss_growth_kib < RSS_BOUND_KIB
    assert figures.block_growth < BLOCKS_BOUND

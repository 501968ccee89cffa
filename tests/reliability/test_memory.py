"""Memory under repeated faults (issue 14 §4): each fault runs twice in the same
server process, and the second run may grow its RSS by less than
``RSS_BOUND_KIB`` (tests/reliability/common.py says how that bound was set).
tests/test_abuse.py does the same for 300 silent connections."""

from __future__ import annotations

import pytest

from tests.reliability.common import ALL, RSS_BOUND_KIB, raising, resets

pytestmark = pytest.mark.slow


@pytest.mark.timeout(60)
@pytest.mark.parametrize("model", ALL)
def test_a_second_run_of_raising_requests_stays_within_the_bound(model: str) -> None:
    assert raising(model).rss_growth_kib < RSS_BOUND_KIB


@pytest.mark.timeout(60)
@pytest.mark.parametrize("model", ALL)
def test_a_second_run_of_resetters_stays_within_the_bound(model: str) -> None:
    assert resets(model).rss_growth_kib < RSS_BOUND_KIB

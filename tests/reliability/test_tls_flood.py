"""A TLS handshake flood (issue 14 §4, issue 13 §1): clients that handshake and
hang up as fast as they can, and connections stuck mid-handshake, beside
legitimate TLS clients. The server keeps answering them, ends every stalled
handshake at its stage_timeout, and holds nothing afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.common import NEW
from tests.reliability.faults import run_tls_flood

pytestmark = pytest.mark.slow


@pytest.mark.timeout(60)
@pytest.mark.parametrize("model", NEW)
def test_a_handshake_flood_leaves_legitimate_clients_served(model: str, tmp_path: Path) -> None:
    figures = run_tls_flood(model, tmp_path)
    stats = figures.stats
    assert figures.legit_failures == 0, figures
    assert figures.legit_requests > 20, figures  # both kept being answered
    # Generous: one reply waits at most for a few handshakes' CPU, never for a
    # stalled one (their stage_timeout is 1 s).
    assert figures.legit_max_s < 0.9, figures
    assert figures.handshakes > 0, figures
    assert figures.stalled_closed == figures.stalled, figures
    assert stats.timeouts_by_kind.get("stage_timeout", 0) >= figures.stalled, stats
    assert stats.errors == 0, stats
    assert figures.all_closed
    assert figures.after.fds <= figures.before.fds, (figures.before, figures.after)
    assert "Traceback" not in figures.stderr

"""The benchmark suite itself works: a smoke run of a few seconds.

It measures nothing that is asserted (speed is for the suite to report); it
checks that the C tools build, that servers start, answer correctly and stop,
and that the reports are written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def need_a_compiler() -> None:
    if shutil.which(os.environ.get("CC", "cc")) is None:
        # scripts/test installs a compiler; without one under CI this fails.
        message = "the benchmark smoke test needs a C compiler"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_a_compiler()
    out = tmp_path_factory.mktemp("bench")
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--out", str(out)],
        check=True,
        timeout=240,
        capture_output=True,
    )
    return out


@pytest.mark.timeout(300)
def test_smoke_run_measures_every_row_without_errors(smoke_results: Path) -> None:
    raw = json.loads((smoke_results / "latest.json").read_text())
    assert raw["machine"]["cores"] >= 1
    rows = {(run["scenario"], run["row"]) for run in raw["runs"]}
    for row in ("c-epoll", "netserve-hub", "netserve-pool"):
        assert ("pingpong c=16", row) in rows
        assert ("churn c=4", row) in rows
    for run in raw["runs"]:
        assert len(run["rounds"]) == 2  # two rounds, alternating order
        for figures in run["rounds"]:
            assert figures["errors"] == 0, run
            assert figures["requests"] > 0, run
            assert figures["p99_us"] >= figures["p50_us"] > 0
            if raw["machine"]["server_core"] is not None:
                # The hypervisor's share of the pinned cores (Linux /proc/stat).
                assert 0 <= figures["steal"] <= 1
    assert set(raw["shutdown"]) >= {"netserve-hub", "stdlib-threading"}


@pytest.mark.timeout(300)
def test_smoke_run_writes_the_reports(smoke_results: Path) -> None:
    report = (smoke_results / "latest.md").read_text()
    assert "| netserve-hub |" in report
    assert "## shutdown() latency" in report
    png = (smoke_results / "latest.png").read_bytes()
    assert png.startswith(b"\x89PNG")


@pytest.mark.timeout(120)
def test_ab_compares_two_trees_window_by_window() -> None:
    need_a_compiler()
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "ab.py"),
            "netserve-hub",
            f"netserve-hub@{ROOT}",
            "--scenario",
            "pingpong c=16",
            "--rounds",
            "2",
            "--window",
            "0.3",
            "--warmup",
            "0.1",
        ],
        check=True,
        timeout=100,
        capture_output=True,
        text=True,
    )
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["pair 1", "pair 2"]
    assert "steal" in lines[0]
    assert lines[2].startswith(f"pingpong c=16, netserve-hub / netserve-hub@{ROOT} over 2 pairs:")


def test_ab_refuses_a_tree_without_netserve(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "ab.py"),
            "netserve-hub",
            f"netserve-hub@{tmp_path}",
        ],
        check=False,
        timeout=60,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "has no src/netserve" in result.stderr

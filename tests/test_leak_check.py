"""The leak check fails a test whose thread outlives it, naming the thread and its stack."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")


def test_a_thread_still_running_after_the_grace_is_named_with_its_stack(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(
        """
        import threading

        def test_leaves_a_thread_waiting():
            gate = threading.Event()
            # Bounded: the daemon thread ends with the inner pytest's process.
            threading.Thread(target=gate.wait, args=(30,), name="lingering", daemon=True).start()

        def test_a_thread_that_ends_within_the_grace_is_not_a_leak():
            threading.Timer(0.2, lambda: None).start()
        """
    )
    # A process of its own: the lingering thread must not outlive it into this test.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*test_leaves_a_thread_waiting leaked: thread 'lingering' still running 1 s after*",
            "*in wait*",
        ]
    )

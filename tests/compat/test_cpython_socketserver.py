"""CPython's own test_socketserver, run against netserve.

The interpreter's ``test.test_socketserver`` is imported while ``socketserver``
in ``sys.modules`` is netserve, so every ``socketserver.X`` it uses is ours. Each
of its tests becomes one pytest test that fails on a failure, an error *or a
skip*: a skipped compatibility test is not a passed one.

Excluded: ``MiscTestCase.test_all``, which checks that the stdlib module's own
classes carry ``__module__ == "socketserver"`` (the issue allows excluding it).
"""

from __future__ import annotations

import importlib
import sys
import unittest
from collections.abc import Iterator

import pytest

import netserve

EXCLUDED = {"test.test_socketserver.MiscTestCase.test_all"}


def _load_suite_against_netserve() -> object:
    saved_socketserver = sys.modules.get("socketserver")
    saved_suite = sys.modules.pop("test.test_socketserver", None)
    sys.modules["socketserver"] = netserve
    try:
        module = importlib.import_module("test.test_socketserver")
    finally:
        # Only that module is bound to netserve; the rest of the session keeps
        # the stdlib (the differential tests import it).
        if saved_socketserver is None:
            del sys.modules["socketserver"]
        else:
            sys.modules["socketserver"] = saved_socketserver
        if saved_suite is not None:
            sys.modules["test.test_socketserver"] = saved_suite
    return module


_MODULE = _load_suite_against_netserve()


def _cases(suite: unittest.TestSuite) -> Iterator[unittest.TestCase]:
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from _cases(item)
        else:
            yield item


_CASES = {
    case.id(): case for case in _cases(unittest.defaultTestLoader.loadTestsFromModule(_MODULE))
}


def test_the_suite_is_bound_to_netserve() -> None:
    assert _MODULE.socketserver is netserve  # type: ignore[attr-defined]
    # Sanity: the suite was found and is the size CPython ships (27 on 3.11).
    assert len(_CASES) >= 25
    assert EXCLUDED <= set(_CASES)


@pytest.mark.parametrize("test_id", sorted(set(_CASES) - EXCLUDED))
def test_cpython(test_id: str) -> None:
    result = unittest.TestResult()
    _CASES[test_id].run(result)
    assert result.testsRun == 1
    problems = [text for _, text in result.errors + result.failures]
    problems += [f"skipped: {reason}" for _, reason in result.skipped]
    assert not problems, "\n".join(problems)

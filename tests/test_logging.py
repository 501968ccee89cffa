"""netserve's logging: the JSON format, as a formatter and as the command's option."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

import netserve
from tests.test_serve_cli import LogLines, app_dir, serving

__all__ = ["app_dir"]  # the fixture, used here


def record(message: str, *args: object, **attributes: object) -> logging.LogRecord:
    made = logging.LogRecord("netserve.test", logging.WARNING, __file__, 1, message, args, None)
    made.__dict__.update(attributes)
    return made


def test_json_formatter_writes_one_object_per_record() -> None:
    line = netserve.JsonFormatter().format(record("%d workers", 3))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "3 workers"
    assert (entry["level"], entry["logger"]) == ("WARNING", "netserve.test")
    assert entry["time"].endswith("Z")
    assert isinstance(entry["pid"], int)


def test_json_formatter_carries_netserve_fields_and_exceptions() -> None:
    try:
        raise ValueError("bad")
    except ValueError:
        exc_info = sys.exc_info()
    made = record("access", netserve={"peer": "127.0.0.1:5", "bytes_in": 3}, exc_info=exc_info)
    entry = json.loads(netserve.JsonFormatter().format(made))
    assert (entry["peer"], entry["bytes_in"]) == ("127.0.0.1:5", 3)
    assert entry["exception"].endswith("ValueError: bad")


def test_the_command_logs_json_lines(app_dir: Path) -> None:
    with serving(app_dir, "app:Echo", "-b", "127.0.0.1:0", "--log-format", "json") as (
        proc,
        _,
        _address,
    ):
        log = LogLines(proc)
        [line] = log.until(r"^\{.*serving.*\}$")
        entry = json.loads(line)
        assert entry["logger"] == "netserve.supervisor"
        assert entry["message"].startswith("worker 1 (pid ")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0
        for text in err.splitlines():
            json.loads(text)  # every line, to the end

"""app.logs: the log configuration ``visage serve`` hands uvicorn, and the fallback handler ``create_app`` adds.
(The lines of a real server, request ids included, are checked in test_app_e2e.)"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
from app_helpers import REPO

from app.logs import NO_REQUEST, configure_logging, json_formatter, startup_line


@pytest.fixture
def bare_visage_logger() -> Iterator[logging.Logger]:
    """The ``visage`` logger without handlers (other tests' apps gave it one), restored afterwards."""
    logger = logging.getLogger("visage")
    saved, level = logger.handlers[:], logger.level
    logger.handlers.clear()
    yield logger
    logger.handlers[:] = saved
    logger.setLevel(level)


def test_the_fallback_handler_leaves_the_host_applications_handlers_working(bare_visage_logger):
    host = logging.getLogger("host-app")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    host.addHandler(handler)
    try:
        configure_logging("info", "json")
        configure_logging("info", "json")  # a second app in the same process adds nothing
        host.warning("still here")  # dictConfig would have closed every handler in the process
        assert stream.getvalue() == "still here\n"
        assert len(bare_visage_logger.handlers) == 1
    finally:
        host.removeHandler(handler)


def test_json_config_writes_one_object_a_line_without_uvicorns_colour_copy():
    # in a child process: dictConfig closes every handler of the process it runs in, pytest's own included
    script = (
        "import logging, logging.config\n"
        "from app.logs import log_config\n"
        "logging.config.dictConfig(log_config('info', 'json'))\n"
        "logging.getLogger('uvicorn.error').info('Started server process [%d]', 7,\n"
        "    extra={'color_message': 'Started \\x1b[36m%d\\x1b[0m'})\n"
        "logging.getLogger('visage.test').warning('hello')\n"
        "logging.getLogger('asgi_correlation_id').warning('Generated new request ID')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines()]  # every line is JSON
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", records[0]["time"]), records[0]["time"]
    assert records[0] == {"time": records[0]["time"], "level": "INFO", "logger": "uvicorn.error",
                          "pid": records[0]["pid"], "request_id": NO_REQUEST, "message": "Started server process [7]"}
    assert records[0]["pid"] == records[1]["pid"] > 0  # which worker wrote the line, with --workers N
    assert records[1]["logger"] == "visage.test" and records[1]["message"] == "hello"
    assert len(records) == 2  # the middleware's warning about a refused client id is not a line per request


def test_json_time_is_iso_8601_utc_with_milliseconds_whatever_the_local_zone(monkeypatch):
    """It was logging's default, local time without a zone: ``2026-11-30 19:58:23,589``."""
    import time

    monkeypatch.setenv("TZ", "America/New_York")  # 5 hours behind UTC in November: local time would be 14:58
    time.tzset()
    try:
        record = logging.LogRecord("visage.test", logging.INFO, __file__, 0, "hello", None, None)
        record.created, record.msecs, record.correlation_id = 1796068703.589, 589.0, NO_REQUEST
        line = json.loads(json_formatter().format(record))
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert line["time"] == "2026-11-30T19:58:23.589Z"  # not 14:58:23,589


def test_a_start_up_line_is_as_written_in_text_and_a_log_object_in_json(capsys):
    startup_line("Visage on http://127.0.0.1:8000", "text")
    assert capsys.readouterr().out == "Visage on http://127.0.0.1:8000\n"
    startup_line("Visage on http://127.0.0.1:8000", "json", logging.WARNING)
    line = json.loads(capsys.readouterr().out)
    assert line == {"time": line["time"], "level": "WARNING", "logger": "visage.serve", "pid": os.getpid(),
                    "request_id": NO_REQUEST, "message": "Visage on http://127.0.0.1:8000"}

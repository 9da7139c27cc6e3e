"""app.logs: the log configuration ``visage serve`` hands uvicorn, and the fallback handler ``create_app`` adds.
(The lines of a real server, request ids included, are checked in test_app_e2e.)"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest
from app_helpers import REPO

from app.logs import NO_REQUEST, configure_logging


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
    assert records[0] == {"time": records[0]["time"], "level": "INFO", "logger": "uvicorn.error",
                          "request_id": NO_REQUEST, "message": "Started server process [7]"}
    assert records[1]["logger"] == "visage.test" and records[1]["message"] == "hello"
    assert len(records) == 2  # the middleware's warning about a refused client id is not a line per request

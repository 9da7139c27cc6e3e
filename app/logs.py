"""The service's logging: Visage's lines written while a request is handled, and uvicorn's access line, carry
its request id (the ``X-Request-ID`` header, taken from the client or a proxy when it looks like an id, else
generated, and sent back on the response), so a user's "my request failed" and a 500's traceback meet in one
``grep``.
``VISAGE_LOG_FORMAT=json`` writes one JSON object a line for log collectors, its ``time`` in ISO-8601 UTC with
milliseconds (``2026-11-30T19:58:23.589Z``); ``visage serve``'s own start-up lines too (``startup_line``)."""

from __future__ import annotations

import copy
import logging
import re
import sys
import time
from typing import IO, Any, Literal

import uvicorn.config
from asgi_correlation_id import CorrelationIdFilter, CorrelationIdMiddleware, correlation_id
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter
from starlette.applications import Starlette

REQUEST_ID_HEADER = "X-Request-ID"
NO_REQUEST = "-"  # the id field of lines written outside a request (start-up, shutdown, background work)
LogFormat = Literal["text", "json"]

# UUIDs, nginx's $request_id, AWS's X-Amzn-Trace-Id values, ... but nothing that could forge a log line
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:;=/+\-]{1,200}")


def acceptable_request_id(value: str) -> bool:
    return _REQUEST_ID.fullmatch(value) is not None


def current_request_id() -> str | None:
    return correlation_id.get()


def add_request_ids(app: Starlette) -> None:
    """Give every request an id, the 500s of the outer middleware too when added after them (outermost)."""
    app.add_middleware(CorrelationIdMiddleware, header_name=REQUEST_ID_HEADER, validator=acceptable_request_id)


class UtcJsonFormatter(JsonFormatter):
    """python-json-logger's formatter with ``time`` in ISO-8601 UTC to the millisecond, ``...T19:58:23.589Z``
    (logging's default is local time without a zone, ``2026-11-30 19:58:23,589``, which collectors misread)."""

    converter = time.gmtime
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"


JSON_FORMATTER = {
    "()": "app.logs.UtcJsonFormatter",
    # pid: with --workers N, which worker wrote the line
    "fmt": "%(asctime)s %(levelname)s %(name)s %(process)d %(correlation_id)s %(message)s",
    "rename_fields": {
        "asctime": "time",
        "levelname": "level",
        "name": "logger",
        "process": "pid",
        "correlation_id": "request_id",
    },
    "reserved_attrs": [*RESERVED_ATTRS, "color_message"],  # uvicorn's ANSI-coloured copy of the message
}
VISAGE_TEXT = "%(levelname)-9s %(name)s [%(correlation_id)s]: %(message)s"


def log_config(level: str, log_format: LogFormat = "text") -> dict[str, Any]:
    """uvicorn's own ``LOGGING_CONFIG`` plus the request-id filter on every handler, the id at the end of its
    access lines, and a handler for Visage's loggers (``visage serve`` hands it to uvicorn, which applies it in
    every worker and sets uvicorn's levels from ``log_level``)."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["filters"] = {"request_id": {"()": CorrelationIdFilter, "default_value": NO_REQUEST}}
    formatters = config["formatters"]
    if log_format == "json":
        config["formatters"] = {name: dict(JSON_FORMATTER) for name in (*formatters, "visage")}
    else:
        formatters["access"]["fmt"] += " [%(correlation_id)s]"
        formatters["visage"] = {"format": VISAGE_TEXT}
    config["handlers"]["visage"] = {**config["handlers"]["default"], "formatter": "visage"}
    for handler in config["handlers"].values():
        handler["filters"] = ["request_id"]
    config["loggers"]["visage"] = {"handlers": ["visage"], "level": uvicorn.config.LOG_LEVELS[level]}
    # its warning about a refused client id would be a line per bad request, and not in the chosen format
    config["loggers"]["asgi_correlation_id"] = {"handlers": ["visage"], "level": "ERROR", "propagate": False}
    return config


def configure_logging(level: str, log_format: LogFormat = "text") -> None:
    """Give the ``visage.*`` loggers a handler, unless ``visage serve`` (through uvicorn) or the host application
    configured one; the level is the settings' either way. Adds a handler rather than running ``dictConfig``,
    which would close the host application's own handlers."""
    logger = logging.getLogger("visage")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.addFilter(CorrelationIdFilter(default_value=NO_REQUEST))
        if log_format == "json":
            handler.setFormatter(json_formatter())
        else:
            handler.setFormatter(logging.Formatter(VISAGE_TEXT))
        logger.addHandler(handler)
        refused_ids = logging.getLogger("asgi_correlation_id")
        if refused_ids.level == logging.NOTSET:  # as in log_config, unless the host application chose
            refused_ids.setLevel(logging.ERROR)
    logger.setLevel(uvicorn.config.LOG_LEVELS[level])


def json_formatter() -> UtcJsonFormatter:
    options = {k: v for k, v in JSON_FORMATTER.items() if k != "()"}
    return UtcJsonFormatter(options.pop("fmt"), **options)


def startup_line(message: str, log_format: LogFormat, level: int = logging.INFO, stream: IO[str] | None = None) -> None:
    """A line ``visage serve`` writes before uvicorn has set up logging: as it is in ``text`` (default: to
    stdout), in ``json`` the same object as every other line (logger ``visage.serve``, no request id)."""
    if log_format == "json":
        record = logging.LogRecord("visage.serve", level, __file__, 0, message, None, None)
        record.correlation_id = NO_REQUEST
        message = json_formatter().format(record)
    print(message, file=stream or sys.stdout, flush=True)

"""The service's logging: every line written while a request is handled carries its request id (the
``X-Request-ID`` header, taken from the client or a proxy when it looks like an id, else generated, and sent
back on the response), so a user's "my request failed" and a 500's traceback meet in one ``grep``.
``VISAGE_LOG_FORMAT=json`` writes one JSON object a line for log collectors."""

from __future__ import annotations

import logging
import logging.config
import re
from typing import Any, Literal

from asgi_correlation_id import CorrelationIdMiddleware, correlation_id
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


def _formatters(log_format: LogFormat) -> dict[str, dict[str, Any]]:
    if log_format == "json":
        json_formatter = {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(correlation_id)s %(message)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger",
                              "correlation_id": "request_id"},
        }
        return {"visage": json_formatter, "uvicorn": json_formatter, "access": json_formatter}
    return {
        "visage": {"format": "%(levelname)-9s %(name)s [%(correlation_id)s]: %(message)s"},
        "uvicorn": {"()": "uvicorn.logging.DefaultFormatter", "fmt": "%(levelprefix)s %(message)s"},
        "access": {
            "()": "uvicorn.logging.AccessFormatter",
            "fmt": '%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s [%(correlation_id)s]',
        },
    }


def log_config(level: str, log_format: LogFormat = "text") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for uvicorn's loggers and Visage's (``visage serve`` hands it to
    uvicorn, which applies it in every worker). Levels are uvicorn's to set, from ``log_level``."""
    handler = {"class": "logging.StreamHandler", "filters": ["request_id"], "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": "asgi_correlation_id.CorrelationIdFilter", "default_value": NO_REQUEST}},
        "formatters": _formatters(log_format),
        "handlers": {
            "visage": {**handler, "formatter": "visage"},
            "uvicorn": {**handler, "formatter": "uvicorn"},
            "access": {**handler, "formatter": "access", "stream": "ext://sys.stdout"},
        },
        "loggers": {
            "visage": {"handlers": ["visage"], "level": _level(level)},
            "uvicorn": {"handlers": ["uvicorn"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
        },
    }


def _level(level: str) -> int | str:
    return 5 if level == "trace" else level.upper()  # uvicorn's TRACE is level 5


def configure_logging(level: str, log_format: LogFormat = "text") -> None:
    """Give the ``visage.*`` loggers a handler, unless ``visage serve`` (through uvicorn) or the host application
    configured one; the level is the settings' either way."""
    logger = logging.getLogger("visage")
    if not logger.handlers:
        config = log_config(level, log_format)
        logging.config.dictConfig({**config, "loggers": {"visage": config["loggers"]["visage"]}})
    logger.setLevel(_level(level))

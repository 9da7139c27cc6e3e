"""The one place typed errors become HTTP responses: ``{"error": code, "detail": text}`` with the right
status.

The service's own errors extend ``model.errors.VisageError`` (``code`` + ``status``), so the image errors
raised deep inside ``model`` and the gallery errors raised here travel the same way. FastAPI's validation
errors and Starlette's 404/405 are reshaped too, so a client only ever parses one error format, and anything
unexpected is a 500 ``internal_error`` without a traceback in the body.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.logs import current_request_id
from model.errors import VisageError

log = logging.getLogger("visage.errors")


class BadParameter(VisageError):
    """A request parameter that is missing, malformed or out of range."""

    code = "bad_parameter"
    status = 422


class SubjectNotFound(VisageError):
    code = "subject_not_found"
    status = 404


class FaceNotFound(VisageError):
    code = "face_not_found"
    status = 404


class NameTaken(VisageError):
    """Subject names are unique: a rename onto an existing name is refused, not merged."""

    code = "name_taken"
    status = 409


class FaceOfImageEnrolled(VisageError):
    """A subject holds one face per image: pointing at another face of an image already enrolled for it is
    refused rather than answered with the stored face."""

    code = "image_already_enrolled"
    status = 409


class LowQualityFace(VisageError):
    """An enrollment face under ``VISAGE_MIN_ENROLL_QUALITY``: refused, where a probe of the same quality is only
    answered with a lower score."""

    code = "low_quality_face"
    status = 422


class NoCurrentFaces(VisageError):
    """The subject's faces were all embedded by another model version (run ``visage reindex``)."""

    code = "no_current_faces"
    status = 409


class StoreUnreadable(VisageError):
    """The gallery's SQLite file is damaged or not a database at all."""

    code = "store_unreadable"
    status = 503


RETRY_AFTER_S = 5  # the model loads in ~5-10 s; a lock or a full disk may take longer, and clients back off


class StorageUnavailable(VisageError):
    """The gallery could not be read or written for a reason outside the request: the disk is full or read-only,
    an I/O error, or another process held the write lock past the busy timeout. A write's transaction was rolled
    back, so nothing of the request was stored, and the same request can be sent again."""

    code = "storage_unavailable"
    status = 503


class Unauthorized(VisageError):
    code = "unauthorized"
    status = 401


class NotReady(VisageError):
    """The model or the index is still loading (or failed to load: see ``/readyz``)."""

    code = "not_ready"
    status = 503


class StillLoading(NotReady):
    """Not ready yet, and nothing has failed: worth asking again shortly (a failed load is not)."""


class ClientGone(VisageError):
    """The client closed the connection while its image waited for the inference threads: the work was dropped
    before it started (nothing stored), and the status (nginx's 499) is for the metrics only, since nobody is left
    to read it (uvicorn writes no access line either: ``run_cpu`` logs one)."""

    code = "client_closed_request"
    status = 499


class Overloaded(VisageError):
    """``VISAGE_MAX_PENDING_IMAGES`` image requests are already running or waiting for the model: each holds
    its upload (up to ``VISAGE_MAX_UPLOAD_BYTES``) in memory while it waits, so an unbounded queue would end in
    the kernel's OOM killer. Nothing was stored; the same request may be sent again."""

    code = "overloaded"
    status = 503


class RequestTooLarge(VisageError):
    code = "request_too_large"
    status = 413


# Codes for Starlette's own HTTP errors (unknown route, wrong method, ...).
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}


def error_body(code: str, detail: str) -> dict[str, str]:
    return {"error": code, "detail": detail}


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, detail), status_code=status, headers=headers)


def describe_validation(exc: RequestValidationError) -> str:
    """FastAPI's list of pydantic errors -> one readable sentence naming each bad field."""
    parts = []
    for err in exc.errors():
        offset = err.get("loc", ())[-1:]
        if err.get("type") == "json_invalid" and offset and isinstance(offset[0], int):
            # a whole JSON body: FastAPI's loc is ("body", offset), and "1: JSON decode error" said little
            reason = (err.get("ctx") or {}).get("error", "JSON decode error")
            parts.append(f"body: not valid JSON at character {err['loc'][-1] + 1} ({reason})")  # 1-based
            continue
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header", "form")]
        field = ".".join(loc) or "request"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if tuple(err.get("loc", ())) == ("body",) and err.get("type") in ("model_attributes_type", "dict_type"):
            # a JSON body sent without its content type arrives as text: "Input should be a valid dictionary";
            # with it, another JSON value ([1]) was told the same, though its content type was right
            got = err.get("input")
            kind = ("an array" if isinstance(got, list) else "null" if got is None else
                    "true or false" if isinstance(got, bool) else "a number" if isinstance(got, int | float) else "")
            parts.append(f"body: send a JSON object, not {kind}" if kind else
                         "body: send a JSON object with Content-Type: application/json")
            continue
        if msg.startswith("Expected UploadFile"):  # FastAPI's words name a Python class: "received: <class 'str'>"
            msg = f"send a file here, not text (multipart: curl -F {field}=@photo.jpg)"
        parts.append(f"{field}: {msg}")
    return "; ".join(parts) or "invalid request"


async def _visage_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, VisageError)
    headers = {"WWW-Authenticate": "APIKey"} if exc.status == 401 else None
    if isinstance(exc, StillLoading | StorageUnavailable):  # passing conditions: say when to ask again
        headers = {"Retry-After": str(RETRY_AFTER_S)}
    elif isinstance(exc, Overloaded):  # a queue drains in a second or two
        headers = {"Retry-After": "1"}
    if exc.status >= 500 and not isinstance(exc, NotReady | Overloaded):  # (counted in /metrics, not logged)
        log.error("%s %s: %s", request.method, request.url.path, exc.detail)
    return error_response(exc.status, exc.code, exc.detail, headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, BadParameter.code, describe_validation(exc))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = HTTP_CODES.get(exc.status_code, "http_error")
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    if exc.status_code == 400 and detail == "There was an error parsing the body":  # FastAPI's words
        detail = "the request body could not be parsed: send UTF-8 JSON (or multipart/form-data for images)"
    elif exc.status_code == 404 and detail == "Not Found":
        detail = f"no route {request.method} {request.url.path}"
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
        if methods := allowed_methods(request):  # (none found inside a mounted app: keep what it said)
            headers = {**(headers or {}), "Allow": ", ".join(methods)}
    return error_response(exc.status_code, code, detail, headers)


HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves on this path. Starlette's 405 names only the first route whose path
    matched, so a path served by two routes (``GET`` and a hidden ``HEAD``) told clients ``Allow: HEAD``.
    Asks each route through the public ``matches`` with the method swapped: FastAPI nests included routers."""
    routes = request.app.router.routes
    return [
        method
        for method in HTTP_METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    ]


class UnexpectedErrors:
    """ASGI middleware, outermost: anything no handler took becomes the 500 ``internal_error``, logged once with
    its traceback (the metrics middleware inside it counts a raise as a 500). An ``Exception`` handler would run
    in Starlette's own outermost middleware, which re-raises after answering, so uvicorn logged it a second time."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if started:  # too late for another status line: the server closes the connection
                raise
            detail = f"an unexpected error occurred; the service log has it under request id {current_request_id()}"
            response = error_response(500, "internal_error", detail)
            await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(VisageError, _visage_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(UnexpectedErrors)

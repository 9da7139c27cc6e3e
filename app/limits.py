"""Request limits: the body's size, enforced before FastAPI parses a multipart upload, and the number of image
requests admitted at once.

A declared ``Content-Length`` over the limit is refused at once without reading the body; a chunked body is
counted as it streams and refused as soon as it passes the limit, so an oversized upload never fills the disk
(Starlette spools large multipart files to temporary files). Both answer 413 in the usual JSON error shape.
A multipart body that ends before its closing boundary (a cut-off upload) is a 400: Starlette's parser drops the
unfinished part, and the request was refused for a field the client did send.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from python_multipart.multipart import parse_options_header
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import Overloaded, RequestTooLarge, error_response


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(
                413,
                RequestTooLarge.code,
                f"the request body is {declared} bytes; the limit is {self.max_bytes}",
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)
            return
        received = 0
        closing = _closing_delimiter(headers.get("content-type", ""))
        seen = b""  # the end of the body so far, long enough to hold a closing delimiter split across messages

        async def counted_receive() -> Message:
            nonlocal received, seen, closing
            message = await receive()
            if message["type"] == "http.request":
                body = message.get("body", b"")
                received += len(body)
                if received > self.max_bytes:
                    # an HTTPException survives FastAPI's form parsing (other errors become a generic 400)
                    raise HTTPException(413, f"the request body passed the limit of {self.max_bytes} bytes")
                if closing:
                    seen = seen[-len(closing):] + body
                    if closing in seen:
                        closing = b""  # complete (an epilogue may follow)
                    elif not message.get("more_body", False) and received:  # (an empty body: the fields it lacks)
                        raise HTTPException(400, "the multipart body ended before its closing boundary: the upload "
                                                 "was cut off; send it again")
            return message

        await self.app(scope, counted_receive, send)


def _closing_delimiter(content_type: str) -> bytes:
    """``--boundary--`` for a multipart body, else b"" (nothing to check)."""
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary", b"")
    return b"--" + boundary + b"--" if kind.startswith(b"multipart/") and boundary else b""


class Admission:
    """At most ``limit`` image requests in flight (running or queued for the inference threads) per worker.
    Checked before the upload is read into memory: a refused request costs its spooled temporary file only.
    Used from the event loop alone, so a plain counter is enough."""

    def __init__(self, limit: int) -> None:
        self.limit, self.pending = limit, 0

    @contextmanager
    def admit(self) -> Iterator[None]:
        if self.pending >= self.limit:
            raise Overloaded(
                f"{self.pending} image requests are already running or waiting (VISAGE_MAX_PENDING_IMAGES="
                f"{self.limit}); send it again shortly"
            )
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1

"""Request limits: the body's size, enforced before FastAPI parses a multipart upload, and the number of image
requests admitted at once.

A declared ``Content-Length`` over the limit is refused at once without reading the body; a chunked body is
counted as it streams and refused as soon as it passes the limit, so an oversized upload never fills the disk
(Starlette spools large multipart files to temporary files). Both answer 413 in the usual JSON error shape.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
        declared = Headers(scope=scope).get("content-length", "")
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

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # an HTTPException survives FastAPI's form parsing (other errors become a generic 400)
                    raise HTTPException(413, f"the request body passed the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, counted_receive, send)


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

"""Request body limit, enforced before FastAPI parses a multipart upload.

A declared ``Content-Length`` over the limit is refused at once without reading the body; a chunked body is
counted as it streams and refused as soon as it passes the limit, so an oversized upload never fills the disk
(Starlette spools large multipart files to temporary files). Both answer 413 in the usual JSON error shape.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import RequestTooLarge, error_response


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

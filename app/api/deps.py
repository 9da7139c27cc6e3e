"""FastAPI dependencies: the runtime, settings, service and gallery, the API key check, and CPU offloading."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import Depends, Request, Security, UploadFile
from fastapi.security import APIKeyHeader
from pydantic import BaseModel

from app.errors import BadParameter, ClientGone, Unauthorized
from app.gallery import Gallery
from app.runtime import Runtime
from app.service import FaceService
from app.settings import Settings
from app.store import busy_deadline, write_deadline
from model.errors import EmptyImage, ImageTooLarge

T = TypeVar("T")
API_KEY_HEADER = "X-API-Key"
log = logging.getLogger("visage.api")
_api_key = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="one of VISAGE_API_KEYS")


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def get_settings(runtime: Annotated[Runtime, Depends(get_runtime)]) -> Settings:
    return runtime.settings


def get_service(runtime: Annotated[Runtime, Depends(get_runtime)]) -> FaceService:
    if runtime.service is None:
        raise runtime.not_ready()
    return runtime.service


def get_gallery(service: Annotated[FaceService, Depends(get_service)]) -> Gallery:
    return service.gallery


def require_api_key(
    runtime: Annotated[Runtime, Depends(get_runtime)], key: Annotated[str | None, Security(_api_key)] = None
) -> None:
    """Constant-time comparison against every configured key."""
    if not key:
        raise Unauthorized(f"send an API key in the {API_KEY_HEADER} header")
    if not any(secrets.compare_digest(key.encode(), k.encode()) for k in runtime.api_keys):
        raise Unauthorized("the API key is not valid")


def form_fields(*fields: type[BaseModel] | str) -> Any:
    """The dependency of a form endpoint that takes ``fields`` (form models' fields, and file field names).

    FastAPI ignores what an endpoint does not read, and keeps the last value of a repeated field: a misspelt
    ``-F treshold=0.9``, or ``?threshold=0.9`` in the URL, verified at the default threshold with a 200, and
    ``-F image=@a.jpg -F image=@b.jpg`` enrolled b's face. Each of the three is a 422 naming the field. (The
    form is the one FastAPI parsed for the endpoint: Starlette caches it.)"""
    allowed = frozenset(name for f in fields for name in ([f] if isinstance(f, str) else f.model_fields))

    async def check_form(request: Request) -> None:
        if request.query_params:
            raise BadParameter(f"this endpoint takes its parameters as form fields, not in the URL: "
                               f"{', '.join(sorted(set(request.query_params)))}")
        if not request.headers.get("content-type", "").lower().startswith(
            ("multipart/form-data", "application/x-www-form-urlencoded")
        ):
            return  # (FastAPI's own 422 names the missing fields)
        counts = Counter(key for key, _ in (await request.form()).multi_items())
        repeated = sorted(key for key, n in counts.items() if n > 1)
        if repeated:
            raise BadParameter(f"each form field may be given once; repeated: {', '.join(repeated)}")
        unknown = sorted(set(counts) - allowed)
        if unknown:
            raise BadParameter(f"unknown form field(s): {', '.join(unknown)}; this endpoint takes "
                               f"{', '.join(sorted(allowed))}")

    return Depends(check_form)


async def no_query(request: Request) -> None:
    """For the endpoints that take nothing in the URL: ``DELETE /subjects/12?dry_run=true`` deleted for real."""
    if request.query_params:
        raise BadParameter(f"this endpoint takes no query parameters: {', '.join(sorted(set(request.query_params)))}")


async def single_valued_query(request: Request) -> None:
    """``?limit=1&limit=2`` kept the last value without a word, as forms did (``form_fields``)."""
    counts = Counter(key for key, _ in request.query_params.multi_items())
    repeated = sorted(key for key, n in counts.items() if n > 1)
    if repeated:
        raise BadParameter(f"each query parameter may be given once; repeated: {', '.join(repeated)}")


async def admitted(request: Request) -> AsyncIterator[None]:
    """Hold one of the worker's ``max_pending_images`` places for the whole image request (``app.limits``)."""
    with request.app.state.admission.admit():
        yield


async def run_cpu(request: Request, func: Callable[..., T], *args: object, **kwargs: object) -> T:
    """Run blocking model work on the app's own ``inference_threads`` OS threads, always the same ones: every
    thread that runs torch or ONNX Runtime gets its own OpenMP team and malloc arena, and anyio's shared pool
    would spread the model over many (RSS after 16 concurrent clients: 1,064-1,097 MiB there, 961 MiB here
    with one inference thread; docs/BENCHMARKS.md section 6).

    While the work waits for a thread, a client that hangs up (its timeout passed: it will send the request
    again) takes its work out of the queue (``ClientGone``): under load the queue filled with requests nobody
    would read, each costing a detection and an embedding, while the live ones timed out behind them. Work that
    has started runs to its end (an enrollment it stores is found again by the retry: same image, same face).
    The body has been read by now, so the server's next ASGI message can only be the disconnect: waiting for it
    costs nothing (polling ``is_disconnected`` woke every queued request five times a second)."""
    pool: ThreadPoolExecutor = request.app.state.cpu_pool
    context = contextvars.copy_context()  # the request id, for what the model work logs
    work = pool.submit(context.run, func, *args, **kwargs)
    waiting = asyncio.wrap_future(work)
    hang_up = asyncio.ensure_future(request.receive())
    try:
        for _ in range(3):  # (an empty end-of-body message may come first: listen again, but not for ever)
            await asyncio.wait({waiting, hang_up}, return_when=asyncio.FIRST_COMPLETED)
            if waiting.done():
                break
            if hang_up.result()["type"] != "http.disconnect":
                hang_up = asyncio.ensure_future(request.receive())
                continue
            if work.cancel():  # (False once it has started)
                log.info("the client hung up before its image was processed: dropped")  # (no access line for it)
                raise ClientGone("the client closed the connection before its image was processed")
            break
        return await waiting
    except asyncio.CancelledError:  # the server shutting down: work not started never starts
        work.cancel()
        raise
    finally:
        hang_up.cancel()


async def run_db(func: Callable[..., T], *args: object, **kwargs: object) -> T:
    """Run a short blocking store call in a worker thread (the default pool: it never waits behind the
    model)."""
    return await anyio.to_thread.run_sync(partial(func, *args, **kwargs))


async def run_write(request: Request, func: Callable[..., T], *args: object, **kwargs: object) -> T:
    """Run a store write in a worker thread, at most ``STORE_WRITERS`` at once. Writes take turns on SQLite's
    one write lock anyway; while another process holds it each waits up to the busy timeout, and 40 of them
    (with VISAGE_MAX_PENDING_IMAGES above that) held every thread of anyio's shared pool: /readyz took 17 s
    to answer and a health check gave up. The others wait here, as tasks, not threads."""
    limiter: anyio.CapacityLimiter = request.app.state.store_writers
    deadline = busy_deadline()  # the busy timeout counts from here: the wait for a turn below is part of it

    def write() -> T:
        with write_deadline(deadline):
            return func(*args, **kwargs)

    return await anyio.to_thread.run_sync(write, limiter=limiter)


async def read_upload(upload: UploadFile, settings: Settings, field: str = "image") -> bytes:
    """The uploaded file's bytes, refusing more than ``max_upload_bytes`` without reading further. Errors start
    with the form field, as the decoding errors of ``/compare``'s two images do."""
    data = await upload.read(settings.max_upload_bytes + 1)
    name = f"{field}: {upload.filename or 'the file'}"
    if len(data) > settings.max_upload_bytes:
        raise ImageTooLarge(f"{name} is larger than the limit of {settings.max_upload_bytes} bytes")
    if not data:
        raise EmptyImage(f"{name} is empty")
    return data


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceDep = Annotated[FaceService, Depends(get_service)]
GalleryDep = Annotated[Gallery, Depends(get_gallery)]

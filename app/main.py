"""``create_app``: the FastAPI application factory (``uvicorn app.main:create_app --factory``, ``visage
serve``).

The model and the index load in a background thread at start-up, so ``/healthz`` answers at once and
``/readyz`` turns 200 when recognition can run; at shutdown the index is saved (it is only a cache: a kill -9
costs a replay of the store's change log or a rebuild at the next start, never data).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from app import __doc__ as app_doc
from app.api import routes_faces, routes_health, routes_subjects
from app.errors import install_error_handlers
from app.limits import Admission, BodyLimitMiddleware
from app.logs import add_request_ids, configure_logging
from app.metrics import Metrics, MetricsMiddleware
from app.runtime import Runtime
from app.settings import Settings, load_settings
from model.faces import FacePipeline
from model.processes import stop_with_parent

VERSION = "0.1.0"
STORE_WRITERS = 4  # threads that may wait for the store's write lock at once (app.api.deps.run_write)


def create_app(settings: Settings | None = None, pipeline: FacePipeline | None = None) -> FastAPI:
    """Build the app from ``settings`` (default: the ``VISAGE_*`` environment); ``pipeline`` lets tests share
    an already-loaded model."""
    settings = settings or load_settings()
    configure_logging(settings.log_level, settings.log_format)
    if settings.workers > 1:  # a worker of --workers N stops with uvicorn's supervisor (a kill -9 of it left them
        stop_with_parent()  # serving); not in any other multiprocessing child that builds the app
    runtime = Runtime(settings, pipeline)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.cpu_pool = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="visage-cpu")
        app.state.store_writers = anyio.CapacityLimiter(STORE_WRITERS)  # (made in the loop it limits)
        runtime.start()
        try:
            yield
        finally:
            app.state.cpu_pool.shutdown(wait=True, cancel_futures=True)
            await anyio.to_thread.run_sync(runtime.close)

    app = FastAPI(
        title="Visage",
        version=VERSION,
        description=(app_doc or "") + "\n\nSend the API key in the `X-API-Key` header. Errors are always "
        '`{"error": code, "detail": text}`. Every response carries an `X-Request-ID` (yours, if you send one that '
        "looks like an id): quote it when reporting a problem, the service log is keyed by it.",
        lifespan=lifespan,
        # "/subjects/" was an empty 307 to a URL built from the Host header, before the key check: clients that
        # follow redirects send the X-API-Key along to that host. A 404 like any unknown path instead.
        redirect_slashes=False,
    )
    app.state.runtime = runtime
    app.state.metrics = Metrics()
    app.state.admission = Admission(settings.max_pending_images)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    # the routers whose routes name what was refused before routing (FastAPI 0.165 keeps an included router's
    # routes in that router, not in app.router's list: each is named)
    app.add_middleware(
        MetricsMiddleware,
        metrics=app.state.metrics,
        routers=[app.router, routes_health.router, routes_faces.router, routes_subjects.router],
    )
    install_error_handlers(app)  # its catch-all middleware goes round the two above
    add_request_ids(app)  # last, so outermost: a 500 carries its id too
    app.include_router(routes_health.router)
    app.include_router(routes_faces.router)
    app.include_router(routes_subjects.router)
    return app

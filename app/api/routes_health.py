"""Liveness, readiness and Prometheus metrics. ``/healthz`` and ``/readyz`` are always open (orchestrators
probe them without keys); ``/metrics`` is open unless ``VISAGE_METRICS_REQUIRE_KEY`` is set: it reveals counts
and latencies, never faces or names."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api.deps import RuntimeDep, require_api_key, run_db
from app.api.schemas import ErrorResponse, HealthResponse, ReadyResponse
from app.metrics import Metrics

router = APIRouter(tags=["health"])


# load balancers and uptime checkers often probe with HEAD: answered, and left out of the OpenAPI document
@router.get("/healthz", response_model=HealthResponse, summary="Liveness: the process answers")
@router.head("/healthz", include_in_schema=False)
async def healthz() -> HealthResponse:
    return HealthResponse()


@router.head("/readyz", include_in_schema=False)
@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={503: {"model": ErrorResponse, "description": "still loading, or failed to load"}},
    summary="Readiness: model and index loaded",
)
async def readyz(runtime: RuntimeDep) -> ReadyResponse:
    service = runtime.service
    if service is None:
        raise runtime.not_ready()
    stats = await run_db(service.gallery.stats)
    return ReadyResponse(
        model_version=service.model_version,
        thresholds=service.thresholds,
        scoring=service.gallery.scorer.tag,
        index_kind=str(stats["index_kind"]),
        index_state=service.gallery.opened_by,
        subjects=int(stats["subjects"]),
        faces=int(stats["faces"]),
        current_faces=int(stats["current_faces"]),
        stale_faces=int(stats["stale_faces"]),
        indexed_faces=int(stats["indexed_faces"]),
    )


@router.head("/metrics", include_in_schema=False)
@router.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics (text format)",
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus exposition format"},
        401: {"model": ErrorResponse, "description": "key required (VISAGE_METRICS_REQUIRE_KEY)"},
    },
)
async def metrics(request: Request, runtime: RuntimeDep) -> Response:
    if runtime.settings.metrics_require_key:
        require_api_key(runtime, request.headers.get("x-api-key"))
    registry: Metrics = request.app.state.metrics
    registry.ready.set(1 if runtime.service is not None else 0)
    if runtime.service is not None:
        registry.set_gallery(await run_db(runtime.service.gallery.stats))
    return Response(registry.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

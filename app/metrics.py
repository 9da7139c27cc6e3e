"""Prometheus metrics: request counts and latencies per route template, and the gallery's size.

Each app gets its own registry (tests build several apps in one process). Routes are labelled by their
template (``/subjects/{subject_id}``), unknown paths all by ``unmatched`` and made-up methods by ``other``, so
label cardinality stays bounded. With ``--workers N`` every worker counts its own requests (a scrape reaches one
of them).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# No ``*_created`` series (a creation timestamp beside every counter and histogram, per label set): they double
# what a scrape carries and Prometheus needs none of them (process-wide, as prometheus_client offers it).
disable_created_metrics()
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "visage_http_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "visage_http_request_duration_seconds",
            "HTTP request latency by route",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.gallery = Gauge(
            "visage_gallery",
            "Gallery size: subjects, faces (all versions), "
            "current_faces, stale_faces (other model versions), indexed_faces",
            ["kind"],
            registry=self.registry,
        )
        self.ready = Gauge("visage_ready", "1 when the model and the index are loaded", registry=self.registry)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def set_gallery(self, stats: dict[str, int | str]) -> None:
        for kind, value in stats.items():
            if isinstance(value, int):
                self.gallery.labels(kind).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI (no body buffering): times every HTTP request and records the status it ended with."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routers: Sequence[Router] = ()) -> None:
        self.app, self.metrics, self.routers = app, metrics, routers

    def route_of(self, scope: Scope) -> str:
        """The template of the route that answered, else of the route the path names (among ``routers``' own
        routes): a request answered before routing (a 413 from the body limit) or by one of Starlette's plain
        routes (/docs, /openapi.json, which set no ``route`` in the scope) was counted as ``unmatched``, like a
        scanner's 404."""
        path = getattr(scope.get("route"), "path", None)
        if path:
            return path
        for router in self.routers:
            for route in router.routes:
                path = getattr(route, "path", None)
                if path and route.matches(scope)[0] is not Match.NONE:
                    return path
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # stays 500 if the app raises before answering

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            path = self.route_of(scope)
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"  # clients invent methods
            self.metrics.observe(path, method, status, time.perf_counter() - start)

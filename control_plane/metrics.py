"""Prometheus metrics of the control plane (`GET /metrics`), in a registry of our own.

In-process instruments (HTTP requests, ingest lag) live in `REGISTRY` and are updated as things
happen. Fleet numbers (devices online, rollouts by state, gate evaluations by result, messages
ingested and rejected) are read at scrape time from the database and the running FleetRuntime, so
they are right on every replica and after a restart without double bookkeeping.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from control_plane.models import as_utc, utcnow
from shared.topics import TopicKind

REGISTRY = CollectorRegistry(auto_describe=True)
HTTP_REQUESTS = Counter(
    "slmops_http_requests", "HTTP requests handled.", ["method", "route", "status"], registry=REGISTRY
)
HTTP_DURATION = Histogram(
    "slmops_http_request_duration_seconds",
    "Time to handle an HTTP request, by route template.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
INGEST_LAG = Histogram(
    "slmops_ingest_lag_seconds",
    "From the end of a telemetry window (device clock) to its write into the database.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0),
    registry=REGISTRY,
)
UNMATCHED_ROUTE = "<unmatched>"  # one label for every unknown path: scanners must not explode cardinality


def observe_ingest_lag(window_end: datetime) -> None:
    end = as_utc(window_end)
    if end is not None:
        INGEST_LAG.observe(max(0.0, (utcnow() - end).total_seconds()))  # device clocks run ahead


class HttpMetricsMiddleware:
    """Count and time every HTTP request by method, route template and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client sees when the app raises before starting a response
        started = time.perf_counter()

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = getattr(scope.get("route"), "path", UNMATCHED_ROUTE)  # Starlette sets it on a match
            HTTP_REQUESTS.labels(scope["method"], route, str(status)).inc()
            HTTP_DURATION.labels(scope["method"], route).observe(time.perf_counter() - started)


def _grouped(engine: sa.Engine, table: str, column: str) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT {column}, COUNT(*) FROM {table} GROUP BY {column}"))  # noqa: S608
        return {str(key): int(count) for key, count in rows}


class FleetCollector(Collector):
    """Numbers read at scrape time from the database and the fleet runtime (None: fleet disabled)."""

    def __init__(self, engine: sa.Engine, fleet: Any) -> None:
        self.engine = engine
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        devices = _grouped(self.engine, "devices", "status")
        online = GaugeMetricFamily("slmops_devices_online", "Devices connected to the broker now.")
        online.add_metric([], devices.get("online", 0))
        yield online
        yield _gauge("slmops_devices", "Devices by registry status.", "status", devices)
        yield _gauge("slmops_rollouts", "Rollouts by state.", "state", _grouped(self.engine, "rollouts", "state"))
        evaluations = CounterMetricFamily(
            "slmops_gate_evaluations", "Rollout gate evaluations by result.", labels=["result"]
        )
        for result, count in sorted(_grouped(self.engine, "gate_evaluations", "result").items()):
            evaluations.add_metric([result], count)
        yield evaluations
        yield from self._ingest()

    def _ingest(self) -> Iterator[Metric]:
        writer = getattr(self.fleet, "ingest", None)
        subscriber = getattr(self.fleet, "subscriber", None)
        written = writer.counters if writer is not None else {}
        counters = subscriber.counters if subscriber is not None else None
        received = CounterMetricFamily("slmops_mqtt_messages_received", "Messages received from devices.")
        received.add_metric([], counters.received if counters else 0)
        yield received
        ingested = CounterMetricFamily(
            "slmops_ingest_messages", "Device messages written to the database, by kind.", labels=["kind"]
        )
        for kind in TopicKind:
            ingested.add_metric([str(kind)], written.get(str(kind), 0))
        yield ingested
        rejected = CounterMetricFamily(
            "slmops_ingest_rejected", "Device messages dropped, by reason.", labels=["reason"]
        )
        reasons = {
            "unknown_device": written.get("unknown_device", 0),
            "no_credential": written.get("no_credential", 0),  # pending enrollment or decommissioned
            "duplicate": written.get("duplicate_telemetry", 0) + (counters.duplicates if counters else 0),
            "unknown_topic": counters.unknown_topics if counters else 0,
            "handler_failed": counters.lost if counters else 0,  # refused by the writer after its retries
            "unstorable": counters.unstorable if counters else 0,  # a value the database refuses, alone
            "superseded": counters.superseded if counters else 0,  # a redelivered state a newer one replaced
        }
        for reason, count in (counters.malformed if counters else {}).items():
            reasons[str(reason)] = count  # malformed_json, invalid, unknown_schema_version, unknown_kind
        for reason, count in sorted(reasons.items()):
            rejected.add_metric([reason], count)
        yield rejected
        handed_back = CounterMetricFamily(
            "slmops_ingest_handed_back",
            "Device messages handed back to JetStream for redelivery while the database refused them.",
        )
        handed_back.add_metric([], counters.handed_back if counters else 0)
        yield handed_back


def _gauge(name: str, documentation: str, label: str, values: dict[str, int]) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        gauge.add_metric([key], value)
    return gauge


def render(engine: sa.Engine, fleet: Any) -> bytes:
    """The text exposition: in-process instruments plus a fresh read of the fleet numbers."""
    scrape = CollectorRegistry(auto_describe=False)
    scrape.register(FleetCollector(engine, fleet))
    return generate_latest(REGISTRY) + generate_latest(scrape)

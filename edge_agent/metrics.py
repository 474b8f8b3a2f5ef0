"""Prometheus metrics for `/metrics`, in the agent's own registry (never the global default)."""

from __future__ import annotations

from collections.abc import Callable

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from edge_agent.telemetry import RequestRecord
from shared.desired import DesiredState
from shared.telemetry import (
    REQUEST_DURATION_BUCKETS,
    TIME_PER_OUTPUT_TOKEN_BUCKETS,
    TIME_TO_FIRST_TOKEN_BUCKETS,
)

PREFIX = "slmops_agent"


def _latency(registry: CollectorRegistry, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
    """A latency histogram per operation with the OpenTelemetry gen_ai bucket boundaries."""
    return Histogram(f"{PREFIX}_{name}", doc, ["operation"], buckets=buckets, registry=registry)


class AgentMetrics:
    def __init__(self) -> None:
        # `*_created` series double the output and no dashboard of ours reads them.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Inference requests by operation and outcome",
            ["operation", "status"],
            registry=r,
        )
        self.errors = Counter(
            f"{PREFIX}_request_errors",
            "Failed inference requests by error type",
            ["operation", "error_type"],
            registry=r,
        )
        self.duration = _latency(
            r, "request_duration_seconds", "gen_ai.server.request.duration", REQUEST_DURATION_BUCKETS
        )
        self.ttft = _latency(
            r, "time_to_first_token_seconds", "gen_ai.server.time_to_first_token", TIME_TO_FIRST_TOKEN_BUCKETS
        )
        self.tpot = _latency(
            r, "time_per_output_token_seconds", "gen_ai.server.time_per_output_token", TIME_PER_OUTPUT_TOKEN_BUCKETS
        )
        self.tokens = Counter(f"{PREFIX}_tokens", "Tokens processed by type (input|output)", ["type"], registry=r)
        self.model_info = Gauge(
            f"{PREFIX}_model_info",
            "The model serving traffic",
            ["model", "version", "sha256", "format", "quantization"],
            registry=r,
        )
        self.model_loaded = Gauge(f"{PREFIX}_model_loaded", "1 while a model takes traffic", registry=r)
        self.swaps = Counter(f"{PREFIX}_model_swaps", "Model switches by outcome", ["outcome"], registry=r)
        self.download_bytes = Counter(f"{PREFIX}_download_bytes", "Artifact bytes downloaded", registry=r)
        self.in_flight = Gauge(f"{PREFIX}_requests_in_flight", "Requests using the model now", registry=r)
        self.queued = Gauge(f"{PREFIX}_requests_queued", "Requests waiting for the model", registry=r)
        rss = Gauge(f"{PREFIX}_process_resident_memory_bytes", "Resident memory of the agent", registry=r)
        process = psutil.Process()
        rss.set_function(lambda: process.memory_info().rss)

    def watch_queue(self, in_flight: Callable[[], float], queued: Callable[[], float]) -> None:
        self.in_flight.set_function(in_flight)
        self.queued.set_function(queued)

    def observe(self, operation: str, record: RequestRecord) -> None:
        status = "error" if record.error_type else "ok"
        self.requests.labels(operation, status).inc()
        if record.error_type:
            self.errors.labels(operation, record.error_type).inc()
        self.duration.labels(operation).observe(record.latency_s)
        if record.ttft_s is not None:
            self.ttft.labels(operation).observe(record.ttft_s)
        if (tpot := record.tpot_s) is not None:
            self.tpot.labels(operation).observe(tpot)
        self.tokens.labels("input").inc(record.input_tokens)
        self.tokens.labels("output").inc(record.output_tokens)

    def set_model(self, spec: DesiredState | None) -> None:
        self.model_info.clear()
        self.model_loaded.set(0 if spec is None else 1)
        if spec is not None:
            a = spec.artifact
            self.model_info.labels(spec.model, spec.version, a.sha256, a.format, a.quantization or "none").set(1)

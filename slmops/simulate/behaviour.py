"""What a simulated device does, whatever carries its messages: apply a desired state and make
telemetry windows (`SimAgent` sends them; `SimConfig` says how it behaves)."""

from __future__ import annotations

import bisect
import functools
import random
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from shared.desired import DesiredState
from shared.messages import TelemetryMessage
from shared.state import DeviceState, ModelRef
from shared.telemetry import REQUEST_DURATION_BUCKETS, Histogram, Summary, SystemSample

S = TypeVar("S", bound=DeviceState)
_TABLE_RNG = random.Random(0)
# Standard normals drawn once, not per sample: a simulated fleet must offer thousands of windows a
# second (docs/performance.md#fleet-paths).
_NORMALS = [_TABLE_RNG.gauss(0.0, 1.0) for _ in range(8192)]


@functools.lru_cache(maxsize=64)
def _model_ref(model: str, version: str, sha256: str, format: str, quantization: str | None) -> ModelRef:
    # One per artifact, shared by every device serving it (never mutated: states are copied on
    # change): a fleet applying one rollout would otherwise validate the same reference N times.
    return ModelRef(model=model, version=version, sha256=sha256, format=format, quantization=quantization)


def applied(state: S, desired: DesiredState, *, fail: bool, envelope: dict[str, object] | None = None) -> S:
    """The device's state after acting on `desired`: serving it, or `activation_failed` (of the
    same class as `state`: a StateMessage stays one). `envelope`: further fields set in the same
    copy (a StateMessage's message id and times)."""
    update: dict[str, object] = {"desired_message_id": desired.message_id, "rollout_id": desired.rollout_id}
    update |= envelope or {}
    if desired.unload:  # withdrawn: serve nothing, as the agent's reconciler does
        reason = desired.withdrawal_reason()
        previous = state.current or state.previous
        update |= {"phase": "idle", "reason": reason, "previous": previous, "current": None, "serving": False}
    elif fail:
        update |= {"phase": "activation_failed", "reason": "smoke test failed (simulated)"}
    else:
        artifact = desired.artifact
        ref = _model_ref(desired.model, desired.version, artifact.sha256, artifact.format, artifact.quantization)
        update |= {"phase": "committed", "reason": None, "previous": state.current, "current": ref, "serving": True}
    return state.model_copy(update=update)


def refused(state: S, desired: DesiredState, message: str, *, envelope: dict[str, object] | None = None) -> S:
    """The device's state after refusing `desired`'s release: what it served, it still serves."""
    update: dict[str, object] = {"desired_message_id": desired.message_id, "phase": "download_failed"}
    update |= {"reason": f"release_refused: {message}"[:500], **(envelope or {})}
    return state.model_copy(update=update)


def telemetry_window(
    device_id: str,
    current: ModelRef,
    *,
    rng: random.Random,
    seq: int,
    seconds: float,
    latency_ms: float,
    requests: int,
    error_rate: float,
    rss_mb: float,
) -> TelemetryMessage:
    """One window of `requests` latencies around `latency_ms` (10 % spread), bucketed as the agent does."""
    base = latency_ms / 1000
    start = rng.randrange(len(_NORMALS) - requests)  # a random offset into the shared table
    samples = sorted(max(0.0005, base + base * 0.1 * z) for z in _NORMALS[start : start + requests])
    counts = [0] * (len(REQUEST_DURATION_BUCKETS) + 1)
    for s in samples:
        counts[bisect.bisect_left(REQUEST_DURATION_BUCKETS, s)] += 1
    n, end, rss = len(samples), datetime.now(UTC), int(rss_mb * 2**20)
    return TelemetryMessage(
        device_id=device_id, seq=seq, window_start=end - timedelta(seconds=seconds), window_end=end,
        model=current.model, version=current.version, sha256=current.sha256,
        requests=n, errors=int(round(n * error_rate)),
        latency_s=Summary(count=n, p50=samples[n // 2], p95=samples[max(0, int(n * 0.95) - 1)],
                          p99=samples[-1], max=samples[-1]),
        latency_histogram=Histogram(bounds=REQUEST_DURATION_BUCKETS, counts=tuple(counts), sum=sum(samples)),
        system=SystemSample(rss_bytes=rss, peak_rss_bytes=rss),
    )  # fmt: skip

"""Stage statistics that no single device decides.

A device's telemetry counts with a capped weight: its requests, at most those of the median
reporting device, so one device's volume cannot outweigh a typical one (in `min_samples` and in
the pooled error rate and latency). A check is decided only when its outcome holds with any one
reporting device left out: `Spread` carries the pooled value and the lowest and highest values
over leaving each device out, so one device can neither fail a stage (errors on every request)
nor pass it (no errors, or fast requests, reported by one).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class DeviceSample:
    """One device's windows of the version, added up."""

    requests: int = 0
    errors: int = 0
    counts: list[float] | None = None  # merged latency histogram, on the stage's bucket bounds
    p95_sum: float = 0.0  # window p95 (ms) x requests, for windows without a histogram
    p95_requests: int = 0
    max_rss_bytes: int = 0
    windows: int = 0


@dataclass(frozen=True)
class Spread:
    """A pooled value and its range over leaving any one device out (all None: no data)."""

    value: float | None
    low: float | None
    high: float | None

    @classmethod
    def of(cls, value: float | None) -> Spread:
        return cls(value, value, value)


NO_DATA = Spread(None, None, None)


def reporting(devices: Sequence[DeviceSample]) -> list[DeviceSample]:
    return [d for d in devices if d.requests > 0]


def scales(devices: Sequence[DeviceSample]) -> list[float]:
    """Per reporting device, the share of its requests that counts: all, up to the median's."""
    cap = statistics.median_low([d.requests for d in devices]) if devices else 0
    return [min(1.0, cap / d.requests) for d in devices]


def counted_requests(devices: Sequence[DeviceSample]) -> float:
    """Requests toward `min_samples`, capped per device and without the largest contributor."""
    weights = [d.requests * s for d, s in zip(devices, scales(devices), strict=True)]
    return sum(weights) - max(weights) if len(weights) > 1 else sum(weights)


def pooled(vectors: list[list[float]], statistic: Callable[[list[float]], float | None]) -> Spread:
    """`statistic` of the summed vectors, and its range over leaving out each vector in turn."""
    if not vectors:
        return NO_DATA
    total = [sum(column) for column in zip(*vectors, strict=True)]
    value = statistic(total)
    if len(vectors) == 1:
        return Spread.of(value)
    # Clamped at zero: float subtraction may leave -1e-16 where a device held a column alone.
    left_out = [statistic([max(0.0, t - x) for t, x in zip(total, v, strict=True)]) for v in vectors]
    if value is None or any(v is None for v in left_out):
        return Spread(value, None, None)  # one device holds all the data: it alone would decide
    known = [v for v in left_out if v is not None]
    return Spread(value, min(known), max(known))


def _ratio(vector: list[float]) -> float | None:
    return vector[0] / vector[1] if vector[1] > 0 else None


def error_rate(devices: Sequence[DeviceSample]) -> Spread:
    return pooled([[d.errors * s, d.requests * s] for d, s in zip(devices, scales(devices), strict=True)], _ratio)


def p95_ms(devices: Sequence[DeviceSample], bounds: list[float] | None) -> Spread:
    """From the merged histograms (each device's scaled to its weight) where there are any, else
    from the windows' own p95s weighted by requests."""
    weighted = list(zip(devices, scales(devices), strict=True))
    if bounds is None:
        spread = pooled([[d.p95_sum * s, d.p95_requests * s] for d, s in weighted if d.p95_requests], _ratio)
        alone = sum(1 for d in devices if d.p95_requests) == 1 and len(devices) > 1
        return Spread(spread.value, None, None) if alone else spread
    rows = [[c * s for c in d.counts] for d, s in weighted if d.counts is not None]
    if not rows:
        return NO_DATA
    counts = np.array(rows, dtype=float)
    total = counts.sum(axis=0)
    value = _percentiles(bounds, total[None, :], 0.95)[0]
    if np.isnan(value):
        return NO_DATA
    if len(rows) == 1:  # decided by the one device with a histogram only if it is the only one
        return Spread.of(float(value) * 1000) if len(devices) == 1 else Spread(float(value) * 1000, None, None)
    # One row per device left out, computed together: a 10,000-device stage is one array pass.
    left_out = _percentiles(bounds, np.maximum(total[None, :] - counts, 0.0), 0.95)
    if np.isnan(left_out).any():
        return Spread(float(value) * 1000, None, None)
    return Spread(float(value) * 1000, float(left_out.min()) * 1000, float(left_out.max()) * 1000)


def _percentiles(bounds: list[float], counts: np.ndarray, q: float) -> np.ndarray:
    """Per row of bucket counts, the q-quantile interpolated inside its bucket, as
    `gates.percentile_of` computes it for one (NaN for a row without counts)."""
    lowers = np.array([0.0, *bounds])
    uppers = np.array([*bounds, bounds[-1] * 2])
    totals = counts.sum(axis=1)
    rank = q * totals
    cumulative = np.cumsum(counts, axis=1)
    # The first bucket holding counts whose cumulative count reaches the rank.
    reached = (cumulative >= rank[:, None]) & (counts > 0)
    index = np.where(reached.any(axis=1), reached.argmax(axis=1), len(bounds))
    rows = np.arange(len(counts))
    inside = counts[rows, index]
    seen = cumulative[rows, index] - inside
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(inside > 0, (rank - seen) / inside, 1.0)
    result = lowers[index] + (uppers[index] - lowers[index]) * fraction
    return np.where(totals > 0, result, np.nan)


def max_rss_bytes(devices: Sequence[DeviceSample]) -> Spread:
    """The largest peak, and with any one device left out: the second largest at the low end."""
    peaks = sorted((d.max_rss_bytes for d in devices if d.windows), reverse=True)
    if not peaks:
        return NO_DATA
    return Spread(peaks[0], peaks[1] if len(peaks) > 1 else peaks[0], peaks[0])


def ratio(new: Spread, base: Spread) -> Spread:
    """new / base, with the range its two ranges allow."""
    if new.value is None or not base.value:
        return NO_DATA
    if new.low is None or new.high is None or not base.low or not base.high:
        return Spread(new.value / base.value, None, None)
    return Spread(new.value / base.value, new.low / base.high, new.high / base.low)

"""The gate decision of a stage over its collected samples, against limits and the baseline.

`decide` reads no database: `gate_samples.collect` gathers what it decides on. It returns typed
checks (`gate_checks`), folded into the stage's outcome.

Percentiles across devices and windows come from merged fixed-bucket histograms (the agents use
the OpenTelemetry gen_ai request-duration buckets), interpolated inside the bucket; a window
without a histogram falls back to its own exact p95, weighted by its request count. No single
device decides a check (`robust`): telemetry checks wait until `min_reporting_share` of the
stage's active devices have reported, each device's weight is capped at the median device's, and
a check fails or passes only if it would with any one device left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from control_plane.rollouts import golden_gate, robust
from control_plane.rollouts.gate_checks import ActivationCheck, Check, LimitCheck, Outcome, fold
from control_plane.rollouts.golden_gate import GoldenSample
from control_plane.rollouts.members import Member
from control_plane.rollouts.plan import Gates
from control_plane.rollouts.robust import DeviceSample, Spread
from shared.telemetry import REQUEST_DURATION_BUCKETS

PASS, FAIL, INCONCLUSIVE = Outcome.PASSED, Outcome.FAILED, Outcome.HELD
LATENCY_BOUNDS = list(REQUEST_DURATION_BUCKETS)


@dataclass
class Sample:
    """A set of devices' telemetry of one version: per device, and the bucket bounds merged on."""

    devices: dict[str, DeviceSample] = field(default_factory=dict)
    bounds: list[float] | None = None

    @property
    def requests(self) -> int:
        return sum(d.requests for d in self.devices.values())

    @property
    def errors(self) -> int:
        return sum(d.errors for d in self.devices.values())

    @property
    def windows(self) -> int:
        return sum(d.windows for d in self.devices.values())

    def reporting(self) -> list[DeviceSample]:
        return robust.reporting(list(self.devices.values()))

    def p95_ms(self) -> Spread:
        return robust.p95_ms(self.reporting(), self.bounds)

    def enough(self, min_samples: int) -> bool:
        return robust.counted_requests(self.reporting()) >= min_samples


def merged_percentile(histograms: list[dict[str, Any]], q: float) -> float | None:
    """q-quantile (0..1) in the histograms' unit, from summed bucket counts."""
    if not histograms:
        return None
    bounds = list(histograms[0]["bounds"])
    counts = [0] * (len(bounds) + 1)
    for hist in histograms:
        if list(hist["bounds"]) != bounds:
            continue  # a different bucket layout cannot be merged bucket by bucket
        for i, c in enumerate(hist["counts"]):
            counts[i] += int(c)
    return percentile_of(bounds, counts, q)


def percentile_of(bounds: Sequence[float], counts: Sequence[float], q: float) -> float | None:
    """q-quantile of bucket counts (weights may be fractional), interpolated inside the bucket."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            lower = bounds[i - 1] if i > 0 else 0.0
            upper = bounds[i] if i < len(bounds) else bounds[-1] * 2
            return float(lower + (upper - lower) * ((rank - seen) / c))
        seen += c
    return float(bounds[-1])


@dataclass(frozen=True)
class StageSamples:
    """What a stage's gates are decided on, as collected from the database (`gate_samples.collect`)."""

    members: tuple[Member, ...]  # the stage's members given the new version so far
    offline: tuple[str, ...]  # those of them not online
    new_version: str
    new: Sample
    baseline_version: str | None
    baseline: Sample
    baseline_devices: int  # devices the baseline sample was read from
    golden: GoldenSample | None = None  # None: no golden check asked for, or no golden set


@dataclass(frozen=True)
class GateDecision:
    result: Outcome
    checks: tuple[Check, ...]
    details: dict[str, Any]  # as a GateEvaluation stores it

    def failed(self) -> list[str]:
        return [c.name for c in self.checks if c.outcome is Outcome.FAILED]


def decide(gates: Gates, samples: StageSamples) -> GateDecision:
    """Decide one stage from its samples alone (no database): see `gate_checks.fold`."""
    deployable = [m for m in samples.members if m.status != "incompatible"]
    active = [m for m in deployable if m.status == "active"]
    failed = [m for m in deployable if m.status == "failed"]
    telemetry, figures = telemetry_checks(gates, samples.new, samples.baseline, len(active),
                                          samples.baseline_version is not None)  # fmt: skip
    checks: list[Check] = [activation_check(gates, len(deployable), len(active), failed), *telemetry]
    if samples.golden is not None and gates.min_golden_pass_rate is not None:
        checks.append(golden_gate.decide(samples.golden, gates.min_golden_pass_rate, gates.min_reporting_share))
    result = fold(c.outcome for c in checks)
    return GateDecision(result, tuple(checks), _details(samples, checks, len(active), figures))


def _details(samples: StageSamples, checks: list[Check], active: int, figures: dict[str, Any]) -> dict[str, Any]:
    new, base = samples.new, samples.baseline
    max_rss = max((d.max_rss_bytes for d in new.devices.values()), default=0)
    return {
        "checks": [c.detail() for c in checks],
        "new": {
            "version": samples.new_version,
            "requests": new.requests,
            "errors": new.errors,
            "max_rss_mb": round(max_rss / 2**20, 1),
            "devices": active,
            **figures,
        },
        "baseline": {
            "version": samples.baseline_version,
            "requests": base.requests,
            "p95_ms": base.p95_ms().value,
            "devices": samples.baseline_devices,
        },
        "offline_devices": list(samples.offline),
    }


def limit_check(name: str, spread: Spread, limit: float | None, enough: bool, scale: float = 1.0) -> LimitCheck | None:
    """Fail only if the value exceeds `limit` with any one device left out, pass only if it stays
    within it with any one left out; otherwise (or without enough data) wait. None: no limit set."""
    if limit is None:
        return None
    value = None if spread.value is None else spread.value * scale
    if value is None or not enough or spread.low is None or spread.high is None:
        why = "no data" if value is None else "too few samples" if not enough else "one device alone decides"
        return LimitCheck(name=name, outcome=Outcome.HELD, value=value, limit=limit, reason=why)
    low, high = round(spread.low * scale, 4), round(spread.high * scale, 4)
    if spread.low * scale > limit:
        outcome, why = Outcome.FAILED, "above the limit with any one device left out"
    elif spread.high * scale <= limit:
        outcome, why = Outcome.PASSED, "within the limit with any one device left out"
    else:
        outcome, why = Outcome.HELD, "leaving one device out changes the outcome"
    return LimitCheck(name=name, outcome=outcome, value=round(value, 4), limit=limit, reason=why, range=(low, high))


def activation_check(gates: Gates, deployable: int, active: int, failed: list[Member]) -> ActivationCheck:
    """Pass once `min_activated_fraction` of the deployable devices are active; fail once the
    devices that failed to activate make that fraction unreachable."""
    fraction = active / deployable if deployable else 1.0
    best_possible = (deployable - len(failed)) / deployable if deployable else 1.0
    if best_possible < gates.min_activated_fraction:
        outcome, why = Outcome.FAILED, "too many devices failed to activate to reach the fraction"
    elif fraction >= gates.min_activated_fraction:
        outcome, why = Outcome.PASSED, "enough devices are active"
    else:
        outcome, why = Outcome.HELD, "waiting for devices to activate"
    return ActivationCheck(
        name="min_activated_fraction",
        outcome=outcome,
        value=round(fraction, 4),
        limit=gates.min_activated_fraction,
        reason=why,
        failed_devices=tuple(m.device_id for m in failed),
    )


def telemetry_checks(
    gates: Gates, new: Sample, base: Sample, active: int, has_baseline: bool
) -> tuple[list[LimitCheck], dict[str, Any]]:
    """The checks on the new version's telemetry, and the reporting figures they rest on."""
    reporters = new.reporting()
    required = max(1, math.ceil(gates.min_reporting_share * active))
    quorum = len(reporters) >= required
    enough_new = quorum and new.enough(gates.min_samples)
    new_p95 = new.p95_ms()
    ratio = robust.ratio(new_p95, base.p95_ms()) if base.enough(gates.min_samples) else robust.NO_DATA
    with_windows = sum(1 for d in new.devices.values() if d.windows)
    checks = [
        limit_check("max_error_rate", robust.error_rate(reporters), gates.max_error_rate, enough_new),
        limit_check("max_p95_latency_ms", new_p95, gates.max_p95_latency_ms, enough_new),
        # No baseline version (a first rollout): nothing to compare with, so the ratio gate does not apply.
        limit_check("max_p95_latency_ratio", ratio, gates.max_p95_latency_ratio if has_baseline else None, enough_new),
        limit_check(
            "max_rss_mb",
            robust.max_rss_bytes(list(new.devices.values())),
            gates.max_rss_mb,
            with_windows >= required,
            scale=1 / 2**20,
        ),
    ]
    reporting = {"reporting_devices": len(reporters), "required_reporting_devices": required}
    return [c for c in checks if c is not None], {"p95_ms": new_p95.value, **reporting}

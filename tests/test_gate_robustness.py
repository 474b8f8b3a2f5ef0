"""No single device decides a stage: telemetry checks wait for a share of the stage's devices,
each device's weight is capped at the median device's, and a check fails or passes only if it
would with any one device left out. Rows are written through the real ingest, on both databases;
a lying device's rows bypass the wire schema (as rows stored before it bounded counts did)."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session

from control_plane.fleet.subscriber import DeviceMessage
from control_plane.rollouts import gate_samples, gates
from control_plane.rollouts.members import Member
from control_plane.rollouts.plan import Gates
from shared.telemetry import REQUEST_DURATION_BUCKETS, Histogram
from tests.support.telemetry import T0, add_devices, ingest, window

# Rows go through `engine` alone: empty the tables after each test, or later rollouts would target them.
pytestmark = pytest.mark.usefixtures("empty_tables")

TOP = len(REQUEST_DURATION_BUCKETS)  # the overflow bucket
FAST = 3  # the 0.08 s bucket


def _devices(engine: sa.Engine, count: int) -> list[str]:
    return add_devices(engine, *(f"gate-{uuid.uuid4().hex[:10]}" for _ in range(count)))


def _honest(device: str, *, requests: int = 50, errors: int = 0, bucket: int = FAST, rss_mb: int = 100) -> Any:
    return window(device, T0, {bucket: requests}, errors=errors, version="2", rss_mb=rss_mb)


def _liar(device: str, **values: Any) -> DeviceMessage:
    """A window with whatever counts the device claims, as the schema never saw them."""
    honest = _honest(device)
    message = honest.message.model_copy(update=values)
    return DeviceMessage(device, honest.kind, message, honest.topic, honest.received_at)


def _evaluate(engine: sa.Engine, devices: list[str], **limits: Any) -> tuple[str, dict[str, dict[str, Any]]]:
    plan = Gates(**({"max_p95_latency_ratio": None, "warmup_windows": 0, "min_samples": 20} | limits))
    with Session(engine) as session:
        samples = gate_samples.collect(
            session,
            rollout_id=str(uuid.uuid4()),
            gates=plan,
            members=[Member(d, 0, "active", None) for d in devices],
            new_version="2",
            baseline_version=None,
            baseline_device_ids=[],
            stage_since=T0 - timedelta(hours=1),
            baseline_since=T0 - timedelta(hours=1),
        )
    result = gates.decide(plan, samples)
    return result.result, {c["gate"]: c for c in result.details["checks"]}


def test_one_device_failing_every_request_cannot_fail_a_stage_but_two_can(engine: sa.Engine) -> None:
    devices = _devices(engine, 4)
    ingest(engine, [_honest(d) for d in devices[1:]] + [_liar(devices[0], requests=10**9, errors=10**9)])
    result, checks = _evaluate(engine, devices)
    # Before: the summed counts gave an error rate of 1.0 and the stage failed.
    assert checks["max_error_rate"]["result"] == "inconclusive" and result == "inconclusive"
    assert checks["max_error_rate"]["range"][0] == 0.0  # without the one device: no errors at all

    ingest(engine, [_liar(devices[1], requests=50, errors=50, message_id=uuid.uuid4().hex)])
    result, checks = _evaluate(engine, devices)
    assert checks["max_error_rate"]["result"] == "fail" and result == "fail"


def test_one_device_cannot_meet_min_samples_alone(engine: sa.Engine) -> None:
    devices = _devices(engine, 4)
    ingest(engine, [_liar(devices[0], requests=10**9, errors=0)])
    result, checks = _evaluate(engine, devices)
    # Before: 10**9 requests met min_samples and the stage passed on one device's word.
    assert checks["max_error_rate"]["result"] == "inconclusive" and result == "inconclusive"
    ingest(engine, [_honest(devices[1], requests=5)])  # two report now; the liar counts as much as 5
    assert _evaluate(engine, devices)[0] == "inconclusive"
    ingest(engine, [_honest(devices[1], requests=30), _honest(devices[2], requests=30)])
    assert _evaluate(engine, devices)[0] == "pass"


def test_one_device_cannot_hide_the_others_failures(engine: sa.Engine) -> None:
    devices = _devices(engine, 4)
    failing = [_honest(d, errors=25) for d in devices[1:]]  # half their requests fail
    for claimed in ({"requests": 10**9, "errors": 0}, {"requests": 50, "errors": -(10**9)}):
        liar = devices[0]
        ingest(engine, [*failing, _liar(liar, message_id=uuid.uuid4().hex, **claimed)])
        result, checks = _evaluate(engine, devices)
        # Before: a billion clean requests, or negative errors, brought the rate under 5 %.
        assert checks["max_error_rate"]["result"] == "fail" and result == "fail", claimed
        failing = []


def test_one_device_cannot_fail_latency_or_memory_alone(engine: sa.Engine) -> None:
    devices = _devices(engine, 4)
    slow = _honest(devices[0], requests=60_000, bucket=TOP, rss_mb=10**6)  # within the wire's bounds
    ingest(engine, [_honest(d) for d in devices[1:]] + [slow])
    result, checks = _evaluate(engine, devices, max_p95_latency_ms=500, max_rss_mb=1024, max_error_rate=None)
    # Before: its 60,000 slow requests set the merged p95, and its peak RSS was the stage's.
    assert checks["max_p95_latency_ms"]["result"] == "inconclusive"
    assert checks["max_rss_mb"]["result"] == "inconclusive" and result == "inconclusive"
    ingest(engine, [_honest(devices[1], bucket=TOP, rss_mb=10**6)])
    result, checks = _evaluate(engine, devices, max_p95_latency_ms=500, max_rss_mb=1024, max_error_rate=None)
    assert checks["max_p95_latency_ms"]["result"] == "fail" and checks["max_rss_mb"]["result"] == "fail"


def test_one_device_cannot_choose_the_histogram_layout_the_stage_is_merged_on(engine: sa.Engine) -> None:
    devices = sorted(_devices(engine, 4))  # its rows come first
    own_layout = Histogram(bounds=(1000.0,), counts=(0, 50))  # everything slower than 1,000 s
    ingest(engine, [_liar(devices[0], latency_histogram=own_layout)] + [_honest(d) for d in devices[1:]])
    result, checks = _evaluate(engine, devices, max_p95_latency_ms=500, max_error_rate=None)
    # Before: the first row's layout was merged on, every other device's histogram skipped.
    assert checks["max_p95_latency_ms"]["result"] == "pass" and result == "pass"
    assert checks["max_p95_latency_ms"]["value"] < 100


def test_a_stage_of_one_device_is_decided_by_it(engine: sa.Engine) -> None:
    (device,) = _devices(engine, 1)
    ingest(engine, [_honest(device, errors=50)])
    result, checks = _evaluate(engine, [device])
    assert result == "fail" and checks["max_error_rate"]["value"] == 1.0

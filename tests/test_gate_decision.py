"""The gate decision over hand-built samples, with no database: each check's outcome, value and
limit, and how the checks fold into the stage's outcome."""

from __future__ import annotations

from typing import Any

import pytest

from control_plane.rollouts import gates
from control_plane.rollouts.gate_checks import Outcome, fold
from control_plane.rollouts.gates import LATENCY_BOUNDS, Sample, StageSamples
from control_plane.rollouts.golden_gate import GoldenSample
from control_plane.rollouts.members import Member
from control_plane.rollouts.plan import Gates
from control_plane.rollouts.robust import DeviceSample
from shared.state import GoldenOutcome

FAST, SLOW = 3, 8  # bucket indexes: 0.08 s and 1.28 s (see REQUEST_DURATION_BUCKETS)


def device(requests: int = 50, errors: int = 0, bucket: int = FAST, rss_mb: int = 100) -> DeviceSample:
    counts = [0.0] * (len(LATENCY_BOUNDS) + 1)
    counts[bucket] = requests
    return DeviceSample(requests=requests, errors=errors, counts=counts, max_rss_bytes=rss_mb * 2**20, windows=1)


def sample(*devices: DeviceSample) -> Sample:
    return Sample({f"d{i}": d for i, d in enumerate(devices)}, LATENCY_BOUNDS if devices else None)


def stage(new: Sample, *, statuses: tuple[str, ...] | None = None, **fields: Any) -> StageSamples:
    statuses = statuses or ("active",) * max(len(new.devices), 1)
    members = tuple(Member(f"d{i}", 0, status, None) for i, status in enumerate(statuses))
    values: dict[str, Any] = {"offline": (), "new_version": "2", "baseline_version": None,
                              "baseline": Sample(), "baseline_devices": 0}  # fmt: skip
    return StageSamples(members=members, new=new, **(values | fields))


def limits(**values: Any) -> Gates:
    return Gates(**({"max_p95_latency_ratio": None, "warmup_windows": 0, "min_samples": 20} | values))


def checks(decision: gates.GateDecision) -> dict[str, Any]:
    return {c.name: c for c in decision.checks}


def test_healthy_devices_pass_every_check_and_the_stage() -> None:
    decision = gates.decide(limits(max_p95_latency_ms=500, max_rss_mb=200), stage(sample(*[device()] * 4)))
    assert decision.result is Outcome.PASSED
    by_name = checks(decision)
    assert set(by_name) == {"min_activated_fraction", "max_error_rate", "max_p95_latency_ms", "max_rss_mb"}
    assert all(c.outcome is Outcome.PASSED for c in decision.checks)
    assert by_name["max_error_rate"].value == 0.0 and by_name["max_error_rate"].limit == 0.05
    assert by_name["max_rss_mb"].value == 100.0 and by_name["max_rss_mb"].range == (100.0, 100.0)
    assert 40 < by_name["max_p95_latency_ms"].value <= 80  # inside the 0.04-0.08 s bucket


def test_errors_on_two_devices_fail_the_error_rate_and_the_stage() -> None:
    new = sample(device(errors=40), device(errors=40), device(), device())
    decision = gates.decide(limits(), stage(new))
    check = checks(decision)["max_error_rate"]
    assert check.outcome is Outcome.FAILED and check.value == 0.4 and check.range[0] > 0.05
    assert decision.result is Outcome.FAILED and decision.failed() == ["max_error_rate"]


def test_errors_on_one_device_alone_hold_the_error_rate() -> None:
    check = checks(gates.decide(limits(), stage(sample(device(errors=50), device(), device(), device()))))
    assert check["max_error_rate"].outcome is Outcome.HELD
    assert check["max_error_rate"].range[0] == 0.0  # without that device: no errors at all


def test_latency_above_the_limit_on_every_device_fails() -> None:
    decision = gates.decide(limits(max_p95_latency_ms=500), stage(sample(*[device(bucket=SLOW)] * 3)))
    check = checks(decision)["max_p95_latency_ms"]
    assert check.outcome is Outcome.FAILED and check.value > 500 and check.limit == 500


def test_too_few_samples_or_reporters_hold_the_telemetry_checks() -> None:
    few = checks(gates.decide(limits(max_p95_latency_ms=500), stage(sample(device(requests=5), device(requests=5)))))
    assert few["max_error_rate"].outcome is Outcome.HELD and few["max_p95_latency_ms"].outcome is Outcome.HELD
    # Four active devices, one reporting: below min_reporting_share (half of them).
    quiet = gates.decide(limits(), stage(sample(device()), statuses=("active",) * 4))
    assert checks(quiet)["max_error_rate"].outcome is Outcome.HELD
    assert quiet.details["new"]["reporting_devices"] == 1 and quiet.details["new"]["required_reporting_devices"] == 2


def test_memory_above_the_limit_on_two_devices_fails() -> None:
    new = sample(device(rss_mb=300), device(rss_mb=300), device(), device())
    check = checks(gates.decide(limits(max_rss_mb=200), stage(new)))["max_rss_mb"]
    assert check.outcome is Outcome.FAILED and check.value == 300.0 and check.range == (300.0, 300.0)


def test_the_latency_ratio_applies_only_with_a_baseline_and_compares_with_it() -> None:
    new = sample(*[device(bucket=SLOW)] * 3)
    assert "max_p95_latency_ratio" not in checks(gates.decide(limits(max_p95_latency_ratio=1.5), stage(new)))
    with_base = stage(new, baseline_version="1", baseline=sample(*[device()] * 3), baseline_devices=3)
    check = checks(gates.decide(limits(max_p95_latency_ratio=1.5), with_base))["max_p95_latency_ratio"]
    assert check.outcome is Outcome.FAILED and check.value > 1.5
    no_base_data = stage(new, baseline_version="1", baseline=Sample(), baseline_devices=3)
    ratio = checks(gates.decide(limits(max_p95_latency_ratio=1.5), no_base_data))["max_p95_latency_ratio"]
    assert ratio.outcome is Outcome.HELD and ratio.value is None


@pytest.mark.parametrize(
    ("statuses", "outcome"),
    [
        (("active", "active", "incompatible"), Outcome.PASSED),  # incompatible devices are not counted
        (("active", "pending", "pending"), Outcome.HELD),
        (("active", "failed", "pending"), Outcome.FAILED),  # 2 of 3 at best: below 0.9
    ],
)
def test_the_activation_check_passes_waits_or_fails_on_the_members(statuses: tuple[str, ...], outcome: Outcome) -> None:
    decision = gates.decide(limits(min_activated_fraction=0.9), stage(sample(), statuses=statuses))
    check = checks(decision)["min_activated_fraction"]
    assert check.outcome is outcome and check.limit == 0.9
    assert check.failed_devices == tuple(f"d{i}" for i, s in enumerate(statuses) if s == "failed")


def _golden(new: dict[str, tuple[int, int]], base: dict[str, tuple[int, int]]) -> GoldenSample:
    def outcome(passed: int, total: int) -> GoldenOutcome:
        return GoldenOutcome(version="v", passed=passed, total=total, failed=["p1"] if passed < total else [])

    reports = {**new, **base}
    return GoldenSample(
        active_device_ids=tuple(new),
        new={d: outcome(*r) for d, r in new.items()},
        baseline={d: outcome(*r) for d, r in base.items()},
        classes=dict.fromkeys(reports, ("x86_64", "cpu", ())),
    )


def test_the_golden_check_compares_with_the_baseline_rate_of_the_class() -> None:
    golden = _golden({"d0": (5, 10), "d1": (5, 10)}, {"b0": (10, 10), "b1": (10, 10)})
    decision = gates.decide(limits(min_golden_pass_rate=0.9), stage(sample(), statuses=("active",) * 2, golden=golden))
    check = checks(decision)["min_golden_pass_rate"]
    assert check.outcome is Outcome.FAILED and check.value == 0.5 and check.limit == 0.9
    (rate,) = check.classes
    assert rate.baseline == 1.0 and rate.limit == 0.9 and check.failed_prompts == ("p1",)
    assert decision.result is Outcome.FAILED


def test_the_golden_check_waits_for_the_devices_reports() -> None:
    golden = _golden({"d0": (10, 10)}, {})
    decision = gates.decide(
        limits(min_golden_pass_rate=0.9, min_reporting_share=1.0),
        stage(sample(), statuses=("active",) * 1, golden=golden),
    )
    assert checks(decision)["min_golden_pass_rate"].outcome is Outcome.PASSED  # one device: it decides
    three = GoldenSample(("d0", "d1", "d2"), golden.new, {}, golden.classes)
    decision = gates.decide(limits(min_golden_pass_rate=0.9, min_reporting_share=1.0),
                            stage(sample(), statuses=("active",) * 3, golden=three))  # fmt: skip
    check = checks(decision)["min_golden_pass_rate"]
    assert check.outcome is Outcome.HELD and check.waiting_for == ("d1", "d2")
    assert check.detail()["waiting_for"] == ["d1", "d2"]


@pytest.mark.parametrize(
    ("outcomes", "folded"),
    [
        ([Outcome.PASSED, Outcome.PASSED], Outcome.PASSED),
        ([Outcome.PASSED, Outcome.HELD], Outcome.HELD),
        ([Outcome.HELD, Outcome.FAILED, Outcome.PASSED], Outcome.FAILED),
        ([], Outcome.PASSED),
    ],
)
def test_any_failed_check_fails_the_stage_and_any_held_one_makes_it_wait(
    outcomes: list[Outcome], folded: Outcome
) -> None:
    assert fold(outcomes) is folded


def test_the_stored_details_keep_their_shape() -> None:
    new = sample(device(errors=40), device(errors=40), device(), device())
    details = gates.decide(limits(), stage(new, offline=("d3",))).details
    assert [c["gate"] for c in details["checks"]] == ["min_activated_fraction", "max_error_rate"]
    assert details["checks"][1] == {"gate": "max_error_rate", "result": "fail", "value": 0.4, "limit": 0.05,
                                    "range": details["checks"][1]["range"]}  # fmt: skip
    assert details["new"]["requests"] == 200 and details["new"]["errors"] == 80 and details["new"]["devices"] == 4
    assert details["offline_devices"] == ["d3"] and details["baseline"]["version"] is None

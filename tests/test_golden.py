"""Golden prompts: the rule that checks an answer, the shipped set, the set stored with a version and
delivered with the desired state, the rollout gate on the pass rate the devices report, the quality
floor on any stored metric, and `model evaluate`'s golden and public-domain perplexity figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from control_plane.models import DesiredStateRow, DeviceEvent, RolloutDevice
from shared.desired import GoldenPrompt
from shared.messages import MessageDecodeError, decode
from slmops.modelopt import quantize_gguf
from slmops.modelopt.compare import metrics_against
from slmops.modelopt.measure import eval_texts, golden_set, measure_here
from tests.test_rollout_rules import NO_WAIT, _device, _reference, _report_active, _tick, _version

GOLDEN = {"prompts": [{"id": f"p{i}", "prompt": f"Say {i}.", "accept": [str(i)]} for i in range(8)]}


def test_an_answer_passes_when_it_holds_an_accepted_phrase_as_words() -> None:
    rule = GoldenPrompt(id="c", prompt="Capital of the UK?", accept=["London", "the city of london"])
    assert rule.accepts("The capital is LONDON.") and rule.accepts("It is  the City\nof London, of course")
    assert not rule.accepts("Londonderry is in Northern Ireland") and not rule.accepts("")
    zero = GoldenPrompt(id="z", prompt="Water freezes at?", accept=["0", "zero"])
    assert zero.accepts("At 0 °C.") and zero.accepts("zero degrees")
    assert not zero.accepts("At -18.0°C.") and not zero.accepts("It is 10.") and not zero.accepts("0.5")
    # Accepted answers are literal text: regex syntax in them matches only itself.
    assert GoldenPrompt(id="r", prompt="?", accept=["a.c"]).accepts("a.c") is True
    assert GoldenPrompt(id="r", prompt="?", accept=["a.c"]).accepts("abc") is False


def test_the_shipped_sets_are_about_thirty_prompts_and_public_domain_text() -> None:
    prompts = golden_set().prompts
    assert 25 <= len(prompts) <= 40 and len({p.id for p in prompts}) == len(prompts)
    assert all(p.accept and p.max_tokens <= 32 for p in prompts)
    texts = eval_texts("public_domain.txt")
    assert len(texts) >= 5 and any(t.startswith("Four score and seven years ago") for t in texts)


def _golden_event(session: Session, device_id: str, version: str, passed: int, total: int = 8) -> None:
    golden = {"version": version, "passed": passed, "total": total, "failed": [f"p{i}" for i in range(total - passed)]}
    detail = {"version": version, "model": "m", "detail": {"golden": golden}}
    session.add(DeviceEvent(device_id=device_id, kind="activation_succeeded", detail=detail))


def _report(
    engine: Any, rollout_id: str, version: str, passed: dict[str, int], statuses: tuple[str, ...] = ("assigned",)
) -> None:
    """The members in `statuses` activate `version` and report their golden runs."""
    with Session(engine) as session:
        members = session.exec(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id)).all()
        assigned = [m.device_id for m in members if m.status in statuses]
    _report_active(engine, assigned, version)
    with Session(engine) as session:
        for device_id in assigned:
            _golden_event(session, device_id, version, passed[device_id])
        session.commit()


def _golden_check(client: TestClient, headers: dict[str, str], rollout_id: str) -> dict[str, Any]:
    (latest, *_) = client.get(f"/v1/rollouts/{rollout_id}/evaluations", headers=headers).json()
    return next(c for c in latest["details"]["checks"] if c["gate"] == "min_golden_pass_rate")  # type: ignore[no-any-return]


def test_the_golden_gate_compares_the_canarys_rate_with_the_baselines_on_the_same_class(  # type: ignore[no-untyped-def]
    client, engine, admin_headers, operator_headers
) -> None:
    client.post("/v1/models", json={"name": "m"}, headers=operator_headers)
    for version, sha in (("1", "a"), ("2", "b"), ("3", "c")):
        _version(client, operator_headers, version, [_reference(sha)])
        stored = client.put(f"/v1/models/m/versions/{version}/golden-set", json=GOLDEN, headers=operator_headers)
        assert stored.status_code == 200, stored.text
    assert client.get("/v1/models/m/versions/1/golden-set", headers=operator_headers).json()["prompts"][0]["id"] == "p0"
    devices = [_device(client, admin_headers, f"d{i}", cpu_model="cpu-x") for i in range(2)]
    gates = {**NO_WAIT, "max_error_rate": None, "min_golden_pass_rate": 0.0}
    everyone = {"stages": [{"name": "all", "percent": 100, "min_bake_s": 0}], "gates": gates}
    first = client.post("/v1/rollouts", json={"model": "m", "version": "1", **everyone}, headers=operator_headers)
    assert first.status_code == 201, first.text
    with Session(engine) as session:  # the set travels with the desired state
        assert session.get(DesiredStateRow, devices[0]).payload["golden"]["prompts"][7]["accept"] == ["7"]  # type: ignore[union-attr]
    _report_active(engine, devices, "1")
    _tick(engine)
    waiting = _golden_check(client, operator_headers, first.json()["id"])
    assert waiting["result"] == "inconclusive" and set(waiting["waiting_for"]) == set(devices)
    _report(engine, first.json()["id"], "1", {devices[0]: 8, devices[1]: 6}, ("assigned", "active"))
    _tick(engine)
    assert client.get(f"/v1/rollouts/{first.json()['id']}", headers=operator_headers).json()["state"] == "completed"

    stages = [{"name": "canary", "count": 1, "min_bake_s": 0}, {"name": "fleet", "percent": 100, "min_bake_s": 0}]
    canary_first = {"stages": stages, "gates": {**gates, "min_golden_pass_rate": 0.9}}
    second = client.post("/v1/rollouts", json={"model": "m", "version": "2", **canary_first}, headers=operator_headers)
    _report(engine, second.json()["id"], "2", dict.fromkeys(devices, 6))
    _tick(engine)
    body = client.get(f"/v1/rollouts/{second.json()['id']}", headers=operator_headers).json()
    assert body["state"] == "rolled_back" and "min_golden_pass_rate" in body["reason"], body
    check = _golden_check(client, operator_headers, second.json()["id"])
    (per_class,) = check["classes"]
    # v1 passed 14 of 16 on this hardware class; the canary 6 of 8 is below 0.9 of that.
    assert per_class["baseline"] == 0.875 and per_class["limit"] == pytest.approx(0.7875)
    assert per_class["value"] == 0.75 and check["result"] == "fail" and check["failed_prompts"] == ["p0", "p1"]

    # A version as good as v1 passes the canary, and its canary's report still counts in the next stage.
    third = client.post("/v1/rollouts", json={"model": "m", "version": "3", **canary_first}, headers=operator_headers)
    _report(engine, third.json()["id"], "3", dict.fromkeys(devices, 7))
    _tick(engine)
    assert client.get(f"/v1/rollouts/{third.json()['id']}", headers=operator_headers).json()["stage"] == "fleet"
    _tick(engine)  # assigns the fleet stage
    _report(engine, third.json()["id"], "3", dict.fromkeys(devices, 7))  # the fleet stage's device only
    _tick(engine)
    body = client.get(f"/v1/rollouts/{third.json()['id']}", headers=operator_headers).json()
    assert body["state"] == "completed", body


def test_the_quality_floor_can_use_any_stored_metric(  # type: ignore[no-untyped-def]
    client, admin_headers, operator_headers
) -> None:
    client.post("/v1/models", json={"name": "m"}, headers=operator_headers)
    _version(client, operator_headers, "1", [_reference("a")])
    metrics = {"quality_retention": 0.98, "golden_retention": 0.62, "perplexity_retention": 0.95}
    client.put("/v1/models/m/versions/1/eval-metrics", json={"metrics": metrics}, headers=operator_headers)
    _device(client, admin_headers, "d0")
    by_golden = {"model": "m", "version": "1", "quality_metric": "golden_retention", "min_quality_retention": 0.9}
    refused = client.post("/v1/rollouts", json=by_golden, headers=operator_headers)
    assert refused.status_code == 422 and refused.json()["code"] == "quality_below_floor", refused.text
    assert refused.json()["quality_retention"] == 0.62 and refused.json()["quality_metric"] == "golden_retention"
    by_default = client.post("/v1/rollouts", json={"model": "m", "version": "1"}, headers=operator_headers)
    assert by_default.status_code == 201, by_default.text


@pytest.mark.llama
def test_evaluate_reports_golden_pass_rates_and_public_domain_perplexity(tiny_gguf: Path, tmp_path: Path) -> None:
    parent = measure_here(tiny_gguf, "gguf")
    variant = measure_here(quantize_gguf(tiny_gguf, tmp_path / "q4.gguf", "Q4_0").dst, "gguf")
    assert parent.golden_total == len(golden_set().prompts) and parent.golden_passed is not None
    metrics = metrics_against(parent, variant, "quantized_from")
    assert 0 <= metrics["golden_pass_rate"] <= 1 and "parent_golden_pass_rate" in metrics
    assert metrics["perplexity_retention"] == pytest.approx(parent.perplexity / variant.perplexity, abs=1e-3)  # type: ignore[operator]


def _golden_rollout(client: TestClient, admin: dict[str, str], operator: dict[str, str], min_rate: float) -> Any:
    """Ten devices of one hardware class on a one-stage rollout of version 1 with a golden set."""
    client.post("/v1/models", json={"name": "m"}, headers=operator)
    _version(client, operator, "1", [_reference("a")])
    client.put("/v1/models/m/versions/1/golden-set", json=GOLDEN, headers=operator)
    devices = [_device(client, admin, f"g{i}", cpu_model="cpu-x") for i in range(10)]
    gates = {**NO_WAIT, "max_error_rate": None, "min_golden_pass_rate": min_rate}
    plan = {"stages": [{"name": "all", "percent": 100, "min_bake_s": 0}], "gates": gates}
    rollout = client.post("/v1/rollouts", json={"model": "m", "version": "1", **plan}, headers=operator)
    assert rollout.status_code == 201, rollout.text
    return devices, rollout.json()["id"]


@pytest.mark.parametrize(
    "liar",
    [
        {"passed": 0, "total": 10**15},  # outweighs nine honest devices
        {"passed": "abc", "total": 8},  # made the gate raise on every tick
        {"passed": 9, "total": 8},
        {"passed": 0, "total": 8},  # in bounds: fails alone, but a check holds with any one device left out
        None,  # never reports: the stage does not wait for every device
    ],
)
def test_one_device_can_neither_fail_nor_stall_the_golden_gate(  # type: ignore[no-untyped-def]
    client, engine, admin_headers, operator_headers, liar
) -> None:
    # Rows as stored before the wire schema bounded them (the ingest now refuses such reports).
    devices, rollout_id = _golden_rollout(client, admin_headers, operator_headers, 0.95)
    _report_active(engine, devices, "1")
    with Session(engine) as session:
        for device_id in devices[:9]:
            _golden_event(session, device_id, "1", 8)
        if liar is not None:
            golden = {"version": "1", **liar}
            detail = {"version": "1", "model": "m", "detail": {"golden": golden}}
            session.add(DeviceEvent(device_id=devices[9], kind="activation_succeeded", detail=detail))
        session.commit()
    _tick(engine)
    body = client.get(f"/v1/rollouts/{rollout_id}", headers=operator_headers).json()
    if liar == {"passed": 0, "total": 8}:  # with it left out the stage passes: the check waits for more data
        assert body["state"] != "rolled_back", body
        assert _golden_check(client, operator_headers, rollout_id)["result"] == "inconclusive"
    else:
        assert body["state"] == "completed", body
        assert _golden_check(client, operator_headers, rollout_id)["result"] == "pass"


def test_two_devices_failing_their_golden_set_fail_the_stage(  # type: ignore[no-untyped-def]
    client, engine, admin_headers, operator_headers
) -> None:
    devices, rollout_id = _golden_rollout(client, admin_headers, operator_headers, 0.95)
    _report_active(engine, devices, "1")
    with Session(engine) as session:
        for index, device_id in enumerate(devices):
            _golden_event(session, device_id, "1", 0 if index < 2 else 8)
        session.commit()
    _tick(engine)
    body = client.get(f"/v1/rollouts/{rollout_id}", headers=operator_headers).json()
    assert body["state"] == "rolled_back" and "min_golden_pass_rate" in body["reason"], body


@pytest.mark.parametrize(
    "golden",
    [
        {"version": "1", "passed": 0, "total": 10**15},
        {"version": "1", "passed": "abc", "total": 8},
        {"version": "1", "passed": 9, "total": 8},
        {"version": "x" * 65, "passed": 1, "total": 8},
        {"passed": 1, "total": 8},
    ],
)
def test_an_event_with_an_out_of_bounds_golden_outcome_is_refused(golden: dict[str, Any]) -> None:
    event = {
        "message_id": "e1",
        "kind": "activation_succeeded",
        "model": "m",
        "version": "1",
        "detail": {"golden": golden},
    }
    with pytest.raises(MessageDecodeError) as refused:
        decode("events", json.dumps(event))
    assert refused.value.reason == "invalid"
    event["detail"] = {"golden": {"version": "1", "passed": 8, "total": 8, "failed": []}}
    assert decode("events", json.dumps(event)).detail["golden"]["passed"] == 8  # type: ignore[attr-defined]

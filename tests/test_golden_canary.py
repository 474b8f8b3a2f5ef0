"""Quality checked on the device itself: real agents answer a version's golden set during its trial,
and a degraded SmolLM2 variant is rolled back at the canary by the golden gate."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from slmops.demo import start_agents, start_control_plane, wait_until
from slmops.demo_smollm2 import golden_body
from tests.support.fleet import mosquitto_fleet

ALL_AT_ONCE: dict[str, Any] = {
    "stages": [{"name": "all", "percent": 100, "min_bake_s": 0}],
    # A floor of 0 passes any rate, but waits until every device reported its golden run.
    "gates": {"max_p95_latency_ratio": None, "max_error_rate": None, "min_golden_pass_rate": 0.0},
    "min_quality_retention": None,
}
CANARY_FIRST: dict[str, Any] = {
    "stages": [{"name": "canary", "count": 1, "min_bake_s": 0}, {"name": "fleet", "percent": 100, "min_bake_s": 0}],
    "gates": {"max_p95_latency_ratio": None, "max_error_rate": None, "min_golden_pass_rate": 0.9},
    "min_quality_retention": None,
}


def _register(api: httpx.Client, version: str, path: Path) -> None:
    with path.open("rb") as fh:
        api.post("/v1/models/smollm2/versions", data={"version": version}, files={"file": fh}).raise_for_status()
    api.put(f"/v1/models/smollm2/versions/{version}/golden-set", json=golden_body()).raise_for_status()


def _finished(api: httpx.Client, rollout_id: str, timeout_s: float) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body: dict[str, Any] = api.get(f"/v1/rollouts/{rollout_id}").json()
        return body if body["state"] != "running" else None

    return wait_until(done, timeout_s, f"rollout {rollout_id}")  # type: ignore[no-any-return]


def _golden_check(api: httpx.Client, rollout_id: str, result: str) -> dict[str, Any]:
    evaluation = next(e for e in api.get(f"/v1/rollouts/{rollout_id}/evaluations").json() if e["result"] == result)
    return next(c for c in evaluation["details"]["checks"] if c["gate"] == "min_golden_pass_rate")  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.llama
@pytest.mark.mosquitto
def test_a_variant_failing_its_golden_set_on_the_device_is_rolled_back_at_the_canary(
    tmp_path: Path, smollm2_variant: Callable[[str], Path]
) -> None:
    fleet = mosquitto_fleet(tmp_path / "fleet")
    try:
        api = start_control_plane(fleet)
        api.post("/v1/models", json={"name": "smollm2"}).raise_for_status()
        _register(api, "1", smollm2_variant("Q8_0"))
        _register(api, "2", smollm2_variant("Q2_K"))
        start_agents(fleet, api, 2)
        first = api.post("/v1/rollouts", json={"model": "smollm2", "version": "1", **ALL_AT_ONCE}).json()
        assert _finished(api, first["id"], 600)["state"] == "completed"
        # Both devices answered v1's golden set on their own runtime and reported it with the activation;
        # the demo's eight prompts are ones Q8_0 answers and the Q2_K variant mostly does not.
        (v1_class,) = _golden_check(api, first["id"], "pass")["classes"]  # one machine: one hardware class
        assert v1_class["baseline"] is None and 0 < v1_class["value"] <= 1 and len(golden_body()["prompts"]) == 8

        second = api.post("/v1/rollouts", json={"model": "smollm2", "version": "2", **CANARY_FIRST}).json()
        done = _finished(api, second["id"], 600)
        assert done["state"] == "rolled_back", done
        assert "min_golden_pass_rate" in done["reason"] and "canary" in done["reason"]
        check = _golden_check(api, second["id"], "fail")
        (per_class,) = check["classes"]
        assert per_class["baseline"] == v1_class["value"]  # v1's rate on the same hardware class
        assert per_class["value"] < per_class["limit"] == pytest.approx(0.9 * v1_class["value"], abs=1e-4)
        assert check["failed_prompts"]
        # The canary went back to v1; the other device never left it.
        wait_until(lambda: {d["current_version"] for d in api.get("/v1/devices").json()["data"]} == {"1"}, 120,
                   "every device on v1 again")  # fmt: skip
    finally:
        fleet.shutdown()

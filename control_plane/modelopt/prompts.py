"""The packaged prompt set: calibration for static quantization, and the operator's quality checks."""

from __future__ import annotations

from importlib import resources


def default_prompts() -> list[str]:
    """The prompts in control_plane/modelopt/data/prompts.txt, comments and blank lines left out."""
    text = resources.files("control_plane.modelopt").joinpath("data/prompts.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]

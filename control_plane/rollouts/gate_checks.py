"""A stage's gate checks as values: what was observed, against which limit, and the outcome.

`detail()` gives the JSON a `GateEvaluation` stores and the API shows (one dict per check, keys in
the order operators and tools read them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Outcome(StrEnum):
    """A check's or a stage's outcome, as stored: held waits for more data (the stage waits)."""

    PASSED = "pass"
    HELD = "inconclusive"
    FAILED = "fail"


def fold(outcomes: Iterable[Outcome]) -> Outcome:
    """Any failed check fails the stage; any held one makes it wait; otherwise it passes."""
    seen = set(outcomes)
    return Outcome.FAILED if Outcome.FAILED in seen else Outcome.HELD if Outcome.HELD in seen else Outcome.PASSED


@dataclass(frozen=True, kw_only=True)
class Check:
    name: str
    outcome: Outcome
    value: float | None
    limit: float | None
    reason: str

    def detail(self) -> dict[str, Any]:
        return {"gate": self.name, "result": self.outcome.value, "value": self.value, "limit": self.limit}


@dataclass(frozen=True, kw_only=True)
class LimitCheck(Check):
    """A value against a limit; `range` is the value's low and high with any one device left out."""

    range: tuple[float, float] | None = None

    def detail(self) -> dict[str, Any]:
        return super().detail() | ({} if self.range is None else {"range": list(self.range)})


@dataclass(frozen=True, kw_only=True)
class ActivationCheck(Check):
    failed_devices: tuple[str, ...] = ()

    def detail(self) -> dict[str, Any]:
        return super().detail() | {"failed_devices": list(self.failed_devices)}


@dataclass(frozen=True, kw_only=True)
class ClassRate:
    """The golden pass rate of one hardware class, its baseline's and the floor it must reach."""

    hardware_class: tuple[Any, ...]
    value: float
    baseline: float | None
    limit: float

    def detail(self) -> dict[str, Any]:
        return {"class": list(self.hardware_class), "value": self.value, "baseline": self.baseline, "limit": self.limit}


@dataclass(frozen=True, kw_only=True)
class GoldenCheck(Check):
    classes: tuple[ClassRate, ...] = ()
    reporting_devices: int = 0
    required_reporting_devices: int = 0
    waiting_for: tuple[str, ...] | None = None  # devices on trial that have not reported yet
    failed_prompts: tuple[str, ...] = ()

    def detail(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "gate": self.name,
            "limit": self.limit,
            "classes": [c.detail() for c in self.classes],
            "reporting_devices": self.reporting_devices,
            "required_reporting_devices": self.required_reporting_devices,
            "result": self.outcome.value,
        }
        if self.waiting_for is not None:
            out["waiting_for"] = list(self.waiting_for)
        return out | {"value": self.value, "failed_prompts": list(self.failed_prompts)}

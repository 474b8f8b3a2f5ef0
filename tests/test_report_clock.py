"""A device's report order never goes back: not when its clock is set back while it runs, nor
across a restart when the clock was set back while it was down (the last value is kept)."""

from __future__ import annotations

from pathlib import Path

from shared.report_clock import ReportClock


class _Wall:
    def __init__(self, us: int) -> None:
        self.us = us

    def __call__(self) -> int:
        return self.us


def test_values_rise_with_the_wall_clock_and_past_it_when_it_goes_back() -> None:
    wall = _Wall(1_000_000)
    clock = ReportClock(now_us=wall)
    first = clock.next()
    wall.us += 5_000
    second = clock.next()
    assert (first, second) == (1_000_000, 1_005_000)
    wall.us = 10  # NTP set it back, or a device without a real-time clock
    assert clock.next() == second + 1
    assert clock.next() == second + 2


def test_a_restarted_agent_starts_above_its_last_value_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite.report-seq"
    wall = _Wall(2_000_000)
    before = ReportClock(path, now_us=wall).next()
    wall.us = 30  # rebooted before it had the time
    assert ReportClock(path, now_us=wall).next() == before + 1
    assert ReportClock(path, now_us=wall).next() == before + 2


def test_an_unreadable_file_falls_back_to_the_wall_clock(tmp_path: Path) -> None:
    path = tmp_path / "seq"
    path.write_text("not a number")
    assert ReportClock(path, now_us=_Wall(77)).next() == 77
    assert path.read_text() == "77"

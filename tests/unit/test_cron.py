"""Cron schedules of maintenance windows: parsing, day semantics, and the latest firing before a moment."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pipeline.cron import CronSchedule


def _t(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_fields_ranges_steps_lists_and_names() -> None:
    c = CronSchedule.parse("*/15 8-17/3 1,15 jan-mar mon-fri")
    assert c.minutes == {0, 15, 30, 45}
    assert c.hours == {8, 11, 14, 17}
    assert c.days == {1, 15} and c.months == {1, 2, 3} and c.weekdays == {1, 2, 3, 4, 5}
    assert CronSchedule.parse("0 0 * * 7").weekdays == {0}  # 7 is Sunday too
    daily = CronSchedule.parse("@daily")
    assert (daily.minutes, daily.hours, daily.any_day, daily.any_weekday) == ({0}, {0}, True, True)
    assert CronSchedule.parse("@weekly").weekdays == {0}


@pytest.mark.parametrize("bad", ["* * * *", "60 * * * *", "* 24 * * *", "* * 0 * *", "*/0 * * * *", "a * * * *",
                                 "5-1 * * * *"])
def test_invalid_expressions(bad: str) -> None:
    with pytest.raises(ValueError, match="cron"):
        CronSchedule.parse(bad)


def test_day_of_month_or_day_of_week_when_both_are_restricted() -> None:
    c = CronSchedule.parse("0 3 13 * fri")  # the 13th, or any Friday (Vixie cron)
    assert c.day_matches(_t("2026-03-13T00:00:00"))  # a Friday the 13th
    assert c.day_matches(_t("2026-03-06T00:00:00"))  # a Friday
    assert c.day_matches(_t("2026-04-13T00:00:00"))  # a Monday the 13th
    assert not c.day_matches(_t("2026-03-12T00:00:00"))
    only_weekday = CronSchedule.parse("0 3 * * fri")
    assert not only_weekday.day_matches(_t("2026-04-13T00:00:00"))


def test_latest_firing_at_or_before() -> None:
    nightly = CronSchedule.parse("30 2 * * sun")  # Sundays 02:30
    moment = _t("2026-03-04T12:00:00")  # a Wednesday
    assert nightly.latest_at_or_before(moment, moment - timedelta(days=7)) == _t("2026-03-01T02:30:00")
    assert nightly.latest_at_or_before(moment, moment - timedelta(days=2)) is None
    assert nightly.latest_at_or_before(_t("2026-03-01T02:30:59"), _t("2026-03-01T00:00:00")) == _t(
        "2026-03-01T02:30:00")
    assert nightly.latest_at_or_before(_t("2026-03-01T02:29:59"), _t("2026-02-28T00:00:00")) is None
    every5 = CronSchedule.parse("*/5 * * * *")
    assert every5.latest_at_or_before(_t("2026-03-01T10:07:30"), _t("2026-03-01T00:00:00")) == _t(
        "2026-03-01T10:05:00")

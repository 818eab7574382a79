"""A small cron-expression matcher for maintenance schedules. Pure: no clocks, UTC only.

Five fields, ``minute hour day-of-month month day-of-week``, each ``*``, a number, a range ``a-b``, a step ``*/n`` or
``a-b/n``, or a comma list of those; months and weekdays also take three-letter names (``jan``, ``mon``); weekday 0 and
7 are Sunday. As in Vixie cron, when both day-of-month and day-of-week are restricted a day matching either one fires.
Macros: ``@hourly``, ``@daily``, ``@weekly``, ``@monthly``, ``@yearly``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

_MACROS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}
_MONTHS = {m: i + 1 for i, m in enumerate(("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct",
                                           "nov", "dec"))}
_WEEKDAYS = {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
_MINUTE = timedelta(minutes=1)


def _parse_field(text: str, low: int, high: int, names: dict[str, int], label: str) -> frozenset[int]:
    values: set[int] = set()

    def number(token: str) -> int:
        token = token.strip().lower()
        if token in names:
            return names[token]
        if not token.isdigit():
            raise ValueError(f"cron {label}: {token!r} is not a number")
        return int(token)

    for part in text.split(","):
        base, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f"cron {label}: bad step {step_text!r}")
            step = int(step_text)
        if base == "*":
            start, stop = low, high
        elif "-" in base:
            first, _, last = base.partition("-")
            start, stop = number(first), number(last)
        else:
            start = number(base)
            stop = high if step_text else start
        if not (low <= start <= high and low <= stop <= high) or start > stop:
            raise ValueError(f"cron {label}: {part!r} is outside {low}-{high}")
        values.update(range(start, stop + 1, step))
    return frozenset(values)


@dataclass(frozen=True, slots=True)
class CronSchedule:
    """A parsed cron expression. ``parse`` raises ValueError with the field at fault."""

    expression: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool
    any_weekday: bool

    @classmethod
    def parse(cls, expression: str) -> CronSchedule:
        """Parse five fields (or a macro)."""
        text = _MACROS.get(expression.strip().lower(), expression)
        fields = text.split()
        if len(fields) != 5:
            raise ValueError(f"cron expression {expression!r} needs 5 fields (minute hour day month weekday)")
        weekdays = _parse_field(fields[4], 0, 7, _WEEKDAYS, "day-of-week")
        return cls(
            expression=expression,
            minutes=_parse_field(fields[0], 0, 59, {}, "minute"),
            hours=_parse_field(fields[1], 0, 23, {}, "hour"),
            days=_parse_field(fields[2], 1, 31, {}, "day-of-month"),
            months=_parse_field(fields[3], 1, 12, _MONTHS, "month"),
            weekdays=frozenset(d % 7 for d in weekdays),
            any_day=fields[2].startswith("*"),
            any_weekday=fields[4].startswith("*"),
        )

    def day_matches(self, day: datetime) -> bool:
        """True when the schedule fires on ``day`` (some minute of it)."""
        if day.month not in self.months:
            return False
        in_month = day.day in self.days
        in_week = (day.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return in_month and in_week
        return in_month or in_week

    def latest_at_or_before(self, moment: datetime, not_before: datetime) -> datetime | None:
        """The latest firing minute in ``[not_before, moment]`` (aware UTC datetimes), or None.

        Walks backwards day by day and hour by hour, so the cost grows with the span in days and hours, not minutes.
        """
        t = moment.astimezone(UTC).replace(second=0, microsecond=0)
        while t >= not_before:
            if not self.day_matches(t):
                t = t.replace(hour=0, minute=0) - _MINUTE
                continue
            if t.hour not in self.hours:
                t = t.replace(minute=0) - _MINUTE
                continue
            earlier = [m for m in self.minutes if m <= t.minute]
            if not earlier:
                t = t.replace(minute=0) - _MINUTE
                continue
            t = t.replace(minute=max(earlier))
            return t if t >= not_before else None
        return None

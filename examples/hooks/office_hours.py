"""Allow flows only during office hours: given weekdays and hours, in a given timezone.

Outside the window a new flow is denied with a reason that says when access is allowed and
what time it is there, e.g.

    denied by hook:office_hours: outside office hours (mon-fri 08:00-18:00 Europe/Berlin);
    it is sat 14:03 there

Configure it in the edge's YAML:

    hooks:
      - path: examples/hooks/office_hours.py
        options:
          timezone: Europe/Berlin      # an IANA zone name; default UTC
          days: [mon, tue, wed, thu, fri]   # or ranges: [mon-fri]; default mon-fri
          hours: "08:00-18:00"         # start inclusive, end exclusive; default 08:00-18:00
          groups: [contractors]        # optional scope, see below
          identities: [temp-alice]     # optional scope, see below

Scope: with neither `identities` nor `groups`, every flow is restricted (anonymous ones too).
With either, only flows of a listed identity, or of an identity in a listed group, are
restricted; all other flows are left to the other hooks and the policy.

A window whose end is earlier than its start runs past midnight: `hours: "22:00-06:00"` with
`days: [fri]` is Friday 22:00 to Saturday 06:00. Daylight saving time is the zone's own
(zoneinfo); "24:00" ends a window at midnight.

Only new flows are checked: a flow opened at 17:59 is not cut at 18:00.

The clock is the module-level `now()`; tests replace it to choose the time.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ramp.flows.flow import Flow
from ramp.policy.hooks import Deny

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY_NAMES = {name: i for i, name in enumerate(DAYS)} | {
    name: i
    for i, name in enumerate(
        ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
    )
}
_HHMM = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*$")


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


now: Callable[[], dt.datetime] = _utc_now  # an aware datetime; replaced by tests


@dataclass(frozen=True, slots=True)
class Window:
    zone: ZoneInfo
    days: frozenset[int]  # 0 = Monday
    start: int  # minutes after midnight
    end: int  # minutes after midnight; <= start: the window ends the next day
    identities: frozenset[str]
    groups: frozenset[str]
    text: str  # the window as the deny reason says it

    def applies_to(self, flow: Flow) -> bool:
        if not self.identities and not self.groups:
            return True
        ident = flow.identity
        if ident is None:
            return False
        return ident.name in self.identities or bool(ident.groups & self.groups)

    def contains(self, local: dt.datetime) -> bool:
        minute = local.hour * 60 + local.minute
        today = local.weekday()
        if self.start < self.end:
            return today in self.days and self.start <= minute < self.end
        # past midnight: the evening part belongs to today, the early part to yesterday
        if minute >= self.start:
            return today in self.days
        return minute < self.end and (today - 1) % 7 in self.days


_window: Window | None = None


def _minutes(text: str, what: str) -> int:
    m = _HHMM.match(text)
    if m is None:
        raise ValueError(f"{what} must be HH:MM, not {text!r}")
    hours, minutes = int(m.group(1)), int(m.group(2))
    if minutes > 59 or hours > 24 or (hours == 24 and minutes):
        raise ValueError(f"{what} {text!r} is not a time of day")
    return hours * 60 + minutes


def _days(value: Any) -> frozenset[int]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not value:
        raise ValueError("days must be a list of weekdays, e.g. [mon, tue] or [mon-fri]")
    days: set[int] = set()
    for item in value:
        first, _, last = str(item).strip().lower().partition("-")
        if first not in _DAY_NAMES or (last and last not in _DAY_NAMES):
            raise ValueError(f"days: {item!r} is not a weekday (use {', '.join(DAYS)})")
        a = _DAY_NAMES[first]
        b = _DAY_NAMES[last] if last else a
        days.update(d % 7 for d in range(a, a + (b - a) % 7 + 1))  # fri-mon wraps the week
    return frozenset(days)


def _names(value: Any, what: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of names")
    return frozenset(value)


def _day_text(days: frozenset[int]) -> str:
    if len(days) == 7:
        return "mon-sun"
    # one run of days, possibly across the weekend (fri-mon), reads best as a range
    starts = [d for d in days if (d - 1) % 7 not in days]
    if len(days) > 2 and len(starts) == 1:
        first = starts[0]
        return f"{DAYS[first]}-{DAYS[(first + len(days) - 1) % 7]}"
    return ",".join(DAYS[d] for d in sorted(days))


def setup(options: dict[str, Any]) -> None:
    global _window
    unknown = set(options) - {"timezone", "days", "hours", "identities", "groups"}
    if unknown:
        raise ValueError(f"unknown options: {', '.join(sorted(unknown))}")
    zone_name = str(options.get("timezone", "UTC"))
    try:
        zone = ZoneInfo(zone_name)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ValueError(f"unknown timezone {zone_name!r}") from e
    days = _days(options.get("days", ["mon-fri"]))
    hours = str(options.get("hours", "08:00-18:00"))
    start_text, sep, end_text = hours.partition("-")
    if not sep:
        raise ValueError(f'hours must be "HH:MM-HH:MM", not {hours!r}')
    start = _minutes(start_text, "hours start")
    end = _minutes(end_text, "hours end")
    if start == 24 * 60:
        raise ValueError(f"hours {hours!r}: a window cannot start at 24:00")
    if start == end:
        raise ValueError(f"hours {hours!r} is an empty window")
    end %= 24 * 60  # 00:00-24:00 becomes start == end: the whole day, via the wrap rule
    _window = Window(
        zone=zone,
        days=days,
        start=start,
        end=end,
        identities=_names(options.get("identities"), "identities"),
        groups=_names(options.get("groups"), "groups"),
        text=f"{_day_text(days)} {start_text.strip()}-{end_text.strip()} {zone_name}",
    )


def flow_start(flow: Flow) -> Deny | None:
    window = _window
    if window is None:  # setup() never ran: the loader always calls it, so only by misuse
        return Deny("office_hours is not set up")
    if not window.applies_to(flow):
        return None
    local = now().astimezone(window.zone)
    if window.contains(local):
        return None
    return Deny(
        f"outside office hours ({window.text}); it is {DAYS[local.weekday()]} {local:%H:%M} there"
    )

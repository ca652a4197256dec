"""Sample data function for the `signups` report: a Python function instead of a SQL query.

reporter calls it as `function(slot=<aware datetime in the report's zone>, report=<name>)`; it returns
a list of mappings (or `(columns, rows)`). Deterministic, so previews are repeatable.
"""

from __future__ import annotations

from datetime import datetime, timedelta

PLANS = ("free", "team", "business", "enterprise")
MINUTES = 10
"""Minutes of history: the last one is the table, all of them the trend chart."""


def last_minute(slot: datetime, report: str) -> list[dict[str, object]]:
    """Sign-ups per plan in each of the MINUTES minutes before SLOT, oldest first."""
    rows: list[dict[str, object]] = []
    for back in range(MINUTES, 0, -1):
        start = slot - timedelta(minutes=back)
        seed = int(start.timestamp()) // 60
        for i, plan in enumerate(PLANS):
            rows.append({"minute": start.strftime("%H:%M"), "plan": plan, "signups": (seed * (i + 3)) % (40 // (i + 1)) + 1})
    return rows

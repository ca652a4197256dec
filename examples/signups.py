"""Sample data function for the `signups` report: a Python function instead of a SQL query.

reporter calls it as `function(slot=<aware datetime in the report's zone>, report=<name>)`; it returns
a list of mappings (or `(columns, rows)`). Deterministic, so previews are repeatable.
"""

from __future__ import annotations

from datetime import datetime, timedelta

PLANS = ("free", "team", "business", "enterprise")


def last_minute(slot: datetime, report: str) -> list[dict[str, object]]:
    """Sign-ups per plan in the minute before SLOT."""
    start = slot - timedelta(minutes=1)
    seed = int(start.timestamp()) // 60
    return [
        {"plan": plan, "signups": (seed * (i + 3)) % (40 // (i + 1)) + 1, "since": start.strftime("%H:%M")} for i, plan in enumerate(PLANS)
    ]
